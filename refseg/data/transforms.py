"""Letterbox: fit an image into an S x S square and map predictions back.

The longer side is resized to S, the aspect ratio is kept, and the short
side is padded with zeros on the right / bottom, so the image content always
starts at pixel (0, 0) of the square. Points use pixel-index coordinates
(pixel i covers [i - 0.5, i + 0.5)), mapped centre to centre, which is the
convention of bilinear resizing with align_corners=False.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class LetterboxParams:
    """Geometry of one letterboxed image.

    scale: size / max(h, w), the nominal resize factor.
    new_h, new_w: size of the resized content, pixels (<= size).
    pad_x, pad_y: zero padding added on the right / bottom, pixels.
    orig_h, orig_w: size of the original image, pixels.
    """

    scale: float
    new_h: int
    new_w: int
    pad_x: int
    pad_y: int
    orig_h: int
    orig_w: int

    def as_tuple(self) -> tuple[float, float, float]:
        """(scale, pad_x, pad_y), the `letterbox` entry of a data set item."""
        return (self.scale, float(self.pad_x), float(self.pad_y))


class Letterbox:
    """Resize the longer side to `size`, keep the aspect ratio, pad right/bottom with zeros."""

    def __init__(self, size: int):
        if int(size) < 1:
            raise ValueError(f"letterbox size must be positive, got {size}")
        self.size = int(size)

    def params(self, h: int, w: int) -> LetterboxParams:
        """Geometry for an (h, w) image; both sides must be positive."""
        if h < 1 or w < 1:
            raise ValueError(f"image size must be positive, got {h}x{w}")
        scale = self.size / max(h, w)
        new_h = min(self.size, max(1, round(h * scale)))
        new_w = min(self.size, max(1, round(w * scale)))
        return LetterboxParams(scale, new_h, new_w, self.size - new_w, self.size - new_h, h, w)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (S, S, 3) uint8; bilinear (antialiased when shrinking), zero padding."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"apply_image expects (H, W, 3) uint8, got {image.shape} {image.dtype}")
        p = self.params(*image.shape[:2])
        out = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        resized = Image.fromarray(image).resize((p.new_w, p.new_h), Image.Resampling.BILINEAR)
        out[: p.new_h, : p.new_w] = np.asarray(resized)
        return out

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) {0,1} mask -> (S, S) uint8 {0,1}.

        An output pixel is on when the input mask covers at least half of
        its area (box filter, exact area coverage), so thin parts survive
        shrinking no worse than nearest neighbour and the mask area is kept.
        """
        if mask.ndim != 2:
            raise ValueError(f"apply_mask expects an (H, W) mask, got {mask.shape}")
        p = self.params(*mask.shape)
        coverage = Image.fromarray(np.asarray(mask, dtype=np.float32)).resize(
            (p.new_w, p.new_h), Image.Resampling.BOX
        )
        out = np.zeros((self.size, self.size), dtype=np.uint8)
        out[: p.new_h, : p.new_w] = np.asarray(coverage) >= 0.5
        return out

    def apply_points(self, points: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
        """(..., 2) [x, y] pixel coordinates of an (H, W) image -> (..., 2) float64 letterboxed."""
        p = self.params(*orig_hw)
        pts = np.asarray(points, dtype=np.float64)
        sx, sy = p.new_w / p.orig_w, p.new_h / p.orig_h
        return np.stack([(pts[..., 0] + 0.5) * sx - 0.5, (pts[..., 1] + 0.5) * sy - 0.5], axis=-1)

    def invert(self, x, orig_hw):
        """(..., S, S) float tensor (logits or probabilities) -> (..., H, W), same dtype.

        Crops the padding away, then resizes bilinearly (align_corners=False).
        """
        import torch.nn.functional as F

        h, w = int(orig_hw[0]), int(orig_hw[1])
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"invert expects (..., {self.size}, {self.size}), got {tuple(x.shape)}")
        p = self.params(h, w)
        lead = x.shape[:-2]
        crop = x[..., : p.new_h, : p.new_w].reshape(-1, 1, p.new_h, p.new_w)  # (N, 1, new_h, new_w)
        dtype = crop.dtype
        if not crop.is_floating_point():
            raise TypeError(f"invert expects a floating tensor, got {dtype}")
        if (p.new_h, p.new_w) == (h, w):  # no resize (an S-pixel side): a bilinear resize to the same size is a copy
            return crop.reshape(*lead, h, w).clone()
        out = F.interpolate(crop.float(), size=(h, w), mode="bilinear", align_corners=False)  # (N, 1, H, W)
        return out.to(dtype).reshape(*lead, h, w)
