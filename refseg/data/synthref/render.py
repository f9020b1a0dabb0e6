"""Drawing for SynthRef: object shapes, anti-aliased layers and backgrounds.

Coordinates are continuous pixels of the 320 x 320 image: pixel (row i,
column j) covers [j, j+1) x [i, i+1). Shapes are polygons around the
origin (y points down) that a `Part` list pairs with RGB colours. A
`Layer` is one object drawn at SUPERSAMPLE x resolution with PIL and
averaged back down, so each pixel knows the share of it the object covers
(its coverage, 0..1) and the colour it adds. A pixel belongs to an
object's mask when the coverage is at least one half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from refseg.data.synthref.vocab import COLOUR_JITTER, IMAGE_SIZE, SUPERSAMPLE

Part = tuple  # (vertices (N, 2) float array of x, y in pixels, RGB tuple of ints 0..255)

NATURAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "motorcycle", "camera", "moon", "page", "grass", "gravel", "brick")
AERIAL_TEXTURES = ("grass", "gravel", "brick")
AERIAL_TINTS = ((95, 120, 60), (125, 115, 85), (110, 110, 100), (150, 135, 100), (80, 100, 70))  # RGB ground colours
MIN_CROP_SHARE = 0.6  # a background crop's side is at least this share of the photo's shorter side


@dataclass(frozen=True)
class Layer:
    """One object drawn in a patch of the image whose top-left pixel is (x0, y0).

    coverage: (h, w) float32 in [0, 1], share of each pixel the object covers.
    premultiplied: (h, w, 3) float32, colour x coverage, 0..255.
    """

    x0: int
    y0: int
    coverage: np.ndarray
    premultiplied: np.ndarray

    @property
    def full(self) -> np.ndarray:
        """(h, w) bool: pixels the object covers at least half of."""
        return self.coverage >= 0.5

    def moved(self, x0: int, y0: int) -> "Layer":
        """The same drawing with its patch's top-left pixel at (x0, y0)."""
        return replace(self, x0=int(x0), y0=int(y0))


def jitter(rgb, rng: np.random.Generator) -> tuple:
    """Move each channel of an RGB colour by a uniform integer in [-15, 15], clipped to 0..255."""
    shifted = np.asarray(rgb) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(c) for c in np.clip(shifted, 0, 255))


def regular_polygon(radius: float, count: int, start_deg: float = 0.0) -> np.ndarray:
    """(count, 2) vertices on a circle of `radius` pixels, the first at angle `start_deg` (y down)."""
    angles = np.deg2rad(start_deg) + 2 * np.pi * np.arange(count) / count
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def rectangle(width: float, height: float) -> np.ndarray:
    """(4, 2) vertices of an axis-aligned rectangle centred on the origin, sizes in pixels."""
    w, h = width / 2, height / 2
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]])


def ellipse(length: float, width: float) -> np.ndarray:
    """(64, 2) vertices of an ellipse with axes `length` (along x) and `width`, pixels."""
    circle = regular_polygon(1.0, 64)
    return circle * np.array([length / 2, width / 2])


def rotate(vertices: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (N, 2) vertices about the origin by `angle` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return vertices @ np.array([[c, s], [-s, c]])


def natural_shape(name: str, r: float) -> list:
    """Polygons of a natural-domain shape of circumradius r pixels (no rotation, see the spec)."""
    if name == "circle":
        return [regular_polygon(r, 96)]
    if name == "square":
        return [rectangle(1.4 * r, 1.4 * r)]
    if name == "triangle":
        return [regular_polygon(r, 3, start_deg=-90)]  # apex up
    if name == "star":
        outer, inner = regular_polygon(r, 5, -90), regular_polygon(0.45 * r, 5, -90 + 36)
        return [np.stack([outer, inner], axis=1).reshape(10, 2)]  # alternate tips and notches
    if name == "hexagon":
        return [regular_polygon(r, 6)]  # a vertex at angle 0: flat top and bottom
    if name == "cross":
        return [rectangle(2 * r, 0.6 * r), rectangle(0.6 * r, 2 * r)]
    raise ValueError(f"unknown shape {name!r}")


def airplane(length: float, width: float) -> list:
    """Polygons of an airplane pointing along +x: fuselage, swept wings (span 0.8 length), tail."""
    L = length
    wing = np.array([[0.08 * L, 0.0], [-0.08 * L, 0.4 * L], [-0.18 * L, 0.4 * L], [-0.12 * L, 0.0]])
    tail = np.array([[-0.36 * L, 0.0], [-0.44 * L, 0.15 * L], [-0.5 * L, 0.15 * L], [-0.48 * L, 0.0]])
    mirror = np.array([1.0, -1.0])
    return [rectangle(L, width), wing, wing * mirror, tail, tail * mirror]


def draw_layer(parts: list, rng: np.random.Generator) -> Layer:
    """Draw parts (polygons around the origin, painted in order) at a random sub-pixel offset.

    The patch starts at (0, 0); place it with `Layer.moved`.
    """
    offset = rng.random(2)  # sub-pixel position, pixels
    vertices = np.concatenate([v for v, _ in parts])  # (N, 2)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    shift = offset - lo + 1.0  # one free pixel around the drawing
    w, h = (int(math.ceil(c)) + 1 for c in hi + shift)
    s = SUPERSAMPLE
    rgb = Image.new("RGB", (w * s, h * s))
    alpha = Image.new("L", (w * s, h * s))
    draw_rgb, draw_alpha = ImageDraw.Draw(rgb), ImageDraw.Draw(alpha)
    for vertices, colour in parts:
        points = [tuple(p) for p in ((vertices + shift) * s - 0.5)]  # PIL's integer points are sub-pixel centres
        draw_rgb.polygon(points, fill=tuple(colour))
        draw_alpha.polygon(points, fill=255)
    # Both images were painted with the same polygons, so the RGB image is already black outside the
    # object: box sums of it are coverage x colour. Sums of 16 sub-pixels fit in uint16.
    a = np.asarray(alpha).reshape(h, s, w, s).sum(axis=(1, 3), dtype=np.uint16)  # (h, w), 0..16*255
    c = np.asarray(rgb).reshape(h, s, w, s, 3).sum(axis=(1, 3), dtype=np.uint16)  # (h, w, 3)
    coverage = a.astype(np.float32) / (255 * s * s)
    premultiplied = c.astype(np.float32) / (s * s)
    return Layer(0, 0, coverage, premultiplied)


def composite(background: np.ndarray, layers: list) -> np.ndarray:
    """Paint layers in order over an (H, W, 3) uint8 background; returns (H, W, 3) uint8."""
    out = background.astype(np.float32)
    for layer in layers:
        h, w = layer.coverage.shape
        patch = out[layer.y0 : layer.y0 + h, layer.x0 : layer.x0 + w]
        patch *= 1.0 - layer.coverage[..., None]
        patch += layer.premultiplied
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@lru_cache(maxsize=None)
def _sample_image(name: str) -> np.ndarray:
    """An scikit-image sample photo as (H, W, 3) uint8 RGB (greyscale ones repeated)."""
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def _random_crop(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random square crop (side >= 60 % of the shorter side), resized to 320 x 320."""
    h, w = image.shape[:2]
    short = min(h, w)
    side = int(rng.integers(math.ceil(MIN_CROP_SHARE * short), short + 1))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(image[y0 : y0 + side, x0 : x0 + side])
    return crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)


def natural_background(rng: np.random.Generator) -> np.ndarray:
    """(320, 320, 3) uint8: a random crop of one of the bundled scikit-image photos."""
    name = NATURAL_PHOTOS[int(rng.integers(len(NATURAL_PHOTOS)))]
    return np.asarray(_random_crop(_sample_image(name), rng))


def aerial_background(rng: np.random.Generator) -> np.ndarray:
    """(320, 320, 3) uint8: a tinted crop of the grass, gravel or brick texture, with 0-2 straight roads."""
    name = AERIAL_TEXTURES[int(rng.integers(len(AERIAL_TEXTURES)))]
    texture = np.asarray(_random_crop(_sample_image(name), rng), dtype=np.float32)[..., 0] / 255.0
    texture = (texture - texture.mean()) / (texture.std() + 1e-6)  # (H, W), zero mean, unit spread
    tint = np.asarray(jitter(AERIAL_TINTS[int(rng.integers(len(AERIAL_TINTS)))], rng), dtype=np.float32)
    contrast = float(rng.uniform(0.12, 0.25))
    out = tint * (1.0 + contrast * texture[..., None])  # (H, W, 3) float32
    centres = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5  # pixel centres, pixels
    for _ in range(int(rng.integers(0, 3))):
        width = float(rng.uniform(10.0, 16.0))  # pixels
        angle = float(rng.uniform(0, np.pi))
        px, py = (float(v) * IMAGE_SIZE for v in rng.uniform(0.2, 0.8, size=2))  # a point the road passes through
        nx, ny = -math.sin(angle), math.cos(angle)  # unit normal of the road's direction
        dist = np.abs((centres[None, :] - px) * nx + (centres[:, None] - py) * ny)  # (H, W), pixels
        cover = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)[..., None]  # anti-aliased edge
        grey = float(rng.integers(95, 131))
        out = out * (1.0 - cover) + grey * cover
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
