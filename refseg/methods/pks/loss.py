"""PKS's targets and losses: CenterNet heatmap, BoxInst projection + pairwise colour affinity, the click terms.

Design reasoning: docs/methods/pks.md.
"""

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from refseg.losses import _reduce, area_downsample, bce_loss, dice_loss, heatmap_focal_loss
from refseg.methods.lts.loss import grid_kl, locate_kl


def interior_point(mask: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """(B, 1, S, S) {0, 1} masks -> (B, 2) (x, y) pixels of a point deep inside each mask (NaN when empty).

    The SynthRef click definition (maximum of the distance transform, ties to
    the first cell in row order), approximated on the stride-``stride`` grid
    with a chessboard distance: the mask area-pooled to the grid (cells at
    least half covered; any covered cell when that leaves nothing), eroded
    3 x 3 until empty, the image border counting as background; the depth of
    a cell is the number of erosions it survives. Returns the deepest cell's
    centre, pixel centres at integers.
    """
    cover = F.avg_pool2d(mask.float(), stride)  # (B, 1, h, w)
    m = (cover >= 0.5).float()
    m = torch.where(m.flatten(1).any(1)[:, None, None, None], m, (cover > 0).float())
    depth = torch.zeros_like(m)
    for _ in range(max(m.shape[-2:]) // 2 + 1):
        if not bool(m.any()):
            break
        depth = depth + m
        m = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1)), 3, 1)  # 3 x 3 erosion, outside = background
    w = depth.shape[-1]
    best = depth.flatten(1).argmax(1)  # (B,), first maximum in row order
    point = torch.stack([best % w, best // w], -1).to(torch.float32) * stride + (stride - 1) / 2  # (B, 2)
    empty = depth.flatten(1).amax(1) == 0
    return torch.where(empty[:, None], torch.full_like(point, float("nan")), point)


def mask_box(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) {0, 1} masks -> (B, 4) boxes (left, top, right, bottom) in pixels, NaN when empty.

    Pixel centres are at integers, so the box of pixels x0..x1 is x0 - 0.5 .. x1 + 0.5.
    """
    m = mask[:, 0] > 0.5  # (B, S, S)
    S_h, S_w = m.shape[-2:]
    cols, rows = m.any(1), m.any(2)  # (B, S_w), (B, S_h)
    xs = torch.arange(S_w, device=m.device, dtype=torch.float32)
    ys = torch.arange(S_h, device=m.device, dtype=torch.float32)
    inf = torch.tensor(float("inf"), device=m.device)
    x0 = torch.where(cols, xs, inf).amin(1)
    x1 = torch.where(cols, xs, -inf).amax(1)
    y0 = torch.where(rows, ys, inf).amin(1)
    y1 = torch.where(rows, ys, -inf).amax(1)
    box = torch.stack([x0 - 0.5, y0 - 0.5, x1 + 0.5, y1 + 0.5], -1)  # (B, 4)
    return torch.where(torch.isfinite(box).all(1, keepdim=True), box, torch.full_like(box, float("nan")))


def pks_targets(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Centre point and box of each sample's referent, from clicks (click mode) or from the mask (full).

    Click mode: click_center (B, 2); click_corners (B, 2, 2) are the
    top-left and bottom-right *pixels* of the box, letterboxed from the
    original image, so the box reaches half an original pixel (0.5 x the
    letterbox scale, ``batch["letterbox"][:, 0]``) beyond them. Full mode:
    ``interior_point`` and ``mask_box`` of ``batch["mask"]``.
    Returns center (B, 2), box (B, 4) (left, top, right, bottom), valid (B,)
    bool; NaN rows where there is no referent (no-target samples).
    """
    if "click_center" in batch:
        center = batch["click_center"].float()
        corners = batch["click_corners"].float()  # (B, 2, 2)
        B = center.shape[0]
        scale = batch["letterbox"][:, 0].float() if "letterbox" in batch else torch.ones(B, device=center.device)
        half = (0.5 * scale)[:, None]  # (B, 1)
        box = torch.cat([corners[:, 0] - half, corners[:, 1] + half], -1)  # (B, 4)
    elif "mask" in batch:
        center, box = interior_point(batch["mask"]), mask_box(batch["mask"])
    else:
        raise KeyError("pks_targets needs click_center / click_corners (click) or mask (full) in the batch")
    valid = torch.isfinite(center).all(1) & torch.isfinite(box).all(1)
    return {"center": center, "box": box, "valid": valid}


def centre_heatmap(center: torch.Tensor, box: torch.Tensor, size, stride: int, alpha: float = 0.54) -> torch.Tensor:
    """CenterNet target: (B, 1, h, w) Gaussians, exactly 1 at the cell holding each centre.

    center (B, 2), box (B, 4) in pixels; size (h, w) of the grid; cells are
    ``stride`` pixels. Elliptical Gaussian (TTFNet): sigma_x = alpha * box
    width / 6, sigma_y = alpha * box height / 6, in cells, centred on the
    centre cell (not the sub-cell point). NaN rows give all-zero maps.
    """
    h, w = size
    B = center.shape[0]
    ok = torch.isfinite(center).all(1) & torch.isfinite(box).all(1)  # (B,)
    c = torch.where(ok[:, None], center, torch.zeros_like(center))
    cx = ((c[:, 0] + 0.5) / stride).floor().clamp(0, w - 1)  # (B,)
    cy = ((c[:, 1] + 0.5) / stride).floor().clamp(0, h - 1)
    bw = torch.where(ok, box[:, 2] - box[:, 0], torch.ones_like(cx))
    bh = torch.where(ok, box[:, 3] - box[:, 1], torch.ones_like(cx))
    sx = (alpha * bw / 6 / stride).clamp(min=1e-3)[:, None, None]  # (B, 1, 1) cells
    sy = (alpha * bh / 6 / stride).clamp(min=1e-3)[:, None, None]
    xs = torch.arange(w, device=center.device, dtype=torch.float32)[None, None, :]  # (1, 1, w)
    ys = torch.arange(h, device=center.device, dtype=torch.float32)[None, :, None]  # (1, h, 1)
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    g = torch.exp(-(dx**2) / (2 * sx**2) - dy**2 / (2 * sy**2))  # (B, h, w), 1 at the centre cell
    return (g * ok[:, None, None].float()).view(B, 1, h, w)


def box_bitmap(box: torch.Tensor, size, stride: int = 1) -> torch.Tensor:
    """(B, 4) boxes in pixels -> (B, 1, h, w) {0, 1}: cells of a stride-``stride`` grid whose centre is in the box.

    NaN boxes give empty bitmaps.
    """
    h, w = size
    xs = torch.arange(w, device=box.device, dtype=torch.float32) * stride + (stride - 1) / 2  # cell centres
    ys = torch.arange(h, device=box.device, dtype=torch.float32) * stride + (stride - 1) / 2
    inside_x = (xs[None] >= box[:, 0:1]) & (xs[None] <= box[:, 2:3])  # (B, w); NaN compares False
    inside_y = (ys[None] >= box[:, 1:2]) & (ys[None] <= box[:, 3:4])  # (B, h)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]  # (B, 1, h, w)


def box_cover(box: torch.Tensor, size, stride: int) -> torch.Tensor:
    """(B, 4) boxes in pixels -> (B, 1, h, w) in [0, 1]: the share of each stride-``stride`` cell the box covers.

    The box spans [x0 - 0.5, x1 + 0.5] x [y0 - 0.5, y1 + 0.5] (its corner pixels
    included; pixel centres at integers), so a box smaller than a cell still
    covers the cells it touches. NaN boxes give zeros.
    """
    h, w = size
    box = box.float()

    def overlap(lo, hi, n):  # (B,) pixel interval -> (B, n) covered share of each cell
        edges = torch.arange(n + 1, device=box.device, dtype=torch.float32) * stride - 0.5  # cell borders
        a = torch.maximum(edges[None, :-1], lo[:, None] - 0.5)
        b = torch.minimum(edges[None, 1:], hi[:, None] + 0.5)
        return torch.nan_to_num((b - a).clamp(min=0) / stride, nan=0.0)

    return (overlap(box[:, 1], box[:, 3], h)[:, :, None] * overlap(box[:, 0], box[:, 2], w)[:, None, :])[:, None]


def box_projection_loss(logits: torch.Tensor, box_mask: torch.Tensor, smooth: float = 1.0,
                        reduction: str = "mean") -> torch.Tensor:
    """BoxInst projection loss: the mask's max-projections onto x and y must match the box's.

    logits: (B, 1, H, W) mask logits; box_mask: (B, 1, H, W) {0, 1}, the box
    filled. Per axis: Dice with squared denominators (V-Net/BoxInst)
    ``1 - (2 sum(p t) + smooth) / (sum(p^2) + sum(t^2) + smooth)`` between
    the projection p = max sigmoid over the other axis and the box's t; the
    per-sample loss is the sum over the two axes. A mask that fills its box's
    extent on both axes (any shape touching every row and column of the box,
    nothing outside) scores 0; ``smooth`` makes an empty box (no-target)
    push the projections to 0 instead of giving no gradient.
    """
    x = logits.float()[:, 0]  # (B, H, W)
    t = box_mask.float()[:, 0]
    loss = 0
    for dim in (1, 2):  # project onto x (max over rows), then onto y; max sigmoid = sigmoid of the max
        pp, tt = torch.sigmoid(x.amax(dim)), t.amax(dim)  # (B, W) / (B, H)
        loss = loss + 1 - (2 * (pp * tt).sum(1) + smooth) / ((pp**2).sum(1) + (tt**2).sum(1) + smooth)
    return _reduce(loss, reduction)


def _pair_slices(H: int, W: int, dy: int, dx: int):
    """Slices (rows, cols) of pixels p and of their neighbours q = p + (dy, dx), dy >= 0."""
    py, qy = slice(0, H - dy), slice(dy, H)
    px, qx = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    return (py, px), (qy, qx)


def pairwise_colour_affinity_loss(logits: torch.Tensor, lab: torch.Tensor, box_mask: torch.Tensor,
                                  threshold: float = 0.3, theta: float = 2.0, dilation: int = 2) -> torch.Tensor:
    """BoxInst pairwise loss (a scalar): neighbours of similar colour inside the box should share a label.

    logits: (B, 1, H, W) mask logits; lab: (B, 3, H, W) the image in CIE LAB
    at the same resolution; box_mask: (B, 1, H, W) {0, 1}. Pairs: each pixel
    and its 8 neighbours at distance ``dilation`` (each unordered pair once,
    4 offsets). A pair counts when both pixels lie in the box and their
    colour similarity exp(-||dLAB|| / theta) >= ``threshold``; its loss is
    -log P(same label) = -log(p_i p_j + (1 - p_i)(1 - p_j)), P clamped at
    1e-6. Returns the mean over counted pairs of the batch (0 when none count).
    """
    p = torch.sigmoid(logits.float())  # (B, 1, H, W)
    lab = lab.float()
    box_mask = box_mask.float()
    H, W = logits.shape[-2:]
    d = dilation
    max_sq = (theta * math.log(threshold)) ** 2  # exp(-dist / theta) >= threshold  <=>  dist^2 <= max_sq
    total = p.new_zeros(())
    count = p.new_zeros(())
    for dy, dx in ((0, d), (d, -d), (d, 0), (d, d)):
        if dy >= H or abs(dx) >= W:
            continue
        (py, px), (qy, qx) = _pair_slices(H, W, dy, dx)
        with torch.no_grad():
            similar = ((lab[:, :, py, px] - lab[:, :, qy, qx]) ** 2).sum(1, keepdim=True) <= max_sq  # (B, 1, h', w')
            weight = similar * box_mask[..., py, px] * box_mask[..., qy, qx]
        a, b = p[..., py, px], p[..., qy, qx]
        same = (1 - a - b + 2 * a * b).clamp(min=1e-6)  # p_i p_j + (1 - p_i)(1 - p_j)
        total = total - (torch.log(same) * weight).sum()
        count = count + weight.sum()
    return total / count.clamp(min=1)


def background_bce(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """BCE of ``logits`` towards background, averaged over the cells where ``where`` (same shape, {0, 1}) is 1."""
    bce = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (bce * where).sum() / where.sum().clamp(min=1)


def click_mask_terms(logits: torch.Tensor, box: torch.Tensor, center: torch.Tensor, stride: int):
    """Two mask terms that follow from the clicks alone: (outside, center), scalars.

    logits: (B, 1, h, w) mask logits on a stride-``stride`` grid; box (B, 4)
    and center (B, 2) in pixels (NaN rows: no referent).
    outside: BCE towards background, averaged over the cells whose centre
      lies outside the box (all cells of a no-target sample).
    center: BCE towards foreground of the logit bilinearly sampled at the
      centre click (an interior point of the object by definition), averaged
      over the samples that have one (0 when none).
    """
    logits = logits.float()
    B, _, h, w = logits.shape
    outside = background_bce(logits, 1 - box_bitmap(box, (h, w), stride))
    ok = torch.isfinite(center).all(1)  # (B,)
    c = torch.where(ok[:, None], center, torch.zeros_like(center))
    grid = torch.stack([(c[:, 0] + 0.5) / (stride * w), (c[:, 1] + 0.5) / (stride * h)], -1) * 2 - 1
    at = F.grid_sample(logits, grid[:, None, None, :], mode="bilinear", padding_mode="border",
                       align_corners=False)[:, 0, 0, 0]  # (B,)
    hit = F.binary_cross_entropy_with_logits(at, torch.ones_like(at), reduction="none")
    center_loss = (hit * ok.float()).sum() / ok.float().sum().clamp(min=1)
    return outside, center_loss


def region_terms(out: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor], no_target: torch.Tensor,
                 mask: torch.Tensor | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """PKS's referent-region map (``region_logits``, (B, 1, h, w) on the heatmap grid) -> (dense, locate).

    mask given (full supervision, (B, 1, S, S) {0, 1}): dense = BCE against the
    mask area-downsampled to the grid (LTS's prior term), locate = ``locate_kl``.
    mask None (clicks): what the box of the corner clicks and the centre click
    say exactly, on ``box_cover``: dense = BoxInst projection against the
    cells the box touches + ``click_mask_terms`` (cells the box does not
    touch are background; the centre click is foreground); locate = the
    softmax over cells against the box's cover, normalised (``grid_kl``).
    locate counts target samples only.
    """
    region = out["region_logits"]
    stride = out["mask_logits"].shape[-1] // region.shape[-1]
    has_target = (~no_target).to(region.dtype)
    if mask is not None:
        target = mask.to(region.dtype)
        return bce_loss(region, area_downsample(target, region.shape[-2:])), locate_kl(region, target, has_target)
    box = targets["box"].to(region.device)
    cover = box_cover(box, region.shape[-2:], stride)  # (B, 1, h, w)
    touched = (cover > 0).float()
    projection = box_projection_loss(region, touched)
    outside = background_bce(region.float(), 1 - touched)
    _, center = click_mask_terms(region, box, targets["center"].to(region.device), stride)
    return projection + outside + center, grid_kl(region, cover, has_target)


def _pks_common(out, batch, targets, with_locate: bool = False):
    """Heatmap focal loss, no-target BCE and (``with_locate``; else None) the locate KL, shared by the
    two PKS losses."""
    heat_logits = out["prior_logits"]
    B = heat_logits.shape[0]
    stride = out["mask_logits"].shape[-1] // heat_logits.shape[-1]
    heat_target = centre_heatmap(targets["center"], targets["box"], heat_logits.shape[-2:], stride)
    heatmap = heatmap_focal_loss(heat_logits, heat_target.to(heat_logits.device))
    no_target = batch.get("no_target")
    no_target = ~targets["valid"] if no_target is None else no_target.bool().view(B)
    nt = F.binary_cross_entropy_with_logits(out["no_target_logits"], no_target.to(out["no_target_logits"].dtype))
    locate = None
    if with_locate:  # the heatmap as a softmax over cells against the normalised Gaussian ("which cell"), targets only
        locate = grid_kl(heat_logits, heat_target.to(heat_logits.device), (~no_target).float())
    return heatmap, nt, no_target, locate


def pks_full_loss(
    out: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    w_heatmap: float = 1.0,
    w_bce: float = 1.0,
    w_dice: float = 1.0,
    w_no_target: float = 0.5,
    w_locate: float = 0.0,
    w_region: float = 1.0,
    w_region_locate: float = 0.5,
) -> Dict[str, torch.Tensor]:
    """PKS with full masks.

    out: PKS's dict (mask_logits (B, 1, S, S), prior_logits (B, 1, h, w) =
      the centre heatmap, no_target_logits (B,)).
    batch: mask (B, 1, S, S) {0, 1}; no_target (B,) bool, optional.
    Terms: heatmap (CenterNet focal loss against Gaussians at the mask's
    interior point, sigma from its box), mask_bce (every sample; pushes a
    no-target sample's mask empty), mask_dice (target samples only),
    no_target (BCE); locate (weight ``w_locate``, off by default: the
    heatmap's softmax over cells against the normalised Gaussian, KL, target
    samples only; see ``lts_loss``); region and region_locate (weights
    ``w_region``, ``w_region_locate``; only for a head with the region map:
    ``region_terms``). The focal heatmap loss is already normalised per
    referent, so locate is off by default (docs/methods/pks.md).
    Returns dict(loss, heatmap, mask_bce, mask_dice, no_target[, locate][, region, region_locate]).
    """
    targets = pks_targets(batch)
    heatmap, nt, no_target, locate = _pks_common(out, batch, targets, with_locate=bool(w_locate))
    mask_logits = out["mask_logits"]
    target = batch["mask"].to(mask_logits.dtype)
    mask_bce = bce_loss(mask_logits, target)
    has_target = (~no_target).to(mask_logits.dtype)
    mask_dice = (dice_loss(mask_logits, target, reduction="none") * has_target).sum() / has_target.sum().clamp(min=1)
    loss = w_heatmap * heatmap + w_bce * mask_bce + w_dice * mask_dice + w_no_target * nt
    parts = {"heatmap": heatmap, "mask_bce": mask_bce, "mask_dice": mask_dice, "no_target": nt}
    if w_locate:
        loss = loss + w_locate * locate
        parts["locate"] = locate
    if "region_logits" in out:
        parts["region"], parts["region_locate"] = region_terms(out, targets, no_target, target)
        loss = loss + w_region * parts["region"] + w_region_locate * parts["region_locate"]
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


def pks_click_loss(
    out: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    w_heatmap: float = 1.0,
    w_projection: float = 1.0,
    w_pairwise: float = 1.0,
    w_no_target: float = 0.5,
    w_outside: float = 1.0,
    w_center: float = 1.0,
    w_locate: float = 0.0,
    w_region: float = 1.0,
    w_region_locate: float = 0.5,
    pairwise_threshold: float = 0.3,
    theta: float = 2.0,
    dilation: int = 2,
) -> Dict[str, torch.Tensor]:
    """PKS with clicks only (never a mask): BoxInst-style weak mask supervision.

    out: PKS's dict, also mask_logits_low (B, 1, S/r, S/r) and image_lab
      (B, 3, S/r, S/r). batch: click_center (B, 2), click_corners (B, 2, 2)
      (NaN for no-target), letterbox (B, 3), no_target (B,) bool.
    Terms: heatmap (focal loss, Gaussian at the centre click, sigma from the
    corner clicks' box); projection (``box_projection_loss`` on the
    full-resolution mask against the box, every sample: a no-target
    sample's empty box pushes its mask empty); pairwise
    (``pairwise_colour_affinity_loss`` on the stride-r logits and LAB image,
    pairs inside the box; BoxInst's warm-up of this term is left out: at
    initialisation the mask is near-constant and the term near 0);
    no_target (BCE); outside and center (``click_mask_terms``: cells outside
    the box are background, the centre click is foreground). The last two
    are additions to BoxInst's pair: both follow from the clicks exactly,
    and give dense gradients where the projection's max passes one pixel
    per row/column (docs/methods/pks.md). locate (weight ``w_locate``, off by default): as in
    ``pks_full_loss``, from the click Gaussian. region and region_locate
    (weights ``w_region``, ``w_region_locate``; only for a head with the
    region map): ``region_terms`` from the clicks. Returns dict(loss, heatmap,
    projection, pairwise, no_target, outside, center[, locate][, region, region_locate]).
    """
    targets = pks_targets(batch)
    heatmap, nt, no_target, locate = _pks_common(out, batch, targets, with_locate=bool(w_locate))
    mask_logits = out["mask_logits"]
    box = targets["box"].to(mask_logits.device)
    projection = box_projection_loss(mask_logits, box_bitmap(box, mask_logits.shape[-2:], 1))
    low = out["mask_logits_low"]
    r = mask_logits.shape[-1] // low.shape[-1]
    pairwise = pairwise_colour_affinity_loss(low, out["image_lab"], box_bitmap(box, low.shape[-2:], r),
                                             pairwise_threshold, theta, dilation)
    outside, center = click_mask_terms(low, box, targets["center"].to(low.device), r)
    loss = (w_heatmap * heatmap + w_projection * projection + w_pairwise * pairwise + w_no_target * nt
            + w_outside * outside + w_center * center)
    parts = {"heatmap": heatmap, "projection": projection, "pairwise": pairwise, "no_target": nt,
             "outside": outside, "center": center}
    if w_locate:
        loss = loss + w_locate * locate
        parts["locate"] = locate
    if "region_logits" in out:
        parts["region"], parts["region_locate"] = region_terms(out, targets, no_target)
        loss = loss + w_region * parts["region"] + w_region_locate * parts["region_locate"]
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}
