"""Hand-made refer-format folders for the data tests (not the SynthRef generator).

`make_refcoco(root)` writes the RefCOCO layout: `refs(unc).p` (protocol 2,
as the original Python 2 files), `instances.json` with polygons, a list
holding a compressed RLE, a bare uncompressed RLE and a bare compressed RLE,
and JPG/PNG images. `extras=True` adds the keys SynthRef stores (clicks,
class_name, form, weak) and a no-target ref.

`make_rrsisd(root)` writes the RRSIS-D layout: `categories_id` on the
annotations, category id 0, one sentence per ref, ref_id == ann_id ==
image_id == sent_id (starting at 0).

Both return a `Fixture` with the folder and the exact masks of the RLE
annotations / approximate boxes of the polygon ones.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


@dataclass
class Fixture:
    root: Path
    masks: dict = field(default_factory=dict)  # ann_id -> exact (H, W) uint8 mask (RLE annotations)
    boxes: dict = field(default_factory=dict)  # ann_id -> (x0, y0, x1, y1) exclusive box of a rectangle polygon


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts written by hand: column-major runs, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(v), 1
    counts.append(run)
    return counts


def rle_counts_dict(mask: np.ndarray) -> dict:
    """An uncompressed RLE dict (list counts) (list counts), as COCO crowd annotations store it."""
    return {"size": list(mask.shape), "counts": rle_counts(mask)}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _box_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _write_image(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _sentence(sid: int, raw: str, keys=("tokens", "raw", "sent"), form=None) -> dict:
    s = {"sent_id": sid}
    if "tokens" in keys:
        s["tokens"] = raw.lower().split()
    if "raw" in keys:
        s["raw"] = raw
    if "sent" in keys:
        s["sent"] = raw.lower()
    if form is not None:
        s["form"] = form
    return s


def _write(root: Path, refs: list, instances: dict, protocol: int = 2) -> None:
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=protocol)
    (root / "instances.json").write_text(json.dumps(instances))


def make_refcoco(root, extras: bool = False) -> Fixture:
    """Three images (24x32 JPG, 30x20 PNG, 16x16 PNG), six annotations, five refs over train/val/testA/testB."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    fx = Fixture(root)
    images = [
        {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 24, "width": 32},
        {"id": 2, "file_name": "COCO_train2014_000000000002.png", "height": 30, "width": 20},
        {"id": 3, "file_name": "COCO_val2014_000000000003.png", "height": 16, "width": 16},
    ]
    for im in images:
        _write_image(root / "images" / im["file_name"], im["height"], im["width"], im["id"])
    m102 = _box_mask(24, 32, 18, 2, 28, 20)
    m102[5:8, 20:22] = 0  # a hole, so the RLE is not a plain box
    m103 = _box_mask(30, 20, 3, 12, 15, 27)
    m105 = _box_mask(16, 16, 0, 0, 4, 4)
    m106 = _box_mask(16, 16, 6, 5, 13, 14)
    fx.masks = {102: m102, 103: m103, 105: m105, 106: m106}
    fx.boxes = {101: (4, 4, 12, 10)}
    annotations = [
        {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 60.0, "bbox": [4, 4, 8, 6],
         "segmentation": [[4, 4, 12, 4, 12, 10, 4, 10], [0, 0, 1, 0]]},  # second part: degenerate, no area
        {"id": 102, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": float(m102.sum()), "bbox": [18, 2, 10, 18],
         "segmentation": [compressed_rle(m102)]},
        {"id": 103, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": float(m103.sum()), "bbox": [3, 12, 12, 15],
         "segmentation": {"size": [30, 20], "counts": rle_counts(m103)}},
        {"id": 104, "image_id": 2, "category_id": 2, "iscrowd": 0, "area": 40.0, "bbox": [2, 2, 10, 8],
         "segmentation": [[2, 2, 12, 2, 7, 10]]},
        {"id": 105, "image_id": 3, "category_id": 2, "iscrowd": 0, "area": 16.0, "bbox": [0, 0, 4, 4],
         "segmentation": [rle_counts_dict(m105)]},
        {"id": 106, "image_id": 3, "category_id": 1, "iscrowd": 0, "area": float(m106.sum()), "bbox": [6, 5, 7, 9],
         "segmentation": compressed_rle(m106)},
    ]
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 2, "name": "dog", "supercategory": "animal"}]
    refs = [
        {"ref_id": 10, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "train", "sent_ids": [1000, 1001],
         "file_name": "COCO_train2014_000000000001_101.jpg",
         "sentences": [_sentence(1000, "Man on the LEFT"), _sentence(1001, "left guy")]},
        {"ref_id": 11, "ann_id": 102, "image_id": 1, "category_id": 2, "split": "train", "sent_ids": [1002],
         "file_name": "nonexistent.jpg", "sentences": [_sentence(1002, "Dog with a hole", keys=("raw",))]},
        {"ref_id": 12, "ann_id": 103, "image_id": 2, "category_id": 1, "split": "val", "sent_ids": [1003],
         "file_name": "x.jpg", "sentences": [_sentence(1003, "crowd at the bottom", keys=("tokens",))]},
        {"ref_id": 13, "ann_id": 104, "image_id": 2, "category_id": 2, "split": "testA", "sent_ids": [1004],
         "file_name": "x.jpg", "sentences": [_sentence(1004, "top dog")]},
        {"ref_id": 14, "ann_id": 106, "image_id": 3, "category_id": 1, "split": "testB", "sent_ids": [1005],
         "file_name": "x.jpg", "sentences": [_sentence(1005, "the person in the middle")]},
    ]
    if extras:
        forms = {1000: "location", 1001: "attribute", 1002: "attribute", 1003: "location",
                 1004: "ordinal", 1005: "relation"}
        for ref in refs:
            for s in ref["sentences"]:
                s["form"] = forms[s["sent_id"]]
            ref["class_name"] = categories[ref["category_id"] - 1]["name"]
        # stored clicks deliberately differ from the mask-derived ones, so tests can tell them apart
        refs[0].update(click_center=[6, 5], click_corners=[[4, 4], [11, 9]])
        refs[1].update(click_center=[20, 12], click_corners=[[18, 2], [27, 19]], weak=True)
        refs[2].update(click_center=[9, 18], click_corners=[[3, 12], [14, 26]])
        refs.append({"ref_id": 15, "ann_id": -1, "image_id": 1, "category_id": 2, "split": "train",
                     "sent_ids": [1006], "no_target": True, "class_name": "dog", "click_center": None,
                     "click_corners": None, "sentences": [_sentence(1006, "the cat", form="class")]})
    _write(root, refs, {"images": images, "annotations": annotations, "categories": categories})
    return fx


def make_rrsisd(root) -> Fixture:
    """Three 20x20 JPG images, one object referred per image; ids 0, 1, 2; categories 0 ('airplane'), 1 ('ship')."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    fx = Fixture(root)
    images, annotations, refs = [], [], []
    cats = {0: 0, 1: 1, 2: 0}
    splits = {0: "train", 1: "val", 2: "test"}
    for i in range(3):
        name = f"{i:05d}.jpg"
        images.append({"id": i, "file_name": name, "height": 20, "width": 20})
        _write_image(root / "images" / name, 20, 20, 10 + i)
        m = _box_mask(20, 20, 2 + i, 3, 10 + i, 12)
        fx.masks[i] = m
        annotations.append({"id": i, "image_id": i, "categories_id": cats[i], "iscrowd": 0, "area": float(m.sum()),
                            "bbox": [2 + i, 3, 8, 9], "segmentation": [compressed_rle(m)]})
        ref = {"ref_id": i, "ann_id": i, "image_id": i, "split": splits[i], "sent_ids": [i],
               "file_name": name, "sentences": [_sentence(i, f"the object number {i}")]}
        if i != 2:
            ref["category_id"] = cats[i]  # ref 2 has none: it comes from the annotation's categories_id
        refs.append(ref)
    categories = [{"id": 0, "name": "airplane", "supercategory": "airplane"},
                  {"id": 1, "name": "ship", "supercategory": "ship"}]
    _write(root, refs, {"images": images, "annotations": annotations, "categories": categories})
    return fx


def edit(root, refs=None, instances=None) -> None:
    """Rewrite a fixture after `refs(list)` / `instances(dict)` modify the loaded objects in place."""
    root = Path(root)
    with open(root / "refs(unc).p", "rb") as f:
        ref_list = pickle.load(f)  # the test's own file, written above
    inst = json.loads((root / "instances.json").read_text())
    if refs is not None:
        refs(ref_list)
    if instances is not None:
        instances(inst)
    _write(root, ref_list, inst)
