"""Crafted and damaged image files of every format Pillow opens: an RGB array or ImageReadError, nothing else.

The seed corpus holds one small valid file per format Pillow can write
here (several modes for the formats that store them), hand-made headers
for the formats Pillow only reads, and files whose headers lie (a 100 x
100 image claiming 65535 x 65535, a TIFF chaining thousands of IFDs, a GIF
of thousands of frames). Each seed is then damaged in seeded ways:
truncated, bytes flipped, header fields set to extreme values, chunks
dropped or repeated.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from refseg.data.image import (ImageEmptyError, ImageFormatError, ImageReadError, ImageTooLargeError,
                               load_image_rgb, read_image)

pytestmark = pytest.mark.filterwarnings("ignore")  # Pillow warns on most damaged files; the verdict is what counts
FUZZ_MAX_PIXELS = 1 << 20  # keeps each case cheap: a mutated header may claim any size up to this


def _pixels(h=16, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _written_seeds() -> dict:
    """{name: bytes} of valid files in every format Pillow both writes and reads here."""
    Image.init()
    rgb = Image.fromarray(_pixels())
    seeds = {}
    modes = {"PNG": ("RGB", "RGBA", "L", "P", "1", "I;16", "LA"), "TIFF": ("RGB", "CMYK", "I;16", "F", "1", "LA"),
             "JPEG": ("RGB", "L", "CMYK"), "GIF": ("P",), "BMP": ("RGB", "P", "1"), "WEBP": ("RGB", "RGBA"),
             "TGA": ("RGB", "RGBA", "L"), "SGI": ("RGB", "L"), "IM": ("RGB", "L", "F"), "PPM": ("RGB", "L", "1"),
             "MSP": ("1",), "XBM": ("1",), "BLP": ("P",), "SPIDER": ("F",), "PDF": ()}
    for fmt in sorted(set(Image.SAVE) & set(Image.OPEN)):
        for mode in modes.get(fmt, ("RGB",)):
            img = rgb.convert(mode)
            if mode == "F":
                img = Image.fromarray(_pixels()[..., 0].astype(np.float32) / 255.0)
            kw = {"sizes": [(16, 16)]} if fmt == "ICO" else {}
            try:
                data = _save(img, fmt, **kw)
            except (OSError, ValueError, KeyError):  # no save handler / mode not writable in this format
                continue
            if fmt == "ICNS" and len(data) > 200_000:  # ICNS stores every size up to 1024 px: too slow to fuzz much
                data = data[:200_000]
            seeds[f"{fmt}-{mode}"] = data
    frames = [Image.fromarray(_pixels(seed=k)).convert("P") for k in range(3)]
    seeds["GIF-anim"] = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    seeds["PNG-apng"] = _save(frames[0].convert("RGB"), "PNG", save_all=True,
                              append_images=[f.convert("RGB") for f in frames[1:]])
    seeds["TIFF-pages"] = _save(frames[0].convert("RGB"), "TIFF", save_all=True,
                                append_images=[f.convert("RGB") for f in frames[1:]])
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds["JPEG-exif"] = _save(rgb, "JPEG", exif=exif)
    try:
        seeds["MPO"] = _save(rgb, "MPO", save_all=True, append_images=[rgb])
    except (OSError, ValueError, KeyError):
        pass
    return seeds


def _handmade_seeds() -> dict:
    """Formats Pillow reads but does not write: small files put together by hand (some valid, some only a header)."""
    be = le = struct.pack  # the format strings say the byte order
    pcx = _save(Image.fromarray(_pixels()), "PCX")
    ico = _save(Image.fromarray(_pixels()), "ICO", sizes=[(16, 16)])
    fits = b"".join(c.ljust(80).encode() for c in (
        "SIMPLE  = T", "BITPIX  = 8", "NAXIS   = 2", "NAXIS1  = 4", "NAXIS2  = 4", "END"))
    fits = fits.ljust(2880) + bytes(range(16)).ljust(2880, b"\0")
    return {
        "CUR": ico[:2] + b"\2\0" + ico[4:],
        "DCX": le("<III", 987654321, 12, 0) + pcx,
        "FITS": fits,
        "XPM": b'/* XPM */\nstatic char *x[] = {\n"2 2 2 1",\n"a c #FF0000",\n"b c #00FF00",\n"ab",\n"ba"\n};\n',
        "SUN": be(">8I", 0x59A66A95, 4, 4, 8, 16, 1, 0, 0) + bytes(range(16)),
        "SUN-rgb": be(">8I", 0x59A66A95, 4, 4, 24, 48, 1, 0, 0) + bytes(range(48)),
        "XVTHUMB": b"P7 332\n#END_OF_COMMENTS\n4 4 255\n" + bytes(range(16)),
        "GBR": be(">7I", 28 + 2, 2, 4, 4, 1, 0x47494D50, 10) + b"b\0" + bytes(range(16)),
        "PSD": b"8BPS" + be(">H6xHIIHH", 1, 3, 4, 4, 8, 3) + be(">III", 0, 0, 0) + be(">H", 0) + bytes(48),
        "FLI": le("<IHHHHHH", 128 + 16, 0xAF12, 1, 4, 4, 8, 0) + bytes(128 - 16) + bytes(16),
        "FTEX": b"FTEX" + le("<IIIIIII", 0x1, 4, 4, 1, 1, 1, 1) + le("<III", 0, 0, 0) + bytes(64),
        "MCIDAS": b"\0" * 7 + b"\4" + bytes(1024),
        "PIXAR": b"\x80\xe8\0\0" + bytes(414) + le("<HH", 4, 4) + bytes(2) + le("<H", 0xE0) + bytes(512) + bytes(48),
        "MPEG": b"\0\0\1\xb3" + be(">I", (4 << 20) | (4 << 8)) + bytes(8),
        "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n%%EndComments\nshowpage\n",
        "WMF": b"\xd7\xcd\xc6\x9a\0\0" + le("<hhhhH", 0, 0, 400, 400, 1440) + bytes(6) + bytes(64),
        "GRIB": b"GRIB\0\0\0\1" + bytes(64),
        "BUFR": b"BUFR" + bytes(64),
        "HDF5": b"\x89HDF\r\n\x1a\n" + bytes(64),
        "IPTC": b"\x1c\x01\x5a\0\x03\x1b\x25\x47" + b"\x1c\x02\x00\0\x02\0\x04" + bytes(64),
        "IMT": b"width 4\nheight 4\npixel n8\n\x0c" + bytes(16),
        "PCD": bytes(2048) + b"PCD_IPI" + bytes(4096),
        "DDS-dxt1": b"DDS " + le("<7I", 124, 0x1007, 4, 4, 8, 0, 0) + bytes(44) + le("<2I", 32, 4) + b"DXT1"
                    + bytes(20) + le("<I", 0x1000) + bytes(16) + bytes(8),
    }


def _lying_seeds() -> dict:
    """Headers that claim far more than the file holds."""
    small = _save(Image.fromarray(_pixels(100, 100)), "PNG")
    huge_png = _png_claiming(small, 65535, 65535)
    bmp = bytearray(_save(Image.fromarray(_pixels(100, 100)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 65535, 65535)
    tiff = _tiff_ifd_chain(5000)
    gif = _gif_many_frames(5000)
    return {"PNG-65535": huge_png, "BMP-65535": bytes(bmp), "TIFF-5000-ifds": tiff,
            "TIFF-ifd-loop": _tiff_ifd_chain(3, loop=True), "GIF-5000-frames": gif}


def _png_claiming(png: bytes, w: int, h: int) -> bytes:
    """`png` with its IHDR width and height replaced (and the chunk's CRC fixed, so only the size lies)."""
    b = bytearray(png)
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def _tiff_ifd_chain(n: int, loop: bool = False) -> bytes:
    """A little-endian TIFF of n 4x4 grey pages whose IFDs chain one to the next (or back to the first)."""
    entries = [(256, 3, 1, 4), (257, 3, 1, 4), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, 4), (279, 4, 1, 16)]
    ifd_size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\0" + struct.pack("<I", 24) + bytes(range(16)))
    for k in range(n):
        start = 24 + k * ifd_size
        nxt = 24 if loop and k == n - 1 else (0 if k == n - 1 else start + ifd_size)
        out += struct.pack("<H", len(entries))
        for tag, typ, count, value in entries:
            out += struct.pack("<HHI", tag, typ, count) + struct.pack("<I" if typ == 4 else "<H2x", value)
        out += struct.pack("<I", nxt)
    return bytes(out)


def _gif_many_frames(n: int) -> bytes:
    """A 4x4 GIF of n frames, each one tiny LZW block (built by hand: Pillow would take seconds to write it)."""
    frame = _save(Image.new("P", (4, 4), 1), "GIF")
    header, body = frame[:13 + 6], frame[13 + 6:-1]  # signature + screen descriptor + 2-colour table | image
    return header + body * n + b";"


def _mutants(data: bytes, rng: np.random.Generator, n: int):
    """n damaged copies of `data`: truncations, flipped bytes, extreme header fields, dropped / repeated chunks."""
    size = len(data)
    extremes = [0, 1, 0xFF, 0x7F, 0x80]
    for k in range(n):
        kind = k % 5
        b = bytearray(data)
        if kind == 0:
            yield bytes(b[: int(rng.integers(1, max(2, size)))])
        elif kind == 1:
            for _ in range(int(rng.integers(1, 9))):
                pos = int(rng.integers(0, min(size, 256) if rng.random() < 0.7 else size))
                b[pos] ^= 1 << int(rng.integers(0, 8))
            yield bytes(b)
        elif kind == 2:
            pos = int(rng.integers(0, max(1, min(size - 4, 128))))
            width = [1, 2, 4][int(rng.integers(0, 3))]
            b[pos:pos + width] = bytes([extremes[int(rng.integers(0, len(extremes)))]] * width)
            yield bytes(b)
        elif kind == 3:
            a, c = sorted(int(v) for v in rng.integers(0, size, 2))
            yield bytes(b[:a] + b[c:])
        else:
            a, c = sorted(int(v) for v in rng.integers(0, size, 2))
            yield bytes(b[:c] + b[a:c] * int(rng.integers(2, 5)) + b[c:])


def _check_one(data: bytes, path, label: str, from_bytes: bool = False) -> str:
    """Decode `data` from a file (the CLI's and data sets' path) or from bytes (the server's): "read" or "refused"."""
    path.write_bytes(data)
    try:
        if from_bytes:
            out = read_image(data, max_pixels=FUZZ_MAX_PIXELS, name="upload.bin")
        else:
            out = load_image_rgb(path, max_pixels=FUZZ_MAX_PIXELS)
    except ImageReadError as e:
        assert ("upload.bin" if from_bytes else str(path)) in str(e) and "\n" not in str(e), (label, str(e))
        return "refused"
    except Exception as e:  # noqa: BLE001  (the failure this test exists to find)
        raise AssertionError(f"{label}: {type(e).__name__}: {e}") from None
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8, label
    assert out.ndim == 3 and out.shape[2] == 3 and out.shape[0] * out.shape[1] <= FUZZ_MAX_PIXELS, label
    assert out.flags["C_CONTIGUOUS"], label
    return "read"


def test_every_format_seed_is_read_or_refused_cleanly(tmp_path):
    seeds = {**_written_seeds(), **_handmade_seeds(), **_lying_seeds()}
    assert {"PNG-RGB", "JPEG-RGB", "GIF-P", "BMP-RGB", "TIFF-RGB", "WEBP-RGB", "ICO-RGB", "PPM-RGB", "TGA-RGB",
            "PCX-RGB", "SGI-RGB", "IM-RGB", "DDS-RGB", "QOI-RGB"} <= set(seeds)
    outcome = {name: _check_one(data, tmp_path / f"seed-{name}", name) for name, data in seeds.items()}
    for name in ("PNG-RGB", "JPEG-RGB", "GIF-anim", "TIFF-pages", "WEBP-RGB", "ICO-RGB", "QOI-RGB", "DDS-RGB",
                 "XPM", "SUN", "DCX", "FITS", "PSD", "TIFF-5000-ifds", "GIF-5000-frames"):
        assert outcome[name] == "read", name
    for name in ("PNG-65535", "BMP-65535"):
        assert outcome[name] == "refused", name


def test_damaged_files_of_every_format_are_read_or_refused_cleanly(tmp_path):
    seeds = {**_written_seeds(), **_handmade_seeds()}
    rng = np.random.default_rng(0)
    counts = {"read": 0, "refused": 0}
    for name, data in sorted(seeds.items()):
        n = 10 if len(data) > 100_000 else 60
        for k, bad in enumerate(_mutants(data, rng, n)):
            counts[_check_one(bad, tmp_path / f"{name}-{k}", f"{name} mutant {k}", from_bytes=k % 4 == 3)] += 1
        for k in range(4):  # the format's first bytes, then noise: every header parser past its magic
            noise = data[:8 * (k + 1)] + rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
            counts[_check_one(noise, tmp_path / f"{name}-noise{k}", f"{name} noise {k}")] += 1
    assert counts["read"] > 100 and counts["refused"] > 1000, counts


def test_header_limits_and_kinds_from_bytes():
    png = _save(Image.fromarray(_pixels(100, 100)), "PNG")
    with pytest.raises(ImageTooLargeError, match=r"upload\.png: refused before decoding: .*4294836225 pixels"):
        read_image(_png_claiming(png, 65535, 65535), name="upload.png")
    with pytest.raises(ImageTooLargeError, match=r"image data: 300x200 = 0.06 MP is over the limit of 0.01 MP"):
        read_image(_png_claiming(png, 300, 200), max_pixels=100 * 100)
    assert read_image(png, max_pixels=100 * 100).shape == (100, 100, 3)
    with pytest.raises(ImageEmptyError):
        read_image(b"")
    with pytest.raises(ImageFormatError, match="image data: cannot identify image file"):
        read_image(b"hello, world")
    assert read_image(io.BytesIO(png)).shape == (100, 100, 3)
