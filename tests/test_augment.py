"""Flip augmentation (refseg/data/augment.py) and its use by the training loop (--flip)."""

import csv
import json
import pickle

import numpy as np
import pytest
import torch
from _engine_fixtures import SIZE, make_shapes_refer, one_thread, tiny_config, tiny_model  # noqa: F401 (autouse fixture)
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.data.augment import FLIP_CHOICES, VIEWS, flip_map, flip_item, swap_directions, transpose_directions
from refseg.data.synthref import grammar
from refseg.data.synthref.grammar import resolve
from refseg.data.synthref.verify import facts_from_annotations
from refseg.data.synthref.vocab import VOCABS
from refseg.data.dataset import RefSegDataset, collate
from refseg.data.refer import load_refer, load_refs_file
from refseg.engine import cache as feature_cache
from refseg.engine.config import FLIP_CHOICES as CONFIG_FLIPS
from refseg.engine.config import ConfigError, TrainConfig
from refseg.engine.train import cached_batch, draw_views, train

CPU = torch.device("cpu")


@pytest.mark.parametrize("text, view, expected", [
    ("the leftmost airplane", "h", "the rightmost airplane"),
    ("the airplane left of the tennis court", "h", "the airplane right of the tennis court"),
    ("the storage tank below the airplane", "v", "the storage tank above the airplane"),
    ("the storage tank below the airplane", "h", "the storage tank below the airplane"),
    ("the vehicle in the top left", "hv", "the vehicle in the bottom right"),
    ("the topmost building", "v", "the bottommost building"),
    ("the upper-left car", "v", "the lower-left car"),
    ("Left of the car, the north-east tank", "hv", "Right of the car, the south-west tank"),
    ("the northwest corner", "h", "the northeast corner"),
    ("the northwest corner", "v", "the southwest corner"),
    ("the northwest corner", "hv", "the southeast corner"),
    ("the lefty bottomless cup", "hv", "the lefty bottomless cup"),  # only whole words
    ("the red star", "hv", "the red star"),
    ("the leftmost airplane", "none", "the leftmost airplane"),
])
def test_swap_directions(text, view, expected):
    assert swap_directions(text, view) == expected


@pytest.mark.parametrize("text, expected", [
    ("the airplane on the left", "the airplane at the top"),
    ("the airplane at the bottom", "the airplane on the right"),
    ("the ship left of the building", "the ship above the building"),
    ("the ship below the building", "the ship right of the building"),
    ("the leftmost vehicle", "the topmost vehicle"),
    ("the bottommost vehicle", "the rightmost vehicle"),
    ("the vehicle in the top right", "the vehicle in the bottom left"),
    ("the vehicle in the top left", "the vehicle in the top left"),  # on the diagonal: stays
    ("the vehicle in the bottom right", "the vehicle in the bottom right"),
    ("the tank at the top right", "the tank at the bottom left"),  # a corner, not "at the top"
    ("the car to the left of the tank", "the car above the tank"),
    ("the plane on top of the hangar", "the plane left of the hangar"),
    ("the upper-right car", "the lower-left car"),
    ("The north-east tank", "The south-west tank"),
    ("the northwest corner", "the northwest corner"),
    ("the horizontal runway", "the vertical runway"),
    ("The Leftmost ship", "The Topmost ship"),
    ("the lefty bottomless cup in the middle", "the lefty bottomless cup in the middle"),
    ("the largest storage tank", "the largest storage tank"),
])
def test_transpose_directions(text, expected):
    assert transpose_directions(text) == expected


def test_views_compose_flip_then_transpose():
    text = "the leftmost ship in the top right above the car"
    assert swap_directions(text, "t") == "the topmost ship in the bottom left left of the car"
    for flip in ("h", "v", "hv"):
        assert swap_directions(text, flip + "t") == transpose_directions(swap_directions(text, flip))
    assert swap_directions(text, "ht") == "the bottommost ship in the top left left of the car"


def test_synthref_sentences_stay_true_in_every_view(synthref_tiny, monkeypatch):
    """Every SynthRef sentence, rewritten for a view, names the same object (or nothing) among the
    objects whose masks were moved by that view: the grammar's own evaluator is the judge.

    The generator keeps every tested centroid more than MARGIN px from a threshold; in pixel indices the
    thresholds (W/3, 2W/3) are not mirror images of each other (x -> W - 1 - x moves a centroid 1 px
    relative to them), so the judge here leaves a margin 1 px narrower."""
    monkeypatch.setattr(grammar, "MARGIN", grammar.MARGIN - 1)
    vocab = VOCABS["natural"]
    inst = json.loads((synthref_tiny / "instances.json").read_text())
    by_image = {}
    for ann in sorted(inst["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    refs = load_refs_file(synthref_tiny / "refs(unc).p")
    changed = {}
    for view in VIEWS:
        facts = {}
        for image_id, anns in by_image.items():
            moved = []
            for a in anns:
                m = torch.from_numpy(mask_utils.decode(dict(a["segmentation"][0],
                                                            counts=a["segmentation"][0]["counts"].encode())))
                m = flip_map(m, view, tuple(m.shape)).numpy()
                rle = mask_utils.encode(np.asfortranarray(m))
                moved.append(dict(a, segmentation=[dict(rle, counts=rle["counts"].decode("ascii"))]))
            facts[image_id] = facts_from_annotations(moved)
        for ref in refs:
            anns = by_image[ref["image_id"]]
            for s in ref["sentences"]:
                text = swap_directions(s["raw"], view)
                changed[view] = changed.get(view, 0) + (text != s["raw"])
                match = resolve(text, facts[ref["image_id"]], vocab)
                if ref["no_target"]:
                    assert match.empty, (view, s["raw"], text)
                else:
                    assert match.unique is not None and anns[match.unique]["id"] == ref["ann_id"], (view, s["raw"], text)
    assert changed["none"] == 0 and all(changed[v] > 50 for v in VIEWS[1:]), changed


def test_swap_directions_is_an_involution_and_hv_is_h_then_v():
    words = ["left", "right", "top", "bottom", "above", "below", "upper", "lower", "leftmost", "topmost",
             "north", "southeast", "up", "down", "highest", "the", "middle"]
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = " ".join(rng.choice(words, size=6))
        for view in ("h", "v", "hv"):
            assert swap_directions(swap_directions(text, view), view) == text
        assert swap_directions(text, "hv") == swap_directions(swap_directions(text, "h"), "v")
    with pytest.raises(ValueError, match="view must be one of"):
        swap_directions("the left one", "r90")


def test_flipped_items_stay_true(tmp_path):
    """The shapes data say "the square on the left" of the square in the left half; in the mirror image
    that square lies in the right half, and the flipped item says so."""
    data = load_refer(make_shapes_refer(tmp_path / "data", n_train=4, n_val=1))
    ds = RefSegDataset(data, "train", SIZE, "full")
    checked = 0
    for i, s in enumerate(ds.samples):
        if "on the left" not in s.text and "on the right" not in s.text:
            continue
        item, flipped = ds[i], ds[(i, "h")]
        x = lambda m: float(torch.nonzero(m[0])[:, 1].float().mean())  # mask centroid, x
        assert (x(item["mask"]) < SIZE / 2) == ("on the left" in item["text"])
        assert (x(flipped["mask"]) < SIZE / 2) == ("on the left" in flipped["text"])
        assert flipped["text"] != item["text"]
        assert torch.equal(flipped["image"], torch.flip(item["image"], (-1,)))  # square images: a plain mirror
        assert torch.equal(flipped["mask"], torch.flip(item["mask"], (-1,)))
        both = ds[(i, "hv")]
        assert torch.equal(both["mask"], torch.flip(item["mask"], (-2, -1)))
        checked += 1
    assert checked >= 8
    # a data set built with a view shows every item that way
    assert ds.__class__(data, "train", SIZE, "full", view="h")[0]["text"] == ds[(0, "h")]["text"]
    with pytest.raises(ValueError, match="never flipped"):
        RefSegDataset(data, "val", SIZE, "eval", view="h")


def test_flip_keeps_letterbox_padding_and_moves_clicks_with_the_mask(tmp_path):
    """A 40 x 64 image letterboxed to 64: content 40 rows high, padding below; flips act on the content."""
    data_dir = make_shapes_refer(tmp_path / "data", n_train=2, n_val=1)
    for p in (data_dir / "images").iterdir():  # crop every image and mask to the top 40 rows
        Image.open(p).crop((0, 0, SIZE, 40)).save(p)
    inst = json.loads((data_dir / "instances.json").read_text())
    for im in inst["images"]:
        im["height"] = 40
    gone = set()  # objects wholly below row 40: no longer in the image, so neither are their refs
    for a in inst["annotations"]:
        m = mask_utils.decode(a["segmentation"][0])[:40]
        rle = mask_utils.encode(np.asfortranarray(m))
        a["segmentation"] = [{"size": [40, SIZE], "counts": rle["counts"].decode("ascii")}]
        a["area"] = float(m.sum())
        if not m.any():
            gone.add(a["id"])
    inst["annotations"] = [a for a in inst["annotations"] if a["id"] not in gone]
    (data_dir / "instances.json").write_text(json.dumps(inst))
    with open(data_dir / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)  # written by make_shapes_refer above
    with open(data_dir / "refs(unc).p", "wb") as f:
        pickle.dump([r for r in refs if r["ann_id"] not in gone], f)
    data = load_refer(data_dir)
    full = RefSegDataset(data, "train", SIZE, "full")
    click = RefSegDataset(data, "train", SIZE, "click")
    checked = 0
    for i in range(len(full.samples)):
        item = full[i]
        if item["mask"].sum() == 0:
            continue
        for view in VIEWS[1:]:
            f = full[(i, view)]
            dims = (() if "h" not in view else (-1,)) + (() if "v" not in view else (-2,))
            moved = lambda x: torch.flip(x[:, :40], dims) if dims else x[:, :40]
            if view.endswith("t"):  # transposed: content 64 rows x 40 columns, padding on the right
                assert torch.equal(f["image"][:, :, :40], moved(item["image"]).transpose(-2, -1))
                assert torch.equal(f["mask"][:, :, :40], moved(item["mask"]).transpose(-2, -1))
                assert int(f["image"][:, :, 40:].sum()) == 0
                assert f["letterbox"].tolist() == [item["letterbox"][0].item(), SIZE - 40.0, 0.0]  # pads swap
                assert f["orig_hw"].tolist() == [SIZE, 40]
            else:
                assert torch.equal(f["image"][:, 40:], item["image"][:, 40:])  # padding rows untouched (zeros)
                assert int(f["image"][:, 40:].sum()) == 0
                assert torch.equal(f["image"][:, :40], moved(item["image"]))
                assert torch.equal(f["mask"][:, :40], moved(item["mask"]))
                assert torch.equal(f["letterbox"], item["letterbox"])
            c = click[(i, view)]
            ys, xs = torch.nonzero(f["mask"][0], as_tuple=True)
            (x0, y0), (x1, y1) = c["click_corners"].tolist()
            assert (x0, y0, x1, y1) == (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            cx, cy = (int(round(v)) for v in c["click_center"].tolist())
            assert f["mask"][0, cy, cx] == 1
            checked += 1
    assert checked >= 2 * 7  # two items or more (not every square was cropped away), each in 7 views


def test_cached_views_give_the_forward_on_flipped_images(synthref_tiny):
    model = tiny_model().eval()
    data = load_refer(synthref_tiny)
    ds = RefSegDataset(data, "train", SIZE, "full")
    ds.samples = ds.samples[:40]
    caches = {}
    for view in VIEWS[1:]:
        vds = RefSegDataset(data, "train", SIZE, "full", view=view)
        vds.samples = ds.samples
        caches[view] = feature_cache.build_cache(model, vds, CPU, dtype=torch.float32, progress=False)
    base = feature_cache.build_cache(model, ds, CPU, dtype=torch.float32, progress=False)
    rows = [0, 3, 4, 9, 10, 33, 34, 35]
    views = ["h", "none", "t", "hv", "v", "hvt", "ht", "vt"]
    texts = [s.text for s in ds.samples]
    view_texts = {v: [swap_directions(t, v) for t in texts] for v in VIEWS}
    b = cached_batch(rows, views, base, caches, view_texts, CPU)
    items = collate([ds[(r, v)] for r, v in zip(rows, views)])
    assert b["text"] == items["text"]
    assert torch.equal(b["mask"], items["mask"]) and b["sent_id"].tolist() == items["sent_id"].tolist()
    with torch.no_grad():
        full = model(items["image"], items["text"])
        out = model.decode(b["vis"], b["txt"], b["image_index"])
    for k in ("mask_logits", "prior_logits"):
        assert torch.allclose(out[k], full[k], atol=1e-5), (k, (out[k] - full[k]).abs().max())


def test_draw_views_one_per_image_reproducible_and_respects_the_method(synthref_tiny):
    ds = RefSegDataset(load_refer(synthref_tiny), "train", SIZE, "full")
    rows = list(range(0, 64))
    views = ("none", "h", "v", "hv")
    flippable = np.ones(len(ds.samples), dtype=bool)
    a = draw_views(rows, views, flippable, ds.samples, (0, 1, 2))
    assert a == draw_views(rows, views, flippable, ds.samples, (0, 1, 2))
    per_image = {}
    for r, v in zip(rows, a):
        per_image.setdefault(ds.samples[r].image_id, set()).add(v)
    assert all(len(v) == 1 for v in per_image.values())
    seen = {v for k in range(20) for v in draw_views(rows, views, flippable, ds.samples, (0, k, 0))}
    assert seen == set(views)
    flippable[::2] = False
    c = draw_views(rows, views, flippable, ds.samples, (0, 1, 2))
    assert all(v == "none" for v in c[::2]) and c[1::2] == a[1::2]
    assert draw_views(rows, ("none",), flippable, ds.samples, (0, 1, 2)) == ["none"] * len(rows)


def test_flip_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.flip \(--flip\) must be one of"):
        TrainConfig.from_dict(dict(data="x", flip="r90")).validate()
    assert set(CONFIG_FLIPS) == set(FLIP_CHOICES)  # the config's choices are the augmentation's
    for flip in FLIP_CHOICES:
        TrainConfig.from_dict(dict(data="x", flip=flip)).validate()


@pytest.mark.parametrize("flip, cache", [("hv", "on"), ("hv", "off"), ("hvt", "on")])
def test_flip_training_learns_and_caches_each_view(tmp_path, flip, cache):
    data = make_shapes_refer(tmp_path / "data", n_train=2, n_val=1)
    cfg = tiny_config(data, tmp_path / "run", max_steps=60, batch_size=4, images_per_batch=2, lr=3e-3,
                      warmup_steps=3, val_every=0, val_split="", flip=flip, cache_features=cache, cache_dir=str(tmp_path / "cache"))
    train(cfg, model=tiny_model())
    with open(tmp_path / "run" / "log.csv") as f:
        losses = [float(r["value"]) for r in csv.DictReader(f) if r["tag"] == "train/loss"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    n_caches = len(list((tmp_path / "cache").iterdir())) if (tmp_path / "cache").exists() else 0
    assert n_caches == ({"hv": 4, "hvt": 8}[flip] if cache == "on" else 0)  # the split and each other view
