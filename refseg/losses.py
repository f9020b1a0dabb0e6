"""Every loss refseg trains with. Logits in, scalars out.

Conventions: ``logits`` are raw (pre-sigmoid) scores; ``targets`` are float
in [0, 1] of the same shape (soft targets allowed unless said otherwise).
Per-sample losses reduce over every non-batch dimension; ``reduction`` is
"mean" (over the batch), "sum" or "none" (per sample, shape (B,)).
"""

from typing import Dict

import torch
import torch.nn.functional as F


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss per sample: 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth), p = sigmoid(logits).

    logits, targets: (B, ...). Perfect logits give ~0, also for an empty
    target predicted empty (thanks to ``smooth``).
    """
    p = torch.sigmoid(logits).flatten(1)  # (B, P)
    t = targets.to(p.dtype).flatten(1)  # (B, P)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)  # (B,)
    return _reduce(1 - dice, reduction)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over every element of a sample."""
    per_elem = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return _reduce(per_elem.flatten(1).mean(1), reduction)


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """RetinaNet focal loss, averaged over the elements of each sample.

    FL = -alpha_t (1 - p_t)^gamma log(p_t), p_t = p if t = 1 else 1 - p,
    alpha_t = alpha if t = 1 else 1 - alpha (alpha < 0 disables weighting).
    """
    t = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return _reduce(loss.flatten(1).mean(1), reduction)


def heatmap_focal_loss(
    logits: torch.Tensor, heatmap: torch.Tensor, alpha: float = 2.0, beta: float = 4.0, eps: float = 1e-6
) -> torch.Tensor:
    """CenterNet penalty-reduced focal loss for Gaussian centre heatmaps (a scalar).

    logits: (B, 1, h, w); heatmap: (B, 1, h, w) in [0, 1], exactly 1 at each
    centre. Peaks: -(1 - p)^alpha log(p); elsewhere:
    -(1 - y)^beta p^alpha log(1 - p). Summed and divided by the number of
    peaks in the batch (at least 1), as CenterNet does; a sample without a
    peak (no target) only contributes its negative term.
    """
    y = heatmap.to(logits.dtype)
    pos = (y >= 1 - eps).to(logits.dtype)
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = -((1 - p) ** alpha) * log_p * pos
    neg_loss = -((1 - y) ** beta) * p**alpha * log_not_p * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def area_downsample(mask: torch.Tensor, size) -> torch.Tensor:
    """(B, 1, S, S) {0, 1} mask -> (B, 1, h, w) soft target: the covered fraction of each cell."""
    return F.adaptive_avg_pool2d(mask.float(), size)


def lts_loss(
    out: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    w_bce: float = 1.0,
    w_dice: float = 1.0,
    w_prior: float = 1.0,
    w_no_target: float = 0.5,
) -> Dict[str, torch.Tensor]:
    """The LTS training loss.

    out: the model's dict (mask_logits (B, 1, S, S), prior_logits
      (B, 1, h, w), no_target_logits (B,)).
    batch: mask (B, 1, S, S) float {0, 1}; no_target (B,) bool, optional
      (all False when absent).
    Terms:
      mask_bce    BCE at full resolution over *every* sample; a no-target
                  sample's mask is all zeros, so this is what pushes its
                  predicted mask empty.
      mask_dice   Dice over target samples only (a no-target sample has no
                  region to overlap; 0 when the batch has none).
      prior_bce   BCE of the position prior against the mask area-downsampled
                  to the prior grid (soft targets: covered fraction per
                  cell), every sample (no-target: an all-zero target).
      no_target   BCE of the no-target logit against ``no_target``.
    Returns dict(loss, mask_bce, mask_dice, prior_bce, no_target); ``loss``
    is the weighted sum, the others are detached for logging.
    """
    mask_logits = out["mask_logits"]
    target = batch["mask"].to(mask_logits.dtype)
    B = mask_logits.shape[0]
    no_target = batch.get("no_target")
    no_target = torch.zeros(B, dtype=torch.bool, device=mask_logits.device) if no_target is None else no_target.bool().view(B)

    mask_bce = bce_loss(mask_logits, target)
    has_target = (~no_target).to(mask_logits.dtype)  # (B,)
    mask_dice = (dice_loss(mask_logits, target, reduction="none") * has_target).sum() / has_target.sum().clamp(min=1)
    prior_logits = out["prior_logits"]
    prior_bce = bce_loss(prior_logits, area_downsample(target, prior_logits.shape[-2:]))
    nt = F.binary_cross_entropy_with_logits(out["no_target_logits"], no_target.to(mask_logits.dtype))

    loss = w_bce * mask_bce + w_dice * mask_dice + w_prior * prior_bce + w_no_target * nt
    parts = {"mask_bce": mask_bce, "mask_dice": mask_dice, "prior_bce": prior_bce, "no_target": nt}
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}
