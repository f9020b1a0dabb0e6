"""Flip and transpose augmentation for referring expressions: image, masks and clicks moved, words swapped.

A flipped image needs a flipped expression: "the leftmost plane" names
another object once the image is mirrored left-right, "the plane on the
right" is that object. `swap_directions` rewrites the direction words of an
expression for a view, so that (image, expression, mask) stays a true
triple:

    view "h"  (left-right mirror):  left <-> right, leftmost <-> rightmost, east <-> west ...
    view "v"  (top-bottom mirror):  top <-> bottom, above <-> below, upper <-> lower, north <-> south ...
    view "hv" (both, a half turn):  both sets
    view "t"  (transpose, x <-> y):  on the left <-> at the top, left of <-> above, leftmost <-> topmost,
                                     in the top right <-> in the bottom left, west <-> north ...

A view is a flip ("", "h", "v", "hv") followed, when it ends in "t", by the
transpose: "ht", "vt" (the quarter turns) and "hvt" (the anti-diagonal
mirror) complete the eight symmetries of the square.

Words are matched whole and case-insensitively (a capital first letter is
kept; "top-left" and "upper left" are handled word by word); everything else
in the sentence is left as written. This covers SynthRef's grammar exactly
and the direction words of RefCOCO / RRSIS-D expressions; a direction said
some other way ("the car facing the camera's left side" is fine, "the one
near the window" has no direction to swap) stays as it is, which is right
whenever the phrase is mirror-invariant.

A transposed expression needs phrases, not just words, rewritten ("left of"
becomes "above", "on the left" becomes "at the top"): `transpose_directions`
rewrites SynthRef's phrases exactly, the common phrasings of RefCOCO /
RRSIS-D ("to the left of", "on top of", "upper right", "north-west",
"horizontal") by a phrase table, and any other direction word word by word
(left -> top ...), which keeps the meaning if not always the idiom.

Which views: `--flip h` suits natural photos (mirror images of a street are
street scenes; a top-bottom mirror is not), `--flip hv` suits aerial and
remote-sensing scenes, whose "up" is only the map's north, and `--flip hvt`
(all eight: flips, quarter turns, transposes) suits them too: a scene seen
from above has no preferred orientation at all. Each training
sentence is shown in one view drawn uniformly from the set (the original
included), so an epoch sees every sentence once, in some view.

Flips act on the letterboxed square's content only (the top-left
(S - pad_y) x (S - pad_x) pixels, see data/transforms.py): the zero padding
stays right / bottom, as at inference. The transpose acts on the whole
square (content top-left stays top-left, now (S - pad_x) x (S - pad_y)), so
an item's letterbox pads and original size are swapped with it.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

FLIPS = ("none", "h", "v", "hv")
VIEWS = FLIPS + ("t", "ht", "vt", "hvt")
FLIP_CHOICES: Dict[str, Tuple[str, ...]] = {"none": ("none",), "h": ("none", "h"), "hv": FLIPS, "hvt": VIEWS}

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


def _parts(view: str) -> Tuple[str, bool]:
    """(the flip of a view, whether the transpose follows it): "ht" -> ("h", True), "v" -> ("v", False)."""
    transposed = check_view(view).endswith("t")
    return ((view[:-1] or "none") if transposed else view), transposed


def check_view(view: str) -> str:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return view


def _cased(new: str, old: str) -> str:
    """`new` written in the case of `old` (all capitals, a capital first letter, or as given)."""
    if old.isupper() and len(old) > 1:
        return new.upper()
    return new[0].upper() + new[1:] if old[0].isupper() else new


def _flip_words(text: str, flip: str) -> str:
    table = _TABLES[flip]
    if not table:
        return text

    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = table.get(word.lower())
        return word if new is None or new == word.lower() else _cased(new, word)

    return _WORD.sub(swap, text)


# The transpose (x <-> y) of a sentence. Phrases first, longest first, so that
# "to the left of" is read whole before "left of" and before "left"; each
# pair maps both ways unless marked one-way (the transpose of SynthRef's
# sentences is an exact involution).
_T_PHRASES = (  # (phrase, transposed, both ways)
    ("to the left of", "above", False), ("to the right of", "below", False),
    ("on the left of", "above", False), ("on the right of", "below", False),
    ("on top of", "left of", False),
    ("left of", "above", True), ("right of", "below", True),
    ("on the left", "at the top", True), ("on the right", "at the bottom", True),
)
_T_WORDS = (  # (word, transposed, both ways)
    ("left", "top", True), ("right", "bottom", True), ("leftmost", "topmost", True),
    ("rightmost", "bottommost", True), ("uppermost", "leftmost", False), ("lowermost", "rightmost", False),
    ("upper", "left", False), ("lower", "right", False), ("highest", "leftmost", False),
    ("lowest", "rightmost", False), ("west", "north", True), ("east", "south", True),
    ("western", "northern", True), ("eastern", "southern", True), ("westmost", "northmost", True),
    ("eastmost", "southmost", True), ("westernmost", "northernmost", True),
    ("easternmost", "southernmost", True), ("westward", "northward", True), ("eastward", "southward", True),
    ("northeast", "southwest", True), ("northeastern", "southwestern", True),
    ("horizontal", "vertical", True), ("horizontally", "vertically", True), ("row", "column", True),
    ("rows", "columns", True), ("lefthand", "top", False), ("righthand", "bottom", False),
)
# A corner said in two words (vertical then horizontal, "top right", "upper-left", "north east"): the
# transpose swaps the roles, in the same register: top right -> bottom left, upper left -> upper left.
_CORNER_V = {"top": ("top", "bottom"), "bottom": ("top", "bottom"), "upper": ("upper", "lower"),
             "lower": ("upper", "lower"), "north": ("north", "south"), "south": ("north", "south")}
_CORNER_H = {"left": ("left", "right"), "right": ("left", "right"), "west": ("west", "east"),
             "east": ("west", "east")}


def _t_table(pairs) -> Dict[str, str]:
    table: Dict[str, str] = {}
    for a, b, both in pairs:
        table[a] = b
        if both:
            table[b] = a
    return table


_T_PHRASE, _T_WORD = _t_table(_T_PHRASES), _t_table(_T_WORDS)
_SEP = r"[\s-]+"
_SIDES = "|".join(list(_CORNER_H) + list(_CORNER_V))
_T_PATTERN = re.compile(
    r"(?P<corner>\b(?P<v>" + "|".join(_CORNER_V) + r")(?P<sep>" + _SEP + r")(?P<h>" + "|".join(_CORNER_H) + r")\b)"
    + r"|(?P<phrase>\b(?:" + "|".join(_SEP.join(map(re.escape, p.split()))
                                      for p in sorted(_T_PHRASE, key=lambda p: -len(p.split())))
    + r")\b(?!" + _SEP + r"(?:" + _SIDES + r")\b))"  # "at the top right" is a corner, not "at the top"
    + r"|(?P<word>[A-Za-z]+)", re.IGNORECASE)


def transpose_directions(text: str) -> str:
    """`text` as it reads for the image transposed (x <-> y: mirrored about the top-left to bottom-right
    diagonal): left <-> top, right <-> bottom, left of <-> above, in the top right <-> in the bottom left."""

    def swap(m: re.Match) -> str:
        if m.group("corner"):
            v, h = m.group("v"), m.group("h")
            v_pair, h_pair = _CORNER_V[v.lower()], _CORNER_H[h.lower()]
            new_v = v_pair[h_pair.index(h.lower())]  # the old horizontal side, said vertically
            new_h = h_pair[v_pair.index(v.lower())]  # the old vertical side, said horizontally
            return _cased(new_v, v) + m.group("sep") + _cased(new_h, h)
        if m.group("phrase"):
            old = m.group("phrase")
            return _cased(_T_PHRASE[" ".join(re.split(_SEP, old.lower()))], old)
        word = m.group("word")
        new = _T_WORD.get(word.lower())
        return word if new is None else _cased(new, word)

    return _T_PATTERN.sub(swap, text)


def swap_directions(text: str, view: str) -> str:
    """`text` as it reads for the image seen in `view` (see the module docstring): the flip's words
    swapped, then, for views ending in "t", the sentence transposed."""
    flip, transposed = _parts(view)
    text = _flip_words(text, flip)
    return transpose_directions(text) if transposed else text


def _content(letterbox: torch.Tensor, size: int) -> Tuple[int, int]:
    """(height, width) of the letterboxed content from an item's (scale, pad_x, pad_y)."""
    pad_x, pad_y = int(round(float(letterbox[1]))), int(round(float(letterbox[2])))
    return size - pad_y, size - pad_x


def flip_map(x: torch.Tensor, view: str, hw: Tuple[int, int]) -> torch.Tensor:
    """(..., S, S) `x` seen in `view`: its top-left hw = (h, w) content flipped (padding untouched), then,
    for views ending in "t", the square transposed (the content now (w, h), still top-left); a copy."""
    flip, transposed = _parts(view)
    dims = {"none": (), "h": (-1,), "v": (-2,), "hv": (-2, -1)}[flip]
    x = x.clone()
    if dims:
        h, w = hw
        x[..., :h, :w] = torch.flip(x[..., :h, :w], dims)
    return x.transpose(-2, -1).contiguous() if transposed else x


def flip_points(p: torch.Tensor, view: str, hw: Tuple[int, int]) -> torch.Tensor:
    """Pixel-index [x, y] points (..., 2) mapped like flip_map maps pixels of a content of size hw
    (NaN stays NaN)."""
    flip, transposed = _parts(view)
    h, w = hw
    p = p.clone()
    if "h" in flip:
        p[..., 0] = (w - 1) - p[..., 0]
    if "v" in flip:
        p[..., 1] = (h - 1) - p[..., 1]
    return p.flip(-1) if transposed else p


def flip_item(item: dict, view: str) -> dict:
    """A data set item (RefSegDataset) as seen in `view`: image, mask, clicks and text moved together."""
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
    if _parts(view)[1]:  # the transposed image's letterbox: pads and original size swap
        out["letterbox"] = item["letterbox"][[0, 2, 1]]  # (scale, pad_x, pad_y) -> (scale, pad_y, pad_x)
        if "orig_hw" in item:
            out["orig_hw"] = item["orig_hw"].flip(0)
    return out
