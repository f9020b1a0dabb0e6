"""LTS's training loss (full masks) and its locate term. Design reasoning: docs/methods/lts.md."""

from typing import Dict

import torch
import torch.nn.functional as F

from refseg.losses import area_downsample, bce_loss, dice_loss


def lts_loss(
    out: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    w_bce: float = 1.0,
    w_dice: float = 1.0,
    w_prior: float = 1.0,
    w_no_target: float = 0.5,
    w_locate: float = 0.5,
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
      locate      (weight ``w_locate``; 0 turns it off) KL divergence from the
                  prior's softmax over its grid cells to the referent's area
                  distribution on that grid (covered fraction per cell,
                  normalised to sum 1), target samples only; 0 when the
                  prediction puts its mass exactly on the referent's cells.
                  Unlike prior_bce, a mean over all cells in which a 15-px
                  referent is one cell of 400, every sample weighs the same
                  whatever the referent's size: it is a "which object"
                  classification, the term that PointM on small referents
                  needs (docs/methods/lts.md).
    Returns dict(loss, mask_bce, mask_dice, prior_bce, no_target[, locate]); ``loss``
    is the weighted sum, the others are detached for logging.
    """
    mask_logits = out["mask_logits"]
    target = batch["mask"].to(mask_logits.dtype)
    B = mask_logits.shape[0]
    no_target = batch.get("no_target")
    if no_target is None:
        no_target = torch.zeros(B, dtype=torch.bool, device=mask_logits.device)
    no_target = no_target.bool().view(B)

    mask_bce = bce_loss(mask_logits, target)
    has_target = (~no_target).to(mask_logits.dtype)  # (B,)
    mask_dice = (dice_loss(mask_logits, target, reduction="none") * has_target).sum() / has_target.sum().clamp(min=1)
    prior_logits = out["prior_logits"]
    prior_bce = bce_loss(prior_logits, area_downsample(target, prior_logits.shape[-2:]))
    nt = F.binary_cross_entropy_with_logits(out["no_target_logits"], no_target.to(mask_logits.dtype))

    loss = w_bce * mask_bce + w_dice * mask_dice + w_prior * prior_bce + w_no_target * nt
    parts = {"mask_bce": mask_bce, "mask_dice": mask_dice, "prior_bce": prior_bce, "no_target": nt}
    if w_locate:
        locate = locate_kl(prior_logits, target, has_target)
        loss = loss + w_locate * locate
        parts["locate"] = locate
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


def locate_kl(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """KL(q || softmax(logits)) over the cells of each sample, weighted mean over samples.

    logits: (B, 1, h, w); target: (B, 1, S, S) {0, 1} mask, area-downsampled
    to (h, w) and normalised per sample into q; weight: (B,) (0 for samples
    without a referent: an empty mask gives no distribution). A scalar.
    """
    return grid_kl(logits, area_downsample(target, logits.shape[-2:]), weight)


def grid_kl(logits: torch.Tensor, mass: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """KL(q || softmax(logits over the h*w cells)), q = mass normalised per sample; weighted mean.

    logits, mass: (B, 1, h, w), mass >= 0; weight: (B,). Samples whose mass
    sums to 0 are left out whatever their weight. A scalar (0 when no sample
    counts).
    """
    q = mass.flatten(1).float()  # (B, h*w)
    total = q.sum(1, keepdim=True)
    weight = weight.float().view(-1) * (total.squeeze(1) > 0).float()
    q = q / total.clamp(min=1e-12)
    logp = torch.log_softmax(logits.flatten(1).float(), dim=1)
    kl = (q * (torch.log(q.clamp(min=1e-12)) - logp)).sum(1)  # (B,)
    return (kl * weight).sum() / weight.sum().clamp(min=1)
