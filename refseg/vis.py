"""Overlays: a mask tinted over its image, its outline, and the expression as a caption."""

import os
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(255, 64, 64), (64, 160, 255), (80, 220, 100), (255, 200, 40), (200, 90, 255), (255, 140, 40)]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a (H, W) bool mask: inside, with a 4-neighbour outside."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    captions: Sequence[str] = (),
    colors: Optional[Sequence[Tuple[int, int, int]]] = None,
    alpha: float = 0.45,
    point: Optional[Sequence[Tuple[int, int]]] = None,
) -> Image.Image:
    """Draw masks over an image.

    image: (H, W, 3) uint8 RGB. masks: each (H, W) bool. captions: one line
    per mask, drawn in the mask's colour on a dark band under the image.
    point: optional (x, y) per mask, drawn as a small cross.
    """
    colors = list(colors or [PALETTE[i % len(PALETTE)] for i in range(len(masks))])
    out = image.astype(np.float32).copy()
    for mask, color in zip(masks, colors):
        m = np.asarray(mask, dtype=bool)
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
        out[_outline(m)] = color
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for (x, y), color in zip(point or [], colors):
        draw.line([(x - 5, y), (x + 5, y)], fill=color, width=2)
        draw.line([(x, y - 5), (x, y + 5)], fill=color, width=2)
    if not captions:
        return canvas
    font = ImageFont.load_default()
    line_h = 14
    band = Image.new("RGB", (canvas.width, line_h * len(captions) + 6), (20, 20, 20))
    bd = ImageDraw.Draw(band)
    for i, (text, color) in enumerate(zip(captions, colors)):
        bd.text((4, 3 + i * line_h), text, fill=color, font=font)
    full = Image.new("RGB", (canvas.width, canvas.height + band.height))
    full.paste(canvas, (0, 0))
    full.paste(band, (0, canvas.height))
    return full


def save_image_atomic(img: Image.Image, path: os.PathLike) -> None:
    """Write an image in the format its suffix names, next to its destination first, then rename:
    no half-written file (refseg.outputs.save_image)."""
    from refseg.outputs import save_image

    save_image(img, path)
