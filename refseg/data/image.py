"""Read any image into one form: an HWC uint8 RGB numpy array.

`load_image_rgb` is the single entry point every reader in refseg goes
through (data sets, the Predictor, the CLI), so that a PNG with an alpha
channel, a 16-bit TIFF or a phone photo with an EXIF rotation all reach a
model the same way.

Conventions (the choices a reader may ask about):
- Alpha (RGBA, LA, palette with transparency, 4-channel arrays) is
  composited over black: out = round(rgb * alpha / 255). Opaque images are
  unchanged; fully transparent pixels become black instead of showing
  whatever colour happens to be stored under them.
- 16-bit data (uint16 arrays, PIL modes I;16*, and mode I, which is what
  Pillow gives for 16-bit PNG/TIFF) is mapped 0..65535 -> 0..255 by
  dividing by 257 and rounding, so 65535 -> 255 and 257 -> 1 exactly.
- Float data (float arrays, PIL mode F) must lie in [0, 1]; it is scaled
  by 255 and rounded. Anything outside [0, 1] (e.g. floats in 0..255) is an
  error rather than a silent clip.
- EXIF orientation is applied (PIL.ImageOps.exif_transpose) unless
  `exif=False`; ReferData uses `exif=False` as a fallback for annotations
  that were drawn on the stored, un-rotated pixels.
- Files are checked before their pixels are decoded: an image over
  `max_pixels` (default `MAX_PIXELS`, Pillow's own decompression-bomb
  limit) is refused from its header alone, so a small file that claims
  to be 50 000 x 50 000 costs nothing. Every error raised for a file
  names the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # ~179 MP: where Pillow itself refuses an image as a decompression bomb


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded, or an array has an unusable layout."""


def load_image_rgb(src: ImageSource, exif: bool = True, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return `src` as an RGB image.

    Args:
        src: a path (str or os.PathLike), a PIL image of any mode, or a numpy
            array shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with dtype
            uint8 (0..255), uint16 (0..65535), bool, or float in [0, 1].
        exif: apply the EXIF orientation tag of files and PIL images.
        max_pixels: refuse files with more pixels than this (checked from
            the header, before decoding).

    Returns:
        (H, W, 3) uint8 C-contiguous array, values in [0, 255].

    Raises:
        FileNotFoundError: the path does not exist (the message names it).
        ImageReadError: the file cannot be decoded, holds more than
            `max_pixels` pixels, or the array/mode is unusable.
    """
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        img = _open(path, max_pixels)
        try:
            return _from_pil(img, exif=exif)
        except (ImageReadError, OSError, ValueError, SyntaxError) as e:  # a mode or EXIF block Pillow cannot handle
            raise ImageReadError(f"cannot read image {path}: {e}") from None
    if isinstance(src, Image.Image):
        return _from_pil(src, exif=exif)
    if isinstance(src, np.ndarray):
        return _from_array(src)
    raise TypeError(f"load_image_rgb expects a path, a PIL image or a numpy array, got {type(src).__name__}")


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageReadError(f"cannot read image {path}: not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"cannot read image {path}: the file is empty (0 bytes)")
    try:
        img = Image.open(path)
        w, h = img.size
        if w * h > max_pixels:
            raise ImageReadError(f"cannot read image {path}: {w}x{h} = {w * h / 1e6:.0f} MP is over the limit "
                                 f"of {max_pixels / 1e6:.0f} MP (max_pixels); refused before decoding")
        img.load()
    except Image.DecompressionBombError as e:  # over Pillow's own limit, when max_pixels is set higher
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    return img


def _from_pil(img: Image.Image, exif: bool) -> np.ndarray:
    if exif:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return _from_pil(img, exif=False)
    if mode in _ALPHA_MODES:
        return _from_array(np.asarray(img.convert("RGBA")))
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.int64)
        return _from_array(np.clip(a, 0, 65535).astype(np.uint16))
    if mode == "F":
        return _from_array(np.asarray(img, dtype=np.float32))
    if mode in ("1", "L"):
        return _from_array(np.asarray(img.convert("L"), dtype=np.uint8))
    try:
        rgb = img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageReadError(f"cannot convert PIL mode {mode!r} to RGB: {e}") from e
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Map one array of any supported dtype to uint8 with the module's rules."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return ((a.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(a / 257)
    if np.issubdtype(a.dtype, np.floating):
        if a.size and not np.isfinite(a).all():
            raise ImageReadError("float image holds NaN or infinite values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ImageReadError(f"float image values must lie in [0, 1]; got [{lo:g}, {hi:g}]")
        return np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ImageReadError(
                f"{a.dtype} image values must lie in [0, 255] (use uint16 for 16-bit data); got [{lo}, {hi}]"
            )
        return a.astype(np.uint8)
    raise ImageReadError(f"unsupported image dtype {a.dtype}")


def _from_array(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] > 4:
        raise ImageReadError(f"image array of shape {a.shape} looks channel-first; pass (H, W, C)")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageReadError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {a.shape}")
    a = _to_uint8(a)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=2)  # (H, W, 1) -> (H, W, 3)
    elif a.shape[-1] == 4:
        rgb = a[:, :, :3].astype(np.uint32)
        alpha = a[:, :, 3:].astype(np.uint32)
        a = ((rgb * alpha * 2 + 255) // 510).astype(np.uint8)  # round(rgb * alpha / 255)
    return np.ascontiguousarray(a)
