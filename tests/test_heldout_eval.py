"""`refseg eval` on a held-out refer-format data set written by hand (not by the generator).

The folder follows docs/SYNTHREF.md as another tool would write it:
320 x 320 PNGs drawn with PIL, `instances.json` with each mask as
`segmentation: [<one RLE, counts as str>]`, a `refs(unc).p` pickle, and
nothing else: no `synthref.json`, no sentence `form`, no `click_center` /
`click_corners` / `class_name`, one sentence without `sent`, and keys no
reader knows. The masks are drawn without anti-aliasing, so the test knows
every ground-truth pixel count exactly.

Hand-checkable case: one sentence's ground truth is the whole image, so its
IoU must equal the predicted area / (320 * 320), whatever the model predicts,
and its response-map argmax always lies inside the mask.
"""

import json
import pickle

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from refseg.cli import main as cli

S = 320
WHOLE = "the whole picture"


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _shape(draw: ImageDraw.ImageDraw, kind: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle, apex up
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


# per image: (kind, colour name, rgb, box); the first object of each image is described
SCENES = [
    [("circle", "red", (220, 40, 40), (40, 60, 120, 140)), ("square", "blue", (40, 80, 220), (190, 170, 280, 260))],
    [("square", "green", (40, 170, 60), (200, 30, 290, 120)),
     ("triangle", "yellow", (240, 210, 40), (30, 180, 130, 290))],
    [("triangle", "blue", (40, 80, 220), (120, 100, 230, 220)), ("circle", "white", (240, 240, 240), (20, 20, 80, 80))],
]
CATEGORIES = {"circle": 1, "square": 2, "triangle": 3, "picture": 4}


def write_heldout(root):
    """Write the folder; return {sent_id: (split, ground-truth mask (S, S) bool, text)}."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(7)
    images, anns, refs, truth = [], [], [], {}
    sent_id = 100
    for i, scene in enumerate(SCENES):
        image_id = 11 + i
        img = Image.fromarray(rng.integers(90, 150, (S, S, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        masks = []
        for k, (kind, _, rgb, box) in enumerate(scene):
            m = Image.new("L", (S, S), 0)
            _shape(ImageDraw.Draw(m), kind, box, 1)  # no anti-aliasing: the drawn pixels are the mask
            _shape(draw, kind, box, rgb)
            masks.append(np.array(m, dtype=bool))
        for k, mask in enumerate(masks):  # a later shape covers an earlier one
            for later in masks[k + 1:]:
                mask &= ~later
        file_name = f"held_{image_id}.png"
        img.save(root / "images" / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": S, "width": S, "license": 3})
        for k, ((kind, colour, _, box), mask) in enumerate(zip(scene, masks)):
            ann_id = 1000 + 10 * image_id + k
            ys, xs = np.nonzero(mask)
            anns.append({"id": ann_id, "image_id": image_id, "category_id": CATEGORIES[kind], "iscrowd": 0,
                         "area": int(mask.sum()), "segmentation": [_rle(mask)],
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})
            if k:
                continue
            texts = [f"the {colour} {kind}", f"the {kind}"] if i < 2 else [f"the {colour} {kind}"]
            split = "val" if i == 2 else "test"
            sentences = []
            for j, text in enumerate(texts):
                sent = {"sent_id": sent_id, "raw": text, "tokens": text.split()}
                if not (i == 1 and j == 1):
                    sent["sent"] = text
                sentences.append(sent)
                truth[sent_id] = (split, mask, text)
                sent_id += 1
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                         "category_id": CATEGORIES[kind], "sent_ids": [s["sent_id"] for s in sentences],
                         "sentences": sentences, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                         "annotator": "another tool"})
    # the whole image of the first scene, as its own annotation and ref
    whole = np.ones((S, S), dtype=bool)
    anns.append({"id": 5000, "image_id": 11, "category_id": 4, "iscrowd": 0, "area": S * S,
                 "segmentation": [_rle(whole)], "bbox": [0, 0, S, S]})
    refs.append({"ref_id": 5000, "ann_id": 5000, "image_id": 11, "split": "test", "category_id": 4,
                 "sent_ids": [sent_id], "sentences": [{"sent_id": sent_id, "raw": WHOLE, "sent": WHOLE,
                                                        "tokens": WHOLE.split()}]})
    truth[sent_id] = ("test", whole, WHOLE)
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (root / "instances.json").write_text(json.dumps({
        "images": images, "annotations": anns,
        "categories": [{"id": v, "name": k, "supercategory": "thing"} for k, v in CATEGORIES.items()]}))
    return truth


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout") / "refer"
    truth = write_heldout(root)
    out = root.parent / "eval.json"
    md = root.parent / "eval.md"
    rc = cli(["eval", "--checkpoint", "lts-synthref", "--data", str(root), "--split", "test", "--threads", "1",
              "--out", str(out), "--per-sample", "--markdown", str(md)])
    assert rc == 0
    return root, truth, json.loads(out.read_text(), parse_constant=_no_constants), md.read_text()


def _no_constants(name):
    raise AssertionError(f"results JSON holds {name}, not strict JSON")


def test_counts_and_ranges(heldout):
    _, truth, result, _ = heldout
    test_sents = {sid for sid, (split, _, _) in truth.items() if split == "test"}
    assert len(test_sents) == 5
    m = result["metrics"]
    assert m["n"] == 5
    assert {r["sent_id"] for r in result["samples"]} == test_sents
    for key in ("oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "PointM"):
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["by_form"] == {}  # no sentence carries a form


def test_ground_truth_is_read_as_written(heldout):
    """Each sentence's ground-truth pixel count is the count of the mask the test drew."""
    _, truth, result, _ = heldout
    for r in result["samples"]:
        assert r["gt_pixels"] == int(truth[r["sent_id"]][1].sum()), r


def test_whole_image_case(heldout):
    """GT = every pixel: IoU = predicted pixels / (320 * 320), and the argmax point always hits."""
    _, truth, result, _ = heldout
    whole = [r for r in result["samples"] if truth[r["sent_id"]][2] == WHOLE]
    assert len(whole) == 1
    r = whole[0]
    assert r["gt_pixels"] == S * S
    assert r["iou"] == pytest.approx(r["pred_pixels"] / (S * S), abs=1e-12)
    assert r["point_in_mask"] is True


def test_aggregates_match_the_records(heldout):
    _, _, result, _ = heldout
    ious = np.array([r["iou"] for r in result["samples"]])
    m = result["metrics"]
    assert m["mIoU"] == pytest.approx(ious.mean(), abs=1e-9)
    assert m["P@0.5"] == pytest.approx((ious >= 0.5).mean(), abs=1e-9)
    hits = [r["point_in_mask"] for r in result["samples"]]
    assert m["PointM"] == pytest.approx(np.mean(hits), abs=1e-9)


def test_iou_against_the_drawn_masks(heldout):
    """A second path: the Predictor's masks against the test's own masks give the same per-sentence IoU."""
    import torch

    import refseg

    root, truth, result, _ = heldout
    torch.set_num_threads(1)
    predictor = refseg.Predictor(refseg.load("lts-synthref"))
    by_image = {}
    for r in result["samples"]:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id, records in by_image.items():
        predictor.set_image(root / "images" / f"held_{image_id}.png")
        pred = predictor.predict([truth[r["sent_id"]][2] for r in records])
        for r, mask in zip(records, pred.masks):
            gt = truth[r["sent_id"]][1]
            iou = (mask & gt).sum() / max((mask | gt).sum(), 1)
            assert r["iou"] == pytest.approx(iou, abs=0.02), (truth[r["sent_id"]][2], r)


def test_markdown_table(heldout):
    _, _, result, md = heldout
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 3  # header, separator, one row (no forms)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[1:] == ["oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "PointM", "n"]
    assert cells[-1] == "5"
    assert float(cells[header.index("mIoU")]) == pytest.approx(100 * result["metrics"]["mIoU"], abs=0.006)
