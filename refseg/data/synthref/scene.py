"""Random SynthRef scenes: objects of both domains, placed so each stays >= 60 % visible.

`make_scene(domain, rng, focus)` draws a background, samples objects,
places them one by one (a later object is drawn over the earlier ones and
is refused where it would hide more than 40 % of any of them), composites
the image and measures every object's visible mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from refseg.data.synthref import render
from refseg.data.synthref.grammar import ObjectFacts
from refseg.data.synthref.vocab import (
    AERIAL,
    IMAGE_SIZE,
    MIN_VISIBILITY,
    NATURAL,
    NATURAL_COLOURS,
    NATURAL_SIZES,
    VOCABS,
)

PLACEMENT_TRIES = 60  # random positions tried per object before the scene is drawn anew
SCENE_TRIES = 50  # scenes sampled before giving up (never reached in practice)
AERIAL_CLASS_WEIGHTS = {1: 0.28, 2: 0.14, 3: 0.12, 4: 0.16, 5: 0.18, 6: 0.12}  # category id -> share (choice)
TANK_GREY = (200, 200, 200)  # storage tank body, RGB; the inner ring is 55 darker
AIRPLANE_GREY = (205, 205, 210)
COURT_GREEN = (60, 135, 70)
COURT_LINE = (240, 240, 240)


@dataclass(frozen=True)
class ObjectSpec:
    """An object before placement: what it is and how it looks."""

    category_id: int
    colour: Optional[str]  # colour word, None for classes without one
    size: Optional[str]  # "small" / "large" (natural), None (aerial)
    layer: render.Layer  # drawing with its patch at (0, 0)


@dataclass
class Scene:
    """A composited image and its objects in drawing order (later ones on top).

    image: (320, 320, 3) uint8 RGB. label: (320, 320) int16, the index of the
    object owning each pixel (covers >= half of it, no later object does),
    -1 for background. own_area: pixels each object covers alone (no
    occlusion). facts: per object, measured on its visible mask.
    """

    image: np.ndarray
    objects: list
    label: np.ndarray
    own_area: list
    facts: list

    def mask(self, k: int) -> np.ndarray:
        """(320, 320) uint8 {0, 1}: the visible mask of object k."""
        return (self.label == k).astype(np.uint8)


class _Canvas:
    """The label map of the objects placed so far, and how much of each is still visible."""

    def __init__(self):
        self.label = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int16)
        self.own = np.zeros(0, dtype=np.int64)  # pixels per object, unoccluded
        self.visible = np.zeros(0, dtype=np.int64)  # pixels per object still visible

    def place(self, layer: render.Layer, rng: np.random.Generator) -> Optional[render.Layer]:
        """Put `layer` on top at a random position keeping everything >= 60 % visible; None if none found."""
        full = layer.full
        own = int(full.sum())
        h, w = full.shape
        if own == 0 or h > IMAGE_SIZE or w > IMAGE_SIZE:
            return None
        for _ in range(PLACEMENT_TRIES):
            x0, y0 = (int(v) for v in rng.integers(0, [IMAGE_SIZE - w + 1, IMAGE_SIZE - h + 1]))
            region = self.label[y0 : y0 + h, x0 : x0 + w]  # view
            hidden = region[full]
            lost = np.bincount(hidden[hidden >= 0], minlength=len(self.own))
            if np.any(self.visible - lost < MIN_VISIBILITY * self.own):
                continue
            region[full] = len(self.own)
            self.visible = np.append(self.visible - lost, own)
            self.own = np.append(self.own, own)
            return layer.moved(x0, y0)
        return None


def _natural_objects(rng: np.random.Generator, focus: bool) -> list:
    """Shapes, colours and sizes for 3-6 objects; with `focus`, one shape appears 2-3 times."""
    lo, hi = NATURAL.object_count
    n = int(rng.integers(lo, hi + 1))
    ids = list(NATURAL.categories)
    shapes = []
    if focus:
        repeat = int(rng.integers(2, min(3, n) + 1))
        shapes = [ids[int(rng.integers(len(ids)))]] * repeat
    shapes += [ids[int(k)] for k in rng.integers(len(ids), size=n - len(shapes))]
    specs = []
    colour_names = list(NATURAL_COLOURS)
    for cid in (shapes[int(k)] for k in rng.permutation(n)):
        colour = colour_names[int(rng.integers(len(colour_names)))]
        size = NATURAL.sizes[int(rng.integers(2))]
        r = rng.uniform(*NATURAL_SIZES[size])
        rgb = render.jitter(NATURAL_COLOURS[colour], rng)
        parts = [(v, rgb) for v in render.natural_shape(NATURAL.categories[cid], r)]
        specs.append(ObjectSpec(cid, colour, size, render.draw_layer(parts, rng)))
    return specs


def _aerial_parts(cid: int, colour: Optional[str], rng: np.random.Generator) -> list:
    """Parts (polygons with colours) of one aerial object of category `cid`, centred on the origin."""
    angle = rng.uniform(0, np.pi)
    if cid == 1:  # vehicle
        body = render.rectangle(rng.uniform(12, 18), rng.uniform(6, 9))
        return [(render.rotate(body, angle), render.jitter(AERIAL.colours[1][colour], rng))]
    if cid == 2:  # storage tank: light disk, darker ring between 0.56 r and 0.72 r
        r = rng.uniform(8, 18)
        body = render.jitter(TANK_GREY, rng)
        ring = tuple(c - 55 for c in body)
        return [(render.regular_polygon(r * k, 64), c) for k, c in ((1.0, body), (0.72, ring), (0.56, body))]
    if cid == 3:  # airplane
        grey = render.jitter(AIRPLANE_GREY, rng)
        return [(render.rotate(v, angle), grey) for v in render.airplane(rng.uniform(24, 40), rng.uniform(4, 6))]
    if cid == 4:  # ship
        hull = render.ellipse(rng.uniform(20, 44), rng.uniform(6, 12))
        return [(render.rotate(hull, angle), render.jitter(AERIAL.colours[4][colour], rng))]
    if cid == 5:  # building, axis-aligned
        roof = render.rectangle(rng.uniform(24, 56), rng.uniform(24, 56))
        return [(roof, render.jitter(AERIAL.colours[5][colour], rng))]
    if cid == 6:  # tennis court, axis-aligned 40 x 22, lying or standing; white outline and net
        w, h = (40.0, 22.0) if rng.random() < 0.5 else (22.0, 40.0)
        green = render.jitter(COURT_GREEN, rng)
        net = render.rectangle(1.0, h - 3.0) if w > h else render.rectangle(w - 3.0, 1.0)
        return [(render.rectangle(w, h), COURT_LINE), (render.rectangle(w - 3.0, h - 3.0), green), (net, COURT_LINE)]
    raise ValueError(f"unknown aerial category {cid}")


def _aerial_objects(rng: np.random.Generator) -> list:
    """Classes, colours and drawings for 6-16 aerial objects."""
    lo, hi = AERIAL.object_count
    n = int(rng.integers(lo, hi + 1))
    ids = list(AERIAL_CLASS_WEIGHTS)
    p = np.array(list(AERIAL_CLASS_WEIGHTS.values()))
    specs = []
    for cid in rng.choice(ids, size=n, p=p / p.sum()):
        cid = int(cid)
        words = list(AERIAL.colours.get(cid, {}))
        colour = words[int(rng.integers(len(words)))] if words else None
        specs.append(ObjectSpec(cid, colour, None, render.draw_layer(_aerial_parts(cid, colour, rng), rng)))
    return specs


def measure(label: np.ndarray, specs: list) -> list:
    """ObjectFacts of each object from the label map: visible-mask centroid (pixels) and area (pixels)."""
    n = len(specs)
    flat = label.ravel().astype(np.int64) + 1  # 0 = background
    rows, cols = np.divmod(np.arange(flat.size), label.shape[1])
    area = np.bincount(flat, minlength=n + 1)[1:]
    sum_x = np.bincount(flat, weights=cols, minlength=n + 1)[1:]
    sum_y = np.bincount(flat, weights=rows, minlength=n + 1)[1:]
    return [
        ObjectFacts(s.category_id, s.colour, s.size, float(sum_x[k] / area[k]), float(sum_y[k] / area[k]), int(area[k]))
        for k, s in enumerate(specs)
    ]


def make_scene(domain: str, rng: np.random.Generator, focus: bool = False) -> Scene:
    """Sample, place and draw one scene of `domain`; `focus` (natural) repeats one shape 2-3 times."""
    vocab = VOCABS[domain]
    background = render.natural_background(rng) if vocab is NATURAL else render.aerial_background(rng)
    for _ in range(SCENE_TRIES):
        specs = _natural_objects(rng, focus) if vocab is NATURAL else _aerial_objects(rng)
        canvas = _Canvas()
        placed = [canvas.place(s.layer, rng) for s in specs]
        if all(layer is not None for layer in placed):
            break
    else:
        raise RuntimeError(f"could not place a {domain} scene in {SCENE_TRIES} tries")
    objects = [ObjectSpec(s.category_id, s.colour, s.size, layer) for s, layer in zip(specs, placed)]
    image = render.composite(background, placed)
    return Scene(image, objects, canvas.label, [int(a) for a in canvas.own], measure(canvas.label, objects))
