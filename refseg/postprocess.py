"""Decoder outputs -> full-resolution masks, points, scores and no-target decisions.

The one post-processing step of refseg: ``Predictor`` (so ``refseg predict``,
the REST API and ``OnnxPredictor``), ``refseg eval``, training's validation
and ``refseg bench`` all call ``postprocess``, so the figures score exactly
what is served.

    out = model.decode(vis, txt, image_index)
    post = postprocess(out["mask_logits"], out["no_target_logits"], (h, w), Letterbox(model.image_size))
    post.masks   # (B, H, W) bool
"""

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from refseg.data.transforms import Letterbox


@dataclass
class Prediction:
    """Post-processed outputs of N expressions about one (H, W) image; what ``Predictor.predict`` returns.

    masks:          (N, H, W) bool, ``logit > logit(mask_threshold)``; empty where ``no_target``.
    scores:         (N,) float32 in [0, 1], mean foreground probability over the mask's pixels (0 for an
                    empty mask).
    no_target:      (N,) bool, the model's decision that the expression names nothing (``no_target_logit > 0``).
    no_target_prob: (N,) float32 in [0, 1], sigmoid of the no-target logit.
    logits:         (N, H, W) float32, the un-letterboxed mask logits at full resolution.
    points:         (N, 2) int64, x, y of the argmax of ``logits`` (first one on ties).
    """

    masks: np.ndarray
    scores: np.ndarray
    no_target: np.ndarray
    no_target_prob: np.ndarray
    logits: np.ndarray
    points: np.ndarray


def logit_threshold(mask_threshold: float) -> float:
    """The logit whose probability is ``mask_threshold`` (in (0, 1)); 0.5 -> 0.0 exactly."""
    t = float(mask_threshold)
    if not 0.0 < t < 1.0:
        raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold!r}")
    return math.log(t / (1.0 - t))


def postprocess(mask_logits: torch.Tensor, no_target_logits: torch.Tensor, orig_hw: Tuple[int, int],
                letterbox: Letterbox, mask_threshold: float = 0.5) -> Prediction:
    """Decoder outputs of B expressions about one image -> ``Prediction`` at the image's full resolution.

    mask_logits: (B, 1, S, S) float tensor (any float dtype, any device), S = letterbox.size.
    no_target_logits: (B,) float tensor.
    orig_hw: (H, W) of the original image.
    letterbox: the Letterbox the image was fitted with.
    mask_threshold: probability above which a pixel is foreground, in (0, 1).

    The logits are un-letterboxed with ``letterbox.invert`` (padding cropped,
    one bilinear resize); the rest runs in numpy.
    """
    threshold = logit_threshold(mask_threshold)
    h, w = int(orig_hw[0]), int(orig_hw[1])
    b = int(mask_logits.shape[0])
    if b == 0:
        return Prediction(np.zeros((0, h, w), bool), np.zeros(0, np.float32), np.zeros(0, bool),
                             np.zeros(0, np.float32), np.zeros((0, h, w), np.float32), np.zeros((0, 2), np.int64))
    nt_logits = no_target_logits.detach().float().cpu().numpy().reshape(b)  # (B,)
    no_target = nt_logits > 0  # (B,)
    logits = letterbox.invert(mask_logits.detach()[:, 0].float(), (h, w)).cpu().numpy()  # (B, H, W)
    masks = logits > threshold  # (B, H, W)
    masks[no_target] = False
    flat = logits.reshape(b, -1).argmax(1)  # (B,)
    points = np.stack([flat % w, flat // w], 1).astype(np.int64)  # (B, 2) x, y
    scores = np.zeros(b, np.float32)
    for i in np.flatnonzero(masks.reshape(b, -1).any(1)):
        scores[i] = _sigmoid(logits[i][masks[i]]).mean(dtype=np.float32)
    return Prediction(masks, scores, no_target, _sigmoid(nt_logits), logits, points)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic function, elementwise (exp overflow gives 0 quietly)."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x, dtype=np.float32))).astype(np.float32, copy=False)
