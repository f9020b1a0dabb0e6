"""load_image_rgb: every PIL mode and array layout to HWC uint8 RGB."""

import numpy as np
import pytest
from PIL import Image

from refseg.data.image import ImageReadError, load_image_rgb


def _check(out, shape):
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == shape
    assert out.flags["C_CONTIGUOUS"]


def test_rgb_path_str_and_pil(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(a), a):
        out = load_image_rgb(src)
        _check(out, (5, 7, 3))
        np.testing.assert_array_equal(out, a)


def test_rgba_is_composited_over_black():
    a = np.array([[[100, 200, 50, 128], [10, 20, 30, 0], [7, 8, 9, 255]]], dtype=np.uint8)  # (1, 3, 4)
    expected = np.array([[[50, 100, 25], [0, 0, 0], [7, 8, 9]]], dtype=np.uint8)  # round(c * a / 255)
    np.testing.assert_array_equal(load_image_rgb(a), expected)
    np.testing.assert_array_equal(load_image_rgb(Image.fromarray(a, "RGBA")), expected)


def test_la_and_grey_modes():
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(load_image_rgb(la)[0], [[200, 200, 200], [0, 0, 0]])
    grey = np.array([[0, 128, 255]], dtype=np.uint8)
    for src in (Image.fromarray(grey, "L"), grey, grey[:, :, None]):
        np.testing.assert_array_equal(load_image_rgb(src)[0], [[0] * 3, [128] * 3, [255] * 3])
    one = Image.fromarray(np.array([[True, False]]))
    assert one.mode == "1"
    np.testing.assert_array_equal(load_image_rgb(one)[0], [[255] * 3, [0] * 3])


def test_palette_with_and_without_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    np.testing.assert_array_equal(load_image_rgb(p)[0], [[255, 0, 0], [0, 0, 255]])
    p.info["transparency"] = 0  # palette index 0 is transparent -> black
    np.testing.assert_array_equal(load_image_rgb(p)[0], [[0, 0, 0], [0, 0, 255]])


def test_sixteen_bit_is_scaled_by_257(tmp_path):
    v = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
    expected = [0, 0, 1, 1, 128, 255]
    Image.fromarray(v).save(tmp_path / "16.png")
    for src in (v, Image.fromarray(v), tmp_path / "16.png", Image.fromarray(v.astype(np.int32))):
        out = load_image_rgb(src)
        _check(out, (1, 6, 3))
        np.testing.assert_array_equal(out[0, :, 0], expected)
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    assert Image.fromarray(v.astype(np.int32)).mode == "I"


def test_float_in_unit_range():
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(load_image_rgb(f)[0, :, 1], [0, 128, 255])
    np.testing.assert_array_equal(load_image_rgb(Image.fromarray(f, "F"))[0, :, 2], [0, 128, 255])
    rgb = np.full((2, 2, 3), 0.25)
    assert (load_image_rgb(rgb) == 64).all()
    with pytest.raises(ImageReadError, match=r"\[0, 1\]"):
        load_image_rgb(np.full((2, 2, 3), 200.0))
    with pytest.raises(ImageReadError, match="NaN"):
        load_image_rgb(np.full((2, 2), np.nan))


def test_cmyk_and_ycbcr_convert_like_pil():
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8))
    for mode in ("CMYK", "YCbCr"):
        img = rgb.convert(mode)
        np.testing.assert_array_equal(load_image_rgb(img), np.asarray(img.convert("RGB")))


def test_exif_orientation(tmp_path):
    a = np.zeros((10, 20, 3), dtype=np.uint8)  # stored: 10 rows, 20 columns
    a[:, :5] = 255  # white on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image_rgb(tmp_path / "r.jpg")
    _check(out, (20, 10, 3))
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the white band is now at the top
    _check(load_image_rgb(tmp_path / "r.jpg", exif=False), (10, 20, 3))


def test_array_layout_errors():
    with pytest.raises(ImageReadError, match="channel-first"):
        load_image_rgb(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageReadError, match=r"\(H, W\)"):
        load_image_rgb(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ImageReadError, match="int64"):
        load_image_rgb(np.full((2, 2), 300, dtype=np.int64))
    np.testing.assert_array_equal(load_image_rgb(np.full((1, 1), 7, dtype=np.int64)), [[[7, 7, 7]]])
    with pytest.raises(TypeError):
        load_image_rgb(42)


def test_file_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image_rgb(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        load_image_rgb(tmp_path / "bad.jpg")
    good = tmp_path / "trunc.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 9).save(good)
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="trunc.png"):
        load_image_rgb(good)


def _jpeg_with_exif(pixels: np.ndarray, ifd_entries: list) -> bytes:
    """A JPEG whose APP1 block holds a big-endian EXIF IFD0 with the given (tag, type, count, 4-byte value) entries."""
    import io
    import struct

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    jpg = buf.getvalue()
    ifd = struct.pack(">H", len(ifd_entries)) + b"".join(
        struct.pack(">HHI", tag, typ, count) + value for tag, typ, count, value in ifd_entries) + bytes(4)
    payload = b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpg[2:]


def test_corrupt_exif_keeps_the_pixels(tmp_path):
    a = np.zeros((10, 20, 3), dtype=np.uint8)
    a[:, :5] = 255  # white on the stored left
    # Orientation 6 (rotate), then FillOrder (a SHORT tag) stored as the ASCII text "Cam": Pillow parses it,
    # but cannot write the block back, which ImageOps.exif_transpose does after rotating (struct.error).
    bad = [(0x0112, 3, 1, b"\0\x06\0\0"), (0x010A, 2, 4, b"Cam\0")]
    path = tmp_path / "corrupt_exif.jpg"
    path.write_bytes(_jpeg_with_exif(a, bad))
    out = load_image_rgb(path)
    _check(out, (20, 10, 3))  # the orientation it could read is applied
    assert out[:5].mean() > 200 and out[-5:].mean() < 50
    # orientation values that are not 1..8 or not numbers: the stored pixels, unrotated
    for entry in [(0x0112, 3, 1, b"\0\x09\0\0"), (0x0112, 2, 2, b"6\0\0\0"), (0x0112, 3, 0xFFFFFFFF, bytes(4))]:
        path.write_bytes(_jpeg_with_exif(a, [entry]))
        _check(load_image_rgb(path), (10, 20, 3))
    path.write_bytes(_jpeg_with_exif(a, []))
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"Exif\0\0MM\0*", b"Exif\0\0MM\0*\xff\xff\xff", 1))  # IFD offset past the end
    _check(load_image_rgb(path), (10, 20, 3))


def test_sixteen_bit_and_alpha_rounding_exact_for_every_value():
    x = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    np.testing.assert_array_equal(load_image_rgb(x)[..., 0], np.floor(x / 257 + 0.5).astype(np.uint8))
    rgb, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([rgb, rgb, rgb, alpha], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(load_image_rgb(rgba)[..., 1], np.floor(rgb * alpha / 255 + 0.5).astype(np.uint8))
