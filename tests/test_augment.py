"""Flip augmentation (refseg/data/augment.py) and its use by the training loop (--flip)."""

import csv
import json

import numpy as np
import pytest
import torch
from _engine_fixtures import SIZE, make_shapes_refer, one_thread, tiny_config, tiny_model  # noqa: F401 (autouse fixture)
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.data.augment import flip_item, swap_directions
from refseg.data.dataset import RefSegDataset, collate
from refseg.data.refer import load_refer
from refseg.engine import cache as feature_cache
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
    for a in inst["annotations"]:
        m = mask_utils.decode(a["segmentation"][0])[:40]
        rle = mask_utils.encode(np.asfortranarray(m))
        a["segmentation"] = [{"size": [40, SIZE], "counts": rle["counts"].decode("ascii")}]
        a["area"] = float(m.sum())
    (data_dir / "instances.json").write_text(json.dumps(inst))
    data = load_refer(data_dir)
    full = RefSegDataset(data, "train", SIZE, "full")
    click = RefSegDataset(data, "train", SIZE, "click")
    checked = 0
    for i in range(len(full.samples)):
        item = full[i]
        if item["mask"].sum() == 0:
            continue
        for view in ("h", "v", "hv"):
            f = full[(i, view)]
            assert torch.equal(f["image"][:, 40:], item["image"][:, 40:])  # padding rows untouched (zeros)
            assert int(f["image"][:, 40:].sum()) == 0
            dims = {"h": (-1,), "v": (-2,), "hv": (-2, -1)}[view]
            assert torch.equal(f["image"][:, :40], torch.flip(item["image"][:, :40], dims))
            assert torch.equal(f["mask"][:, :40], torch.flip(item["mask"][:, :40], dims))
            c = click[(i, view)]
            ys, xs = torch.nonzero(f["mask"][0], as_tuple=True)
            (x0, y0), (x1, y1) = c["click_corners"].tolist()
            assert (x0, y0, x1, y1) == (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            cx, cy = (int(round(v)) for v in c["click_center"].tolist())
            assert f["mask"][0, cy, cx] == 1
            checked += 1
    assert checked >= 6  # not every square was cropped away


def test_cached_views_give_the_forward_on_flipped_images(synthref_tiny):
    model = tiny_model().eval()
    data = load_refer(synthref_tiny)
    ds = RefSegDataset(data, "train", SIZE, "full")
    ds.samples = ds.samples[:40]
    caches = {}
    for view in ("h", "v", "hv"):
        vds = RefSegDataset(data, "train", SIZE, "full", view=view)
        vds.samples = ds.samples
        caches[view] = feature_cache.build_cache(model, vds, CPU, dtype=torch.float32, progress=False)
    base = feature_cache.build_cache(model, ds, CPU, dtype=torch.float32, progress=False)
    rows = [0, 3, 4, 9, 10, 33, 34, 35]
    views = ["h", "none", "none", "hv", "v", "h", "h", "none"]
    texts = [s.text for s in ds.samples]
    view_texts = {v: [swap_directions(t, v) for t in texts] for v in ("none", "h", "v", "hv")}
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
    with pytest.raises(ConfigError, match="flip must be one of"):
        TrainConfig(data="x", flip="r90").validate()


@pytest.mark.parametrize("cache", ["on", "off"])
def test_flip_training_learns_and_caches_each_view(tmp_path, cache):
    data = make_shapes_refer(tmp_path / "data", n_train=2, n_val=1)
    cfg = tiny_config(data, tmp_path / "run", max_steps=60, batch_size=4, images_per_batch=2, lr=3e-3,
                      warmup_steps=3, val_every=0, val_split="", flip="hv", cache_features=cache, cache_dir=str(tmp_path / "cache"))
    train(cfg, model=tiny_model())
    with open(tmp_path / "run" / "log.csv") as f:
        losses = [float(r["value"]) for r in csv.DictReader(f) if r["tag"] == "train/loss"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    n_caches = len(list((tmp_path / "cache").iterdir())) if (tmp_path / "cache").exists() else 0
    assert n_caches == (4 if cache == "on" else 0)  # the split and its three flipped views
