"""The loss pieces the methods share (Dice, BCE, focal, heatmap focal, InfoNCE). Logits in, scalars out.

Each method's own loss lives with it: refseg/methods/<name>/loss.py.

Conventions: ``logits`` are raw (pre-sigmoid) scores; ``targets`` are float
in [0, 1] of the same shape (soft targets allowed unless said otherwise).
Per-sample losses reduce over every non-batch dimension; ``reduction`` is
"mean" (over the batch), "sum" or "none" (per sample, shape (B,)).
"""

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


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
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


def info_nce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each row of ``logits`` (B, M) against the column ``target`` (B,) long.

    valid: (B, M) bool, candidates each row may choose from (the target must
    be valid); None = all. Rows are averaged; 0 (with a graph) for B = 0.
    """
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target)
