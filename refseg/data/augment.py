"""Flip augmentation for referring expressions: the image, its masks and clicks flipped, the words swapped.

A flipped image needs a flipped expression: "the leftmost plane" names
another object once the image is mirrored left-right, "the plane on the
right" is that object. `swap_directions` rewrites the direction words of an
expression for a view, so that (image, expression, mask) stays a true
triple:

    view "h"  (left-right mirror):  left <-> right, leftmost <-> rightmost, east <-> west ...
    view "v"  (top-bottom mirror):  top <-> bottom, above <-> below, upper <-> lower, north <-> south ...
    view "hv" (both, a half turn):  both sets

Words are matched whole and case-insensitively (a capital first letter is
kept; "top-left" and "upper left" are handled word by word); everything else
in the sentence is left as written. This covers SynthRef's grammar exactly
and the direction words of RefCOCO / RRSIS-D expressions; a direction said
some other way ("the car facing the camera's left side" is fine, "the one
near the window" has no direction to swap) stays as it is, which is right
whenever the phrase is mirror-invariant.

Which views: `--flip h` suits natural photos (mirror images of a street are
street scenes; a top-bottom mirror is not), `--flip hv` suits aerial and
remote-sensing scenes, whose "up" is only the map's north. Each training
sentence is shown in one view drawn uniformly from the set (the original
included), so an epoch sees every sentence once, in some view.

Flips act on the letterboxed square's content only (the top-left
(S - pad_y) x (S - pad_x) pixels, see data/transforms.py): the zero padding
stays right / bottom, as at inference.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

VIEWS = ("none", "h", "v", "hv")
FLIP_CHOICES: Dict[str, Tuple[str, ...]] = {"none": ("none",), "h": ("none", "h"), "hv": VIEWS}

_H_PAIRS = (("left", "right"), ("leftmost", "rightmost"), ("lefthand", "righthand"), ("east", "west"),
            ("eastern", "western"), ("eastmost", "westmost"), ("easternmost", "westernmost"),
            ("eastward", "westward"), ("northeast", "northwest"), ("southeast", "southwest"),
            ("northeastern", "northwestern"), ("southeastern", "southwestern"))
_V_PAIRS = (("top", "bottom"), ("topmost", "bottommost"), ("above", "below"), ("upper", "lower"),
            ("uppermost", "lowermost"), ("up", "down"), ("north", "south"), ("northern", "southern"),
            ("northmost", "southmost"), ("northernmost", "southernmost"), ("northward", "southward"),
            ("northeast", "southeast"), ("northwest", "southwest"), ("northeastern", "southeastern"),
            ("northwestern", "southwestern"), ("highest", "lowest"))


def _table(pairs) -> Dict[str, str]:
    table: Dict[str, str] = {}
    for a, b in pairs:
        table[a], table[b] = b, a
    return table


_H, _V = _table(_H_PAIRS), _table(_V_PAIRS)
_TABLES = {"none": {}, "h": _H, "v": _V,
           "hv": {w: _V.get(_H.get(w, w), _H.get(w, w)) for w in set(_H) | set(_V)}}
_WORD = re.compile(r"[A-Za-z]+")


def check_view(view: str) -> str:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return view


def swap_directions(text: str, view: str) -> str:
    """`text` as it reads for the image flipped by `view` (see the module docstring)."""
    table = _TABLES[check_view(view)]
    if not table:
        return text

    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = table.get(word.lower())
        if new is None or new == word.lower():
            return word
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new[0].upper() + new[1:] if word[0].isupper() else new

    return _WORD.sub(swap, text)


def _content(letterbox: torch.Tensor, size: int) -> Tuple[int, int]:
    """(height, width) of the letterboxed content from an item's (scale, pad_x, pad_y)."""
    pad_x, pad_y = int(round(float(letterbox[1]))), int(round(float(letterbox[2])))
    return size - pad_y, size - pad_x


def flip_map(x: torch.Tensor, view: str, hw: Tuple[int, int]) -> torch.Tensor:
    """Flip the top-left hw = (h, w) region of (..., H, W) `x` by `view`; a copy, padding untouched."""
    dims = {"none": (), "h": (-1,), "v": (-2,), "hv": (-2, -1)}[check_view(view)]
    x = x.clone()
    if dims:
        h, w = hw
        x[..., :h, :w] = torch.flip(x[..., :h, :w], dims)
    return x


def flip_points(p: torch.Tensor, view: str, hw: Tuple[int, int]) -> torch.Tensor:
    """Pixel-index [x, y] points (..., 2) mapped by the flip of a content of size hw (NaN stays NaN)."""
    h, w = hw
    p = p.clone()
    if "h" in view:
        p[..., 0] = (w - 1) - p[..., 0]
    if "v" in view:
        p[..., 1] = (h - 1) - p[..., 1]
    return p


def flip_item(item: dict, view: str) -> dict:
    """A data set item (RefSegDataset) as seen in `view`: image, mask, clicks and text flipped together."""
    check_view(view)
    if view == "none":
        return item
    if "orig_mask" in item:
        raise ValueError("flip views are for training items; evaluation items (orig_mask) are never flipped")
    size = item["image"].shape[-1]
    hw = _content(item["letterbox"], size)
    out = dict(item)
    out["image"] = flip_map(item["image"], view, hw)
    out["text"] = swap_directions(item["text"], view)
    if "mask" in item:
        out["mask"] = flip_map(item["mask"], view, hw)
    if "click_center" in item:
        out["click_center"] = flip_points(item["click_center"], view, hw)
    if "click_corners" in item:
        c = flip_points(item["click_corners"], view, hw)  # [[x0, y0], [x1, y1]]: keep x0 <= x1, y0 <= y1
        out["click_corners"] = torch.stack([torch.minimum(c[0], c[1]), torch.maximum(c[0], c[1])])
    return out
