"""Read refer-format data sets: RefCOCO, RefCOCO+, RefCOCOg, RRSIS-D, SynthRef.

A data set is a folder holding `refs(<split_by>).p` (a pickled list of ref
dicts) and `instances.json` (COCO style), plus an images folder. The refs'
own `file_name` is ignored; images are found through `instances.json`.

RRSIS-D quirks are resolved here, once: annotations name their category
`categories_id`; category ids start at 0 (never tested for truthiness);
ids coincide. After `load_refer` every ref in `refs_by_id` carries
`category_id`, `class_name`, `no_target`, `weak` and normalised
`sentences` (each with `sent_id`, `text` and, if stored, `form`), plus
whatever extra keys the file had (click_center, click_corners, ...).

Everything is checked once, when the data set is loaded, so that bad data
is refused up front instead of giving wrong results later; every error
names the file, the id and the field at fault:
- ids: integers, no duplicate image, annotation, category, ref or
  sentence id (a duplicate would silently replace the first entry);
- text (sentences, forms, class and category names, file names): strings
  of valid Unicode (no lone surrogates); a sentence is not empty or only
  whitespace, and its `sent`, `raw`, `tokens` and `form` have their types;
- annotations: on a listed image; `bbox` four finite numbers, `area` a
  finite number >= 0; polygon coordinates finite numbers inside the image
  give or take `POLYGON_MARGIN`, polygons of >= 3 points; the
  segmentation of every annotation a ref points to rasterises to a
  non-empty mask (an empty ground truth would score an empty prediction
  as a perfect one).
"""

from __future__ import annotations

import json
import math
import pickle
import reprlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
from pycocotools import mask as mask_utils

from refseg.data.image import MAX_PIXELS, load_image_rgb
from refseg.data.atomic import INCOMPLETE_MARKER

SPLIT_ORDER = ("train", "val", "testA", "testB", "test")
POLYGON_MARGIN = 0.1  # polygon points may lie this share of the image size (+ 2 px) outside it
SENTENCE_KEYS = ("sent", "raw", "tokens")  # where a sentence's text is read from, first present wins

_SHOW = reprlib.Repr()  # values in messages: short, and safe for deeply nested ones
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 80, 80, 3, 8, 4


def _show(value) -> str:
    return _SHOW.repr(value)


def _label(entry: dict, key: str, index: int) -> str:
    """How messages name an entry: its id, or #index when it has none."""
    return _show(entry[key]) if key in entry else f"#{index}"


class ReferFormatError(ValueError):
    """A refer-format data set is missing a piece or holds a malformed field."""


class ReferFileNotFoundError(ReferFormatError, FileNotFoundError):
    """A file the data set needs (refs, instances.json, an image) does not exist."""


@dataclass(frozen=True)
class Sample:
    """One (image, expression) pair: a sentence of a ref. `ann_id` is -1 for no-target refs."""

    sent_id: int
    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    class_name: str
    text: str
    form: Optional[str]
    no_target: bool
    weak: bool


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only dict, list, tuple, set, str, bytes, int, float, bool and None.

    `find_class` refuses every global (a class, os.system, eval, ...) before
    looking it up, so a pickle that tries to run code fails without running
    it. Those types need no global in the opcodes real refs files use;
    the exceptions are sets in protocols < 4 and bytes written by Python 3
    in protocol 2, which are refused too (re-pickle with protocol >= 4).
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"global '{module}.{name}' is not allowed: refs files may hold only plain containers and scalars"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in refs files")


def load_refs_file(path) -> list:
    """Read a pickled refs file with `RestrictedUnpickler`; Python 2 pickles are read as UTF-8 (latin-1 fallback)."""
    path = Path(path)
    if not path.is_file():
        raise ReferFileNotFoundError(f"refs file not found: {path}")
    if path.stat().st_size == 0:
        raise ReferFormatError(f"{path}: the refs file is empty (0 bytes)")
    last = None
    for encoding in ("utf-8", "latin1"):
        try:
            with open(path, "rb") as f:
                refs = RestrictedUnpickler(f, encoding=encoding).load()
            break
        except UnicodeDecodeError as e:
            last = e
        except Exception as e:  # pickle raises many types on corrupt input
            raise ReferFormatError(f"{path}: cannot unpickle refs: {e}") from e
    else:
        raise ReferFormatError(f"{path}: cannot decode strings in refs: {last}")
    if not isinstance(refs, list):
        raise ReferFormatError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return refs


def find_refs_file(ann_dir: Path, split_by: Optional[str]) -> tuple[Path, str]:
    """Return (path, split_by) of the refs file; auto-detect when exactly one `refs(*).p` exists."""
    found = sorted(ann_dir.glob("refs(*).p"))
    names = ", ".join(p.name for p in found) or "none"
    if split_by is not None:
        path = ann_dir / f"refs({split_by}).p"
        if not path.is_file():
            raise ReferFileNotFoundError(f"refs file not found: {path} (refs files in {ann_dir}: {names})")
        return path, split_by
    if not found:
        if not ann_dir.is_dir():
            raise ReferFileNotFoundError(f"data set folder not found: {ann_dir}")
        raise ReferFileNotFoundError(f"no refs(<split_by>).p file in {ann_dir}")
    if len(found) > 1:
        raise ReferFormatError(f"several refs files in {ann_dir} ({names}); choose one with split_by / --split-by")
    return found[0], found[0].name[len("refs(") : -len(").p")]


def _int(value, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ReferFormatError(f"{where}: field '{field}' must be an integer, got {_show(value)}")
    return int(value)


def _text(value, where: str, field: str, empty_ok: bool = False) -> str:
    """`value` if it is a str of valid Unicode (and, unless `empty_ok`, not empty or only whitespace)."""
    if not isinstance(value, str):
        raise ReferFormatError(f"{where}: field '{field}' must be a string, got {type(value).__name__} {_show(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ReferFormatError(f"{where}: field '{field}' is not valid text: lone surrogate "
                                   f"U+{ord(value[e.start]):04X} at character {e.start} (text decoded with the "
                                   "wrong encoding?)") from None
    if not empty_ok and not value.strip():
        raise ReferFormatError(f"{where}: field '{field}' is empty or only whitespace ({_show(value)})")
    return value


def _finite(value) -> bool:
    """True for an int or float (not a bool) that is finite as a float (an int of 400 digits is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(value, where: str, field: str) -> float:
    """A finite int or float (not a bool) as float."""
    if not _finite(value):
        raise ReferFormatError(f"{where}: field '{field}' must be a finite number, got {_show(value)}")
    return float(value)


def check_segmentation(seg, where: str, hw: Optional[tuple] = None) -> None:
    """Raise ReferFormatError unless `seg` is polygons, a list of RLEs, or a bare RLE dict.

    With `hw` = (height, width) of the image, polygon coordinates must also be
    finite numbers no further than `POLYGON_MARGIN` outside the image (a
    point at 1e9 would make the rasteriser allocate gigabytes).
    """
    if isinstance(seg, dict):
        seg = [seg]
    elif not isinstance(seg, list):
        raise ReferFormatError(f"{where}: field 'segmentation' has unknown form {type(seg).__name__}")
    for part in seg:
        if isinstance(part, dict):
            size = part.get("size")
            if not isinstance(part.get("counts"), (str, bytes, list)) or not isinstance(size, (list, tuple)) \
                    or len(size) != 2:
                raise ReferFormatError(f"{where}: field 'segmentation' RLE needs 'counts' (str, bytes or list) "
                                       "and 'size' [h, w]")
        elif isinstance(part, (list, tuple)):
            if len(part) % 2:
                raise ReferFormatError(f"{where}: field 'segmentation' polygon must be an even list of numbers")
            if hw is not None and part:
                _check_polygon(part, where, hw)
        else:
            raise ReferFormatError(f"{where}: field 'segmentation' has unknown form (list of {type(part).__name__})")


def _check_polygon(poly, where: str, hw: tuple) -> None:
    """Coordinates of one polygon [x0, y0, x1, y1, ...]: finite numbers inside the (h, w) image +- the margin."""
    h, w = hw
    try:
        finite = math.isfinite(sum(poly))  # TypeError on anything but numbers; NaN or inf if any coordinate is
        xs, ys = poly[0::2], poly[1::2]
        box = (min(xs), min(ys), max(xs), max(ys))
    except TypeError:
        raise ReferFormatError(f"{where}: field 'segmentation' polygon must be an even list of numbers, "
                               f"got {_show(poly)}") from None
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        bad = next((v for v in poly if not _finite(v)), None)
        raise ReferFormatError(f"{where}: field 'segmentation' polygon holds a NaN or infinite coordinate "
                               f"({_show(bad)})")
    mx, my = POLYGON_MARGIN * w + 2, POLYGON_MARGIN * h + 2
    if box[0] < -mx or box[1] < -my or box[2] > w + mx or box[3] > h + my:
        raise ReferFormatError(f"{where}: field 'segmentation' polygon reaches ({_show(box[0])}, {_show(box[1])}) "
                               f".. ({_show(box[2])}, {_show(box[3])}), far outside the {w}x{h} (w x h) image")


def _read_instances(path: Path) -> tuple[dict, dict, dict]:
    """instances.json -> (images, annotations, categories), each keyed by id."""
    if not path.is_file():
        raise ReferFileNotFoundError(f"instances file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            inst = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReferFormatError(f"{path}: not valid JSON: {e}") from e
    except RecursionError:
        raise ReferFormatError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # an integer literal of more than 4300 digits
        raise ReferFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(inst, dict):
        raise ReferFormatError(f"{path}: expected a JSON object with 'images' and 'annotations', "
                               f"got a {type(inst).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(inst.get(key), list):
            raise ReferFormatError(f"{path}: field '{key}' must be a list")
    if not isinstance(inst.get("categories", []), list):
        raise ReferFormatError(f"{path}: field 'categories' must be a list")
    for key in ("images", "annotations", "categories"):
        for i, entry in enumerate(inst.get(key, [])):
            if not isinstance(entry, dict):
                raise ReferFormatError(f"{path}: field '{key}' item #{i} is a {type(entry).__name__}, not an object")
    images = {}
    for i, im in enumerate(inst["images"]):
        where = f"{path}: image {_label(im, 'id', i)}"
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise ReferFormatError(f"{where}: field 'file_name' missing or not a string")
        _text(im["file_name"], where, "file_name")
        name = PurePosixPath(im["file_name"].replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
            raise ReferFormatError(f"{where}: field 'file_name' must be a path inside the images folder, "
                                   f"got {_show(im['file_name'])}")
        iid = _int(im.get("id"), where, "id")
        if iid in images:
            raise ReferFormatError(f"{where}: field 'id' is duplicated (two images with id {iid})")
        height, width = _int(im.get("height"), where, "height"), _int(im.get("width"), where, "width")
        if height < 1 or width < 1:
            raise ReferFormatError(f"{where}: fields 'height' x 'width' = {height} x {width} must be positive")
        if height * width > MAX_PIXELS:
            raise ReferFormatError(f"{where}: fields 'height' x 'width' = {_show(height)} x {_show(width)} is over "
                                   f"the {MAX_PIXELS / 1e6:.0f} MP an image may have")
        images[iid] = {"id": iid, "file_name": im["file_name"], "height": height, "width": width}
    anns = {}
    for i, a in enumerate(inst["annotations"]):
        where = f"{path}: annotation {_label(a, 'id', i)}"
        aid = _int(a.get("id"), where, "id")
        if aid in anns:
            raise ReferFormatError(f"{where}: field 'id' is duplicated (two annotations with id {aid})")
        image_id = _int(a.get("image_id"), where, "image_id")
        if image_id not in images:
            raise ReferFormatError(f"{where}: field 'image_id' = {image_id} has no entry in images")
        cat = a["category_id"] if "category_id" in a else a.get("categories_id")
        bbox = a.get("bbox")
        if bbox is not None:
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ReferFormatError(f"{where}: field 'bbox' must be [x, y, w, h], got {_show(bbox)}")
            if [_number(v, where, "bbox") < 0 for v in bbox][2:] != [False, False]:
                raise ReferFormatError(f"{where}: field 'bbox' has a negative width or height: {_show(bbox)}")
        if a.get("area") is not None and _number(a["area"], where, "area") < 0:
            raise ReferFormatError(f"{where}: field 'area' must be >= 0, got {_show(a['area'])}")
        if "segmentation" not in a:
            raise ReferFormatError(f"{where}: field 'segmentation' missing")
        im = images[image_id]
        check_segmentation(a["segmentation"], where, (im["height"], im["width"]))
        anns[aid] = dict(a, id=aid, image_id=image_id, category_id=_int(cat, where, "category_id"))
    categories = {}
    for c in inst.get("categories", []):
        where = f"{path}: category {_show(c.get('id'))}"
        cid = _int(c.get("id"), where, "id")
        if cid in categories:
            raise ReferFormatError(f"{where}: field 'id' is duplicated (two categories with id {cid})")
        categories[cid] = _text(c.get("name", ""), where, "name", empty_ok=True)
    return images, anns, categories


def decode_segmentation(seg, h: int, w: int, where: str = "segmentation") -> np.ndarray:
    """Segmentation -> (h, w) uint8 {0,1} mask.

    `seg` is polygons (list of [x0, y0, x1, y1, ...]; polygons under 3 points
    have no area and are skipped), a list of RLEs, or a bare RLE; RLE counts
    may be compressed (str or bytes) or uncompressed (list of run lengths).
    """
    if no_mask_given(seg):
        raise ReferFormatError(f"{where}: field 'segmentation' is empty: this data set gives no mask for it "
                               "(text- or click-only data), so it cannot be trained on with masks or evaluated")
    rle = _segmentation_rle(seg, h, w, where, check_strings=True)
    if rle is None:
        return np.zeros((h, w), dtype=np.uint8)
    try:
        m = mask_utils.decode(rle)
    except (ValueError, TypeError, UnicodeError) as e:  # counts that do not add up to h * w, bad characters
        raise ReferFormatError(f"{where}: field 'segmentation' RLE cannot be decoded: {e}") from None
    if m.shape[:2] != (h, w):
        raise ReferFormatError(f"{where}: field 'segmentation' RLE decodes to {m.shape[:2]}, not {(h, w)}")
    return np.ascontiguousarray(m.astype(np.uint8))


def no_mask_given(seg) -> bool:
    """True when an annotation carries no mask at all (`segmentation` absent or an empty list).

    Text- and click-only data sets leave their training masks out this way;
    such an annotation loads, and only reading its mask is an error.
    """
    return seg is None or (isinstance(seg, (list, tuple)) and len(seg) == 0)


def segmentation_area(seg, h: int, w: int, where: str = "segmentation") -> int:
    """Pixels of the (h, w) mask `seg` rasterises to, without decoding the mask.

    Checks what `decode_segmentation` checks except the run lengths of
    compressed RLE strings (pure Python, so left to `decode_segmentation`).
    """
    rle = _segmentation_rle(seg, h, w, where, check_strings=False)
    return 0 if rle is None else int(mask_utils.area(rle))


def _segmentation_rle(seg, h: int, w: int, where: str, check_strings: bool) -> Optional[dict]:
    """The union of a segmentation's parts as one COCO RLE; None when it has no part with an area."""
    check_segmentation(seg, where, (h, w))  # coordinates bounded before the rasteriser sees them
    parts = [seg] if isinstance(seg, dict) else seg
    polys = [[float(v) for v in p] for p in parts if isinstance(p, (list, tuple)) and len(p) >= 6]
    rles = mask_utils.frPyObjects(polys, h, w) if polys else []
    for part in parts:
        if not isinstance(part, dict):
            continue
        size = [_int(v, where, "segmentation.size") for v in part["size"]]
        if size != [h, w]:
            raise ReferFormatError(f"{where}: RLE size {size} differs from the image size {[h, w]}")
        counts = part["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in counts) \
                    or sum(counts) != h * w:
                raise ReferFormatError(f"{where}: field 'segmentation' RLE counts must be non-negative integers "
                                       f"adding up to h * w = {h * w}")
            rles.append(mask_utils.frPyObjects({"size": size, "counts": counts}, h, w))
        else:
            counts = counts.encode("latin-1", "replace") if isinstance(counts, str) else bytes(counts)
            runs = compressed_rle_runs(counts) if check_strings else None
            if check_strings and (runs is None or sum(runs) != h * w):
                raise ReferFormatError(f"{where}: field 'segmentation' RLE counts string is corrupt (its runs do "
                                       f"not add up to h * w = {h * w})")
            rles.append({"size": size, "counts": counts})
    if not rles:
        return None
    try:
        return mask_utils.merge(rles, intersect=False) if len(rles) > 1 else rles[0]
    except (ValueError, TypeError, UnicodeError) as e:
        raise ReferFormatError(f"{where}: field 'segmentation' RLE cannot be decoded: {e}") from None


def compressed_rle_runs(counts: bytes) -> Optional[list]:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString), or None when malformed.

    Each run is a little-endian base-32 number, 5 bits per character
    (character - 48, bit 0x20 = more characters follow, bit 0x10 of the last
    = negative); from the third run on, the value is a difference to the run
    two before. pycocotools decodes whatever it is given, so a corrupt
    string would silently make a wrong mask: this lets the caller check.
    """
    runs: list = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = counts[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)  # sign-extend
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return runs


def clicks_from_mask(mask: np.ndarray):
    """SynthRef click definitions, from an (H, W) {0,1} mask.

    Returns (center [x, y], corners [[x0, y0], [x1, y1]]) as ints, or None for
    an empty mask. center = the pixel farthest from the mask border (maximum
    of the Euclidean distance transform, the image border counting as
    border; ties go to the first pixel in row order); corners = top-left and
    bottom-right pixels of the mask's box, inclusive.
    """
    from scipy.ndimage import distance_transform_edt

    m = np.asarray(mask).astype(bool)
    if not m.any():
        return None
    dist = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]  # (H, W); outside the image counts as background
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)  # argmax: first maximum in row order
    rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    return [int(x), int(y)], [[int(cols[0]), int(rows[0])], [int(cols[-1]), int(rows[-1])]]


def _sentence_text(s: dict, where: str) -> str:
    """The text of a sentence dict: `sent`, else `raw`, else the `tokens` joined by spaces.

    Each of those keys that is present must have its type (str, str, list of
    str; None is not "absent"), `form` is a str or None, and the text read is
    valid Unicode and not empty or only whitespace.
    """
    for key in ("sent", "raw"):
        if key in s:
            _text(s[key], where, key, empty_ok=True)
    if "tokens" in s:
        if not isinstance(s["tokens"], list):
            raise ReferFormatError(f"{where}: field 'tokens' must be a list of strings, got "
                                   f"{type(s['tokens']).__name__} {_show(s['tokens'])}")
        for t in s["tokens"]:
            _text(t, where, "tokens", empty_ok=True)
    if s.get("form") is not None:
        _text(s["form"], where, "form")
    key = next((k for k in SENTENCE_KEYS if k in s), None)
    if key is None:
        raise ReferFormatError(f"{where}: sentence has none of 'sent', 'raw', 'tokens'")
    return _text(" ".join(s[key]) if key == "tokens" else s[key], where, key)


def _normalise_ref(ref, where_file: str, index: int, images: dict, anns: dict, categories: dict) -> dict:
    if not isinstance(ref, dict):
        raise ReferFormatError(f"{where_file}: ref #{index} is a {type(ref).__name__}, not a dict")
    where = f"{where_file}: ref {_label(ref, 'ref_id', index)}"
    for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
        if key not in ref:
            raise ReferFormatError(f"{where}: field '{key}' missing")
    ref_id, ann_id = _int(ref["ref_id"], where, "ref_id"), _int(ref["ann_id"], where, "ann_id")
    image_id = _int(ref["image_id"], where, "image_id")
    if not isinstance(ref["split"], str) or not ref["split"]:
        raise ReferFormatError(f"{where}: field 'split' must be a non-empty string, got {_show(ref['split'])}")
    _text(ref["split"], where, "split")
    for key in ("no_target", "weak"):  # bool("false") is True: only real booleans (or 0 / 1) are read
        value = ref.get(key)
        if value is not None and not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
            raise ReferFormatError(f"{where}: field '{key}' must be true or false, got {_show(value)}")
    if ref.get("class_name") is not None and not isinstance(ref["class_name"], str):
        raise ReferFormatError(f"{where}: field 'class_name' must be a string, got {_show(ref['class_name'])}")
    if ref.get("class_name") is not None:
        _text(ref["class_name"], where, "class_name", empty_ok=True)
    if image_id not in images:
        raise ReferFormatError(f"{where}: field 'image_id' = {image_id} has no entry in instances.json images")
    no_target = bool(ref.get("no_target", False)) or ann_id == -1
    cat = ref["category_id"] if "category_id" in ref else ref.get("categories_id")
    if no_target and ann_id != -1:
        raise ReferFormatError(f"{where}: field 'no_target' is true but 'ann_id' = {ann_id} names an object")
    if not no_target:
        if ann_id not in anns:
            raise ReferFormatError(f"{where}: field 'ann_id' = {ann_id} has no entry in instances.json annotations")
        if anns[ann_id]["image_id"] != image_id:
            raise ReferFormatError(f"{where}: field 'image_id' = {image_id} but annotation {ann_id} "
                                   f"lies on image {anns[ann_id]['image_id']}")
        cat = anns[ann_id]["category_id"] if cat is None else cat
    cat = _int(cat, where, "category_id")  # None (missing) is refused here too
    sentences = ref["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise ReferFormatError(f"{where}: field 'sentences' must be a non-empty list")
    sent_ids = ref.get("sent_ids")
    if sent_ids is not None and (not isinstance(sent_ids, list) or len(sent_ids) != len(sentences)):
        raise ReferFormatError(f"{where}: field 'sent_ids' must be a list as long as 'sentences'")
    norm = []
    for j, s in enumerate(sentences):
        if not isinstance(s, dict):
            raise ReferFormatError(f"{where}: field 'sentences' item {j} is not a dict")
        sid = s.get("sent_id", sent_ids[j] if sent_ids is not None else None)
        sid = _int(sid, f"{where} sentence {j}", "sent_id")
        if any(n["sent_id"] == sid for n in norm):
            raise ReferFormatError(f"{where} sentence {sid}: field 'sent_id' is duplicated")
        norm.append(dict(s, sent_id=sid, text=_sentence_text(s, f"{where} sentence {sid}"), form=s.get("form")))
    for key in ("click_center", "click_corners"):
        if ref.get(key) is None:
            continue
        try:
            value = np.asarray(ref[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise ReferFormatError(f"{where}: field '{key}' must hold numbers, got {_show(ref[key])}") from None
        if value.shape != ((2,) if key == "click_center" else (2, 2)):
            raise ReferFormatError(f"{where}: field '{key}' has shape {value.shape}, expected "
                                   f"{'[x, y]' if key == 'click_center' else '[[x0, y0], [x1, y1]]'}")
        if not np.isfinite(value).all():
            raise ReferFormatError(f"{where}: field '{key}' holds a NaN or infinite value: {_show(ref[key])}")
    class_name = ref.get("class_name") or categories.get(cat, str(cat))
    return dict(ref, ref_id=ref_id, ann_id=ann_id, image_id=image_id, category_id=cat, split=str(ref["split"]),
                sentences=norm, sent_ids=[s["sent_id"] for s in norm], class_name=class_name,
                no_target=no_target, weak=bool(ref.get("weak", False)))


class ReferData:
    """A loaded refer-format data set. Build it with `load_refer`.

    Attributes:
        ann_dir, images_dir: Paths; refs_file: the refs file read; split_by: e.g. "unc".
        refs_by_id: {ref_id: normalised ref dict}, in file order.
        images: {image_id: {"id", "file_name", "height", "width"}}.
        anns: {ann_id: annotation dict with `category_id` resolved}.
        categories: {category_id: name}.
    """

    def __init__(self, ann_dir: Path, images_dir: Path, refs_file: Path, split_by: str,
                 refs_by_id: dict, images: dict, anns: dict, categories: dict):
        self.ann_dir, self.images_dir, self.refs_file, self.split_by = ann_dir, images_dir, refs_file, split_by
        self.refs_by_id, self.images, self.anns, self.categories = refs_by_id, images, anns, categories
        self._instances = ann_dir / "instances.json"
        self._clicks: dict = {}
        self._samples: dict[str, list[Sample]] = {}
        for ref in refs_by_id.values():
            for s in ref["sentences"]:
                self._samples.setdefault(ref["split"], []).append(Sample(
                    sent_id=s["sent_id"], ref_id=ref["ref_id"], ann_id=ref["ann_id"], image_id=ref["image_id"],
                    category_id=ref["category_id"], class_name=ref["class_name"], text=s["text"], form=s["form"],
                    no_target=ref["no_target"], weak=ref["weak"]))

    def splits(self) -> list[str]:
        """Split names: train, val, testA, testB, test first (those present), then the others sorted."""
        present = set(self._samples)
        return [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))

    def samples(self, split: str) -> list[Sample]:
        """One Sample per sentence of the split, in refs-file order then sentence order."""
        if split not in self._samples:
            raise KeyError(f"split {split!r} not in {self.refs_file} (splits: {', '.join(self.splits())})")
        return list(self._samples[split])

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(height, width) of an image as instances.json records it."""
        im = self.images[image_id]
        return im["height"], im["width"]

    def load_image(self, image_id: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of the image, matching instances.json's height and width.

        EXIF orientation is applied unless only the stored (un-rotated) pixels
        match the annotated size, as happens for some COCO photos.
        """
        if image_id not in self.images:
            raise KeyError(f"image {image_id} has no entry in {self._instances}")
        im = self.images[image_id]
        path = self.images_dir / im["file_name"]
        if not path.is_file():
            raise ReferFileNotFoundError(
                f"image {image_id}: file not found: {path} (field 'file_name' in {self._instances})")
        hw = (im["height"], im["width"])
        img = load_image_rgb(path)
        if img.shape[:2] != hw:
            raw = load_image_rgb(path, exif=False)
            if raw.shape[:2] != hw:
                raise ReferFormatError(
                    f"image {image_id}: {path} is {img.shape[1]}x{img.shape[0]} (w x h) but {self._instances} "
                    f"says {hw[1]}x{hw[0]}")
            img = raw
        return img

    def get_mask(self, ann_id: int, image_id: Optional[int] = None) -> np.ndarray:
        """(H, W) uint8 {0,1} mask of an annotation at the image's original resolution.

        ann_id == -1 (no-target) gives zeros; pass `image_id` to size them.
        """
        if ann_id == -1:
            if image_id is None:
                raise ValueError("get_mask(-1) needs image_id to know the size of the empty mask")
            return np.zeros(self.image_size(image_id), dtype=np.uint8)
        if ann_id not in self.anns:
            raise KeyError(f"annotation {ann_id} has no entry in {self._instances}")
        ann = self.anns[ann_id]
        h, w = self.image_size(ann["image_id"])
        return decode_segmentation(ann.get("segmentation"), h, w, f"{self._instances}: annotation {ann_id}")

    def clicks(self, ref_id: int):
        """(center [x, y], corners [[x0, y0], [x1, y1]]) of a ref, original pixels; None for no-target.

        Stored `click_center` / `click_corners` are returned as they are;
        otherwise they are derived from the mask (see `clicks_from_mask`) and
        remembered.
        """
        ref = self.refs_by_id[ref_id]
        if ref["no_target"]:
            return None
        if ref.get("click_center") is not None and ref.get("click_corners") is not None:
            return ref["click_center"], ref["click_corners"]
        if ref_id not in self._clicks:
            self._clicks[ref_id] = clicks_from_mask(self.get_mask(ref["ann_id"]))
        return self._clicks[ref_id]


def load_refer(ann_dir, split_by: Optional[str] = None, images_dir=None) -> ReferData:
    """Load a refer-format data set from `ann_dir` (images from `images_dir`, default `ann_dir/images`)."""
    ann_dir = Path(ann_dir)
    if (ann_dir / INCOMPLETE_MARKER).exists():
        raise ReferFormatError(f"{ann_dir} is incomplete: the run writing it (refseg make-data / weaken) was killed "
                               f"or is still going ({INCOMPLETE_MARKER} present); generate it again")
    refs_file, split_by = find_refs_file(ann_dir, split_by)
    images, anns, categories = _read_instances(ann_dir / "instances.json")
    refs_by_id: dict = {}
    sent_ref: dict = {}  # sent_id -> ref_id
    for i, raw in enumerate(load_refs_file(refs_file)):
        ref = _normalise_ref(raw, str(refs_file), i, images, anns, categories)
        if ref["ref_id"] in refs_by_id:
            raise ReferFormatError(f"{refs_file}: ref {ref['ref_id']}: field 'ref_id' is duplicated")
        for sid in ref["sent_ids"]:
            if sid in sent_ref:
                raise ReferFormatError(f"{refs_file}: ref {ref['ref_id']} sentence {sid}: field 'sent_id' is "
                                       f"duplicated (ref {sent_ref[sid]} has it too)")
            sent_ref[sid] = ref["ref_id"]
        refs_by_id[ref["ref_id"]] = ref
    checked = set()
    for ref in refs_by_id.values():  # an empty ground truth would score an empty prediction as perfect
        ann_id = ref["ann_id"]
        if ref["no_target"] or ann_id in checked or no_mask_given(anns[ann_id].get("segmentation")):
            continue
        checked.add(ann_id)
        im = images[anns[ann_id]["image_id"]]
        where = f"{ann_dir / 'instances.json'}: annotation {ann_id}"
        if segmentation_area(anns[ann_id]["segmentation"], im["height"], im["width"], where) == 0:
            raise ReferFormatError(f"{where}: field 'segmentation' rasterises to an empty mask (polygons of "
                                   f"under 3 points or no area, or outside the image); ref {ref['ref_id']} "
                                   "refers to it")
    images_dir = Path(images_dir) if images_dir is not None else ann_dir / "images"
    return ReferData(ann_dir, images_dir, refs_file, split_by, refs_by_id, images, anns, categories)
