"""The fixed vocabulary and numbers of SynthRef (docs/SYNTHREF.md).

Everything a sentence can say, and every threshold the spec fixes, lives
here so that the drawing code, the sentence generator and the evaluator
read the same values. Distances are in pixels of the 320 x 320 image;
colours are RGB 0..255 before the per-object jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SIZE = 320  # W = H, pixels
THIRD = IMAGE_SIZE / 3  # W/3 = H/3, pixels
TWO_THIRDS = 2 * IMAGE_SIZE / 3  # 2W/3 = 2H/3, pixels
MARGIN = 8.0  # a tested coordinate within this many pixels of a threshold leaves the truth undecided
RELATION_GAP = 20.0  # "left of" etc. and ordinals need more than this many pixels between centroids
EXTREME_RATIO = 1.25  # "largest"/"smallest": winner's area over runner-up's must exceed this
MIN_VISIBILITY = 0.6  # every object keeps at least this share of its own area visible
COLOUR_JITTER = 15  # each RGB channel of an object's colour moves by up to this much
SUPERSAMPLE = 4  # objects are drawn at 4x resolution, coverage = share of covered sub-pixels
DOMAINS = ("natural", "aerial")
SPLITS = ("train", "val", "test")

# preset -> images per split (train, val, test)
PRESETS = {
    "tiny": (40, 10, 10),
    "small": (1000, 200, 200),
    "full": (8000, 1000, 1000),
}


@dataclass(frozen=True)
class DomainVocab:
    """The words one domain's sentences may use."""

    name: str
    categories: dict  # category id -> name (names may have two words: "storage tank")
    colours: dict  # category id -> {colour word: base RGB}; classes without colour words are absent
    sizes: tuple  # size words ("small", "large"); empty for aerial
    selectors: tuple  # ordinals and, for aerial, "largest" / "smallest"
    min_referent_pixels: int  # an object with fewer visible pixels is never a referent
    object_count: tuple  # (min, max) objects per image, inclusive
    supercategory: str  # the COCO supercategory of every category
    forms: tuple  # sentence forms, see describe.py
    colour_in_all_forms: bool  # natural: any form may name colours; aerial: only the location form

    def category_id(self, name: str) -> int:
        """Return the id of a category name (KeyError if unknown)."""
        for cid, cname in self.categories.items():
            if cname == name:
                return cid
        raise KeyError(name)


SPATIAL_PHRASES = (
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the top left",
    "in the top right",
    "in the bottom left",
    "in the bottom right",
    "in the middle",
)
RELATIONS = ("left of", "right of", "above", "below")
ORDINALS = ("leftmost", "rightmost", "topmost", "bottommost")
EXTREMES = ("largest", "smallest")

NATURAL_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
NATURAL_SIZES = {"small": (12.0, 20.0), "large": (30.0, 44.0)}  # circumradius range, pixels
NATURAL_CATEGORIES = {1: "circle", 2: "square", 3: "triangle", 4: "star", 5: "hexagon", 6: "cross"}

AERIAL_CATEGORIES = {1: "vehicle", 2: "storage tank", 3: "airplane", 4: "ship", 5: "building", 6: "tennis court"}
AERIAL_COLOURS = {
    1: {"white": (235, 235, 235), "black": (30, 30, 30), "red": (200, 35, 35), "blue": (35, 70, 200)},
    4: {"white": (235, 235, 235), "grey": (135, 135, 135)},
    5: {"brown": (140, 70, 50), "grey": (120, 120, 120), "blue": (40, 55, 110)},
}

NATURAL = DomainVocab(
    name="natural",
    categories=NATURAL_CATEGORIES,
    colours={cid: NATURAL_COLOURS for cid in NATURAL_CATEGORIES},
    sizes=tuple(NATURAL_SIZES),
    selectors=ORDINALS,
    min_referent_pixels=150,
    object_count=(3, 6),
    supercategory="shape",
    forms=("attribute", "location", "ordinal", "relation"),
    colour_in_all_forms=True,
)
AERIAL = DomainVocab(
    name="aerial",
    categories=AERIAL_CATEGORIES,
    colours=AERIAL_COLOURS,
    sizes=(),
    selectors=ORDINALS + EXTREMES,
    min_referent_pixels=60,
    object_count=(6, 16),
    supercategory="aerial object",
    forms=("location", "extreme", "relation", "ordinal"),
    colour_in_all_forms=False,
)
VOCABS = {"natural": NATURAL, "aerial": AERIAL}
