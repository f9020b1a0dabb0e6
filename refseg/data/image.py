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
- EXIF orientation is applied unless `exif=False`; ReferData uses
  `exif=False` as a fallback for annotations that were drawn on the
  stored, un-rotated pixels. An EXIF block that cannot be parsed (or an
  orientation value outside 1..8) leaves the pixels as they are stored:
  the image is not refused for its metadata.
- Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF, MPO, ICO,
  ...) give their first frame; other frames are never decoded.
- Files are checked before their pixels are decoded: an image over
  `max_pixels` (default `MAX_PIXELS`, Pillow's own decompression-bomb
  limit) is refused from its header alone, so a small file that claims
  to be 50 000 x 50 000 costs nothing.

Files of any format Pillow opens go through `read_image` (paths, bytes or
binary file objects; `load_image_rgb` calls it for paths). A crafted or
damaged file ends in `ImageReadError` naming the file, whatever Pillow or
one of its format plugins raised while parsing or decoding it (OSError,
SyntaxError, struct.error, IndexError, EOFError, MemoryError, ...); the
subclasses say why, for callers that answer differently (the server's
HTTP status): `ImageEmptyError`, `ImageFormatError` (not an image Pillow
can identify), `ImageTooLargeError` (over `max_pixels`).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]
FileSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # ~179 MP: where Pillow itself refuses an image as a decompression bomb
# Pillow warns about what it tolerates in odd files (corrupt EXIF, truncated tags, a size over its
# bomb-warning limit): refseg decides from max_pixels and reports what it refuses, and a warning printed
# from a worker would land mid-line of a progress bar. Filters are process-wide; catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", module=r"PIL\.")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSE = {  # EXIF orientation -> the PIL transpose that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded, or an array has an unusable layout."""


class ImageEmptyError(ImageReadError):
    """The image file holds no bytes."""


class ImageFormatError(ImageReadError):
    """The file is not in any image format Pillow can identify."""


class ImageTooLargeError(ImageReadError):
    """The image's header claims more pixels than allowed; nothing was decoded."""


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
        return read_image(src, exif=exif, max_pixels=max_pixels)
    if isinstance(src, Image.Image):
        try:
            return _from_pil(src, exif=exif)
        except ImageReadError:
            raise
        except Exception as e:  # a lazily loaded PIL image whose data Pillow cannot decode
            raise ImageReadError(f"cannot decode the {src.format or 'PIL'} image: {_why(e)}") from None
    if isinstance(src, np.ndarray):
        return _from_array(src)
    raise TypeError(f"load_image_rgb expects a path, a PIL image or a numpy array, got {type(src).__name__}")


def read_image(src: FileSource, exif: bool = True, max_pixels: int = MAX_PIXELS,
               name: Optional[str] = None) -> np.ndarray:
    """Decode an image file of any format Pillow opens to (H, W, 3) uint8 RGB.

    Args:
        src: a path, the file's bytes, or a binary file object (read from its start).
        exif: apply the EXIF orientation tag (an unreadable EXIF block is ignored).
        max_pixels: refuse images with more pixels than this, from the header.
        name: what error messages call the file (default: the path, or "image data").

    Returns:
        (H, W, 3) uint8 C-contiguous array, the first frame of multi-frame files.

    Raises:
        FileNotFoundError: a path that does not exist.
        ImageReadError (or a subclass, see the module docstring): anything
            else that stops the file from being read, naming it.
    """
    img, name = _open(src, max_pixels, name)
    try:
        img.load()
        if img.width * img.height > max_pixels:  # a plugin that grew the image while loading (ICO, ICNS)
            raise ImageTooLargeError(f"cannot read image {name}: {img.width}x{img.height} is over the limit "
                                     f"of {max_pixels / 1e6:g} MP (max_pixels)")
        return _from_pil(img, exif=exif)
    except ImageReadError as e:
        raise type(e)(_named(str(e), name)) from None
    except Exception as e:  # Pillow's plugins raise many types on crafted files; all mean "cannot decode"
        raise ImageReadError(f"cannot read image {name}: {_why(e)}") from None
    finally:
        img.close()


def open_image(src: FileSource, max_pixels: int = MAX_PIXELS, name: Optional[str] = None) -> Image.Image:
    """Identify an image file and check its size from the header alone; no pixel is decoded.

    Args and errors as `read_image`. Returns the opened PIL image (lazy; the
    caller closes it). Cheap enough to run on an upload before queueing it.
    """
    return _open(src, max_pixels, name)[0]


def _open(src: FileSource, max_pixels: int, name: Optional[str]) -> tuple:
    """(PIL image with only its header read, the name to use in messages)."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = str(path) if name is None else name
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {name}")
        if not path.is_file():
            raise ImageReadError(f"cannot read image {name}: not a regular file")
        if path.stat().st_size == 0:
            raise ImageEmptyError(f"cannot read image {name}: the file is empty (0 bytes)")
        fp = path
    else:
        name = "image data" if name is None else name
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
        fp.seek(0)
        if not fp.read(1):
            raise ImageEmptyError(f"cannot read image {name}: the file is empty (0 bytes)")
        fp.seek(0)
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageFormatError(f"cannot read image {name}: cannot identify image file "
                               "(no format Pillow reads)") from None
    except Image.DecompressionBombError as e:  # over Pillow's own limit, when max_pixels is set higher
        raise ImageTooLargeError(f"cannot read image {name}: refused before decoding: {e}") from None
    except Exception as e:  # a plugin that recognised the file but failed on its header
        raise ImageReadError(f"cannot read image {name}: {_why(e)}") from None
    try:
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageReadError(f"cannot read image {name}: its header says {w}x{h}, no pixels")
        if w * h > max_pixels:
            raise ImageTooLargeError(f"cannot read image {name}: {w}x{h} = {w * h / 1e6:.3g} MP is over the limit "
                                     f"of {max_pixels / 1e6:g} MP (max_pixels); refused before decoding")
    except BaseException:
        img.close()
        raise
    return img, name


def _named(msg: str, name: str) -> str:
    return msg if name in msg else f"cannot read image {name}: {msg}"


def _why(e: BaseException) -> str:
    msg = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of a PIL image; 1 when absent, unreadable or out of range."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block: keep the stored pixels
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _from_pil(img: Image.Image, exif: bool) -> np.ndarray:
    if exif:
        orientation = _orientation(img)
        if orientation != 1:
            img = img.transpose(_TRANSPOSE[orientation])
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
        x = a.astype(np.uint32) + 128
        x -= x >> 8
        x >>= 8  # round(a / 257), exactly, for every uint16 (no division: fast on 100-MP images)
        return x.astype(np.uint8)
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
        x = a[:, :, :3].astype(np.uint16)
        x *= a[:, :, 3:]
        x += 128
        x += x >> 8
        x >>= 8  # round(rgb * alpha / 255), exactly, for every uint8 pair, in uint16 (no division)
        a = x.astype(np.uint8)
    return np.ascontiguousarray(a)
