"""PKS: the model (shapes, gradients, language-free mask features, teacher forcing), its
losses on hand-computed cases, and training through the real engine with full masks and
with clicks only (a data set whose training masks cannot be read)."""

import copy
import csv
import functools
import json
import math
import shutil

import numpy as np
import pytest
import torch
from _engine_fixtures import TINY_TEXT, TINY_VISUAL, make_shapes_refer, one_thread, tiny_config  # noqa: F401 (autouse fixture)

from refseg.methods.pks.loss import (
    box_bitmap,
    box_cover,
    box_projection_loss,
    centre_heatmap,
    click_mask_terms,
    interior_point,
    mask_box,
    pairwise_colour_affinity_loss,
    pks_click_loss,
    pks_full_loss,
    pks_targets,
    region_terms,
)
from refseg.methods import MODELS, build_model
from refseg.methods.pks.model import heatmap_peak, rgb_to_lab
from refseg.methods.pks.train import teacher_forcing

S = 64
TINY_PKS = {"visual": TINY_VISUAL, "text": TINY_TEXT, "max_length": 12, "dim": 32, "depth": 1, "heads": 2,
            "fpn_width": 16}
TEXTS = ["the large red star", "the blue circle on the left", "the leftmost green square"]
NAN = float("nan")


@functools.lru_cache(maxsize=None)
def _built(seed: int = 0):
    torch.manual_seed(seed)
    return MODELS["pks"](image_size=S, **TINY_PKS)


def tiny_pks(seed: int = 0):
    return copy.deepcopy(_built(seed))


def _images(n, size=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _click_batch():
    """Two samples: a target with clicks (letterbox scale 0.2), and a no-target one (NaN clicks)."""
    return {"click_center": torch.tensor([[20.0, 15.0], [NAN, NAN]]),
            "click_corners": torch.tensor([[[10.0, 8.0], [29.0, 23.0]], [[NAN, NAN], [NAN, NAN]]]),
            "letterbox": torch.tensor([[0.2, 0.0, 0.0], [0.2, 0.0, 0.0]]),
            "no_target": torch.tensor([False, True])}


def _full_batch():
    mask = torch.zeros(2, 1, S, S)
    mask[0, :, 8:24, 10:30] = 1
    return {"mask": mask, "no_target": torch.tensor([False, True])}


# ---- the model -------------------------------------------------------------------------------


@pytest.mark.parametrize("supervision", ["full", "click"])
def test_pks_smoke(supervision):
    model = tiny_pks()
    batch = _full_batch() if supervision == "full" else _click_batch()
    vis, txt = model.encode_image(_images(2)), model.encode_text(TEXTS[:2])
    out = model.decode(vis, txt, torch.arange(2), **teacher_forcing(model, batch))
    r = model.head.mask_stride
    assert r == 4  # the tiny ConvNeXt has no stride-2 map
    shapes = {"mask_logits": (2, 1, S, S), "prior_logits": (2, 1, S // 16, S // 16), "no_target_logits": (2,),
              "mask_logits_low": (2, 1, S // r, S // r), "image_lab": (2, 3, S // r, S // r),
              "kernel": (2, model.head.n_params), "peak": (2, 2)}
    assert {k: tuple(out[k].shape) for k in shapes} == shapes
    assert out["heatmap_logits"] is out["prior_logits"]
    assert model.head.n_params == (10 * 8 + 8) + (8 * 8 + 8) + (8 + 1)  # CondInst: 3 layers, 8 channels, +2 coords
    losses = (pks_full_loss if supervision == "full" else pks_click_loss)(out, batch)
    losses["loss"].backward()
    for key, value in {**out, **losses}.items():
        assert torch.isfinite(value).all(), key
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n, _ in trainable)
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_pks_config_rebuilds_and_decode_shares_images():
    model = tiny_pks().eval()
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    images, index = _images(2, seed=1), torch.tensor([0, 1, 1])
    with torch.no_grad():
        shared = model.decode(model.encode_image(images), model.encode_text(TEXTS), index)
        direct = rebuilt(images[index], TEXTS)
        half = model.decode([m.half() for m in model.encode_image(images)], model.encode_text(TEXTS), index)
    for key in shared:
        assert torch.allclose(shared[key], direct[key], atol=1e-5), key
    assert half["mask_logits"].dtype == torch.float32
    # the pooled image rides along as the last "map"; LAB of the letterboxed image
    vis = model.encode_image(images)
    assert vis[-1].shape == (2, 3, S // 4, S // 4) and float(vis[-1].max()) <= 255


def test_teacher_forcing_reads_the_kernel_at_the_given_centre():
    model = tiny_pks().eval()
    vis, txt = model.encode_image(_images(2)), model.encode_text(TEXTS[:2])
    with torch.no_grad():
        free = model.decode(vis, txt, torch.arange(2))
        forced = model.decode(vis, txt, torch.arange(2), centers=torch.tensor([[20.0, 15.0], [NAN, NAN]]))
    assert forced["peak"][0].tolist() == [20.0, 15.0]
    assert torch.equal(forced["peak"][1], free["peak"][1])  # NaN row: the predicted peak
    assert not torch.allclose(forced["mask_logits"][0], free["mask_logits"][0])
    assert torch.equal(forced["prior_logits"], free["prior_logits"])  # the heatmap does not depend on it


def test_segmentation_branch_is_language_free():
    model = tiny_pks().eval()
    captured = []
    handle = model.head.mask_branch.register_forward_hook(lambda mod, args, output: captured.append(output))
    vis = model.encode_image(_images(1))
    index = torch.zeros(1, dtype=torch.long)
    try:
        with torch.no_grad():
            a = model.decode(vis, model.encode_text(["the red star"]), index)
            b = model.decode(vis, model.encode_text(["the blue circle on the far left"]), index)
        txt = model.encode_text(["a green square"])
        tokens = txt.tokens.clone().requires_grad_(True)
        sentence = txt.sentence.clone().requires_grad_(True)
        model.decode(vis, type(txt)(tokens, txt.mask, sentence), index)
    finally:
        handle.remove()
    assert len(captured) == 3
    assert torch.equal(captured[0], captured[1])  # same features whatever the text
    assert not torch.allclose(a["mask_logits"], b["mask_logits"])  # ... while the mask does depend on it
    grads = torch.autograd.grad(captured[2].sum(), [tokens, sentence], allow_unused=True)
    assert grads == (None, None)  # no path from the text to the mask features


# ---- helpers and losses on hand-made cases ------------------------------------------------------


def test_rgb_to_lab_matches_reference_values():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 2, 2)
    lab = rgb_to_lab(rgb).reshape(3, 4).T
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]])
    assert torch.allclose(lab, expected, atol=0.05), lab


def test_interior_point_and_box():
    mask = torch.zeros(3, 1, 64, 64)
    mask[0, :, 8:40, 16:48] = 1  # a square: the point is near its centre
    mask[1, :, 4:60, 4:16] = 1  # an L: vertical bar ...
    mask[1, :, 48:60, 4:60] = 1  # ... and foot; the box centre (32, 32) is outside it
    center = interior_point(mask)
    assert abs(center[0, 0] - 31.5) <= 4 and abs(center[0, 1] - 23.5) <= 4
    x, y = center[1].round().long().tolist()
    assert mask[1, 0, y, x] == 1
    assert torch.isnan(center[2]).all()  # empty mask
    box = mask_box(mask)
    assert box[0].tolist() == [15.5, 7.5, 47.5, 39.5]
    assert torch.isnan(box[2]).all()
    assert torch.equal(box_bitmap(box[:1], (64, 64)), mask[:1])  # a box mask is its own box


def test_click_targets_from_corners():
    t = pks_targets(_click_batch())
    # corners are pixel centres of the original box corners; the box reaches half an original pixel beyond
    assert t["box"][0].tolist() == pytest.approx([9.9, 7.9, 29.1, 23.1])
    assert t["center"][0].tolist() == [20.0, 15.0]
    assert t["valid"].tolist() == [True, False]


def test_centre_heatmap_is_one_at_the_centre_cell_only():
    center = torch.tensor([[40.0, 10.0], [NAN, NAN]])
    box = torch.tensor([[24.0, 0.0, 56.0, 20.0], [NAN] * 4])
    heat = centre_heatmap(center, box, (4, 4), 16)
    assert heat.shape == (2, 1, 4, 4)
    assert heat[0, 0, 0, 2] == 1 and int((heat == 1).sum()) == 1  # cell (row 0, col 2) holds (40, 10)
    sx = 0.54 * 32 / 6 / 16  # box width 32 px, in cells
    assert float(heat[0, 0, 0, 3]) == pytest.approx(math.exp(-1 / (2 * sx**2)), rel=1e-5)
    assert heat[1].abs().sum() == 0


def test_heatmap_peak_refines_between_cells():
    logits = torch.full((2, 1, 4, 4), -20.0)
    logits[0, 0, 1, 2] = 20.0  # one hot cell: its centre, (2.5 * 16 - 0.5, 1.5 * 16 - 0.5)
    logits[1, 0, 2, 1] = logits[1, 0, 2, 2] = 20.0  # two equal neighbours: halfway
    peak = heatmap_peak(logits, 16)
    assert peak[0].tolist() == pytest.approx([39.5, 23.5], abs=1e-3)
    assert peak[1].tolist() == pytest.approx([31.5, 39.5], abs=1e-3)


def test_projection_loss_hand_cases():
    box = torch.zeros(1, 1, 8, 8)
    box[..., 2:6, 1:5] = 1
    inside = box * 40 - 20  # +20 exactly on the box
    assert box_projection_loss(inside, box).item() == pytest.approx(0, abs=1e-6)
    ring = inside.clone()
    ring[..., 3:5, 2:4] = -20  # hollow, but still touching every row and column of the box
    assert box_projection_loss(ring, box).item() == pytest.approx(0, abs=1e-6)
    spill = inside.clone()
    spill[..., 3, 6] = 20  # one pixel outside the box
    assert box_projection_loss(spill, box).item() > 0.05
    # p = 0.5 everywhere on a 4 x 4 map, box = rows/cols 1..2: per axis
    # 1 - (2 * 0.5 * 2 + 1) / (4 * 0.25 + 2 + 1) = 0.25, two axes: 0.5
    small = torch.zeros(1, 1, 4, 4)
    small[..., 1:3, 1:3] = 1
    assert box_projection_loss(torch.zeros(1, 1, 4, 4), small).item() == pytest.approx(0.5)
    # an empty box (no-target) wants an empty mask
    empty = torch.zeros(1, 1, 8, 8)
    assert box_projection_loss(torch.full((1, 1, 8, 8), -30.0), empty).item() == pytest.approx(0, abs=1e-6)
    assert box_projection_loss(inside, empty).item() > 0.5


def test_pairwise_affinity_hand_cases():
    H = W = 12
    box = torch.zeros(1, 1, H, W)
    box[..., 2:10, 2:10] = 1
    lab = torch.zeros(1, 3, H, W)
    lab[:, 0] = 50.0  # one colour everywhere
    constant = torch.full((1, 1, H, W), 20.0)
    assert pairwise_colour_affinity_loss(constant, lab, box).item() == pytest.approx(0, abs=1e-6)
    assert pairwise_colour_affinity_loss(-constant, lab, box).item() == pytest.approx(0, abs=1e-6)
    # p = 0.5: every pair costs -log(0.25 + 0.25) = log 2
    assert pairwise_colour_affinity_loss(torch.zeros(1, 1, H, W), lab, box).item() == pytest.approx(math.log(2))
    # a label edge through a constant-colour box costs; outside the box nothing counts
    split = constant.clone()
    split[..., :, 6:] = -20
    assert pairwise_colour_affinity_loss(split, lab, box).item() > 1.0
    noisy_outside = constant.clone()
    noisy_outside[..., :2, :] = -20
    noisy_outside[..., :, 10:] = -20
    assert pairwise_colour_affinity_loss(noisy_outside, lab, box).item() == pytest.approx(0, abs=1e-6)
    # ... unless the edge follows a colour edge: those pairs are not similar and are left out
    lab2 = lab.clone()
    lab2[:, 1, :, 6:] = 60.0  # a shift of 60 in a*: similarity exp(-30) < 0.3
    assert pairwise_colour_affinity_loss(split, lab2, box).item() == pytest.approx(0, abs=1e-6)
    # no box: nothing counts, loss 0
    assert pairwise_colour_affinity_loss(split, lab, torch.zeros_like(box)).item() == 0


def test_click_mask_terms_hand_cases():
    # stride-4 grid of 4 x 4 cells (16 px); box = pixels 4..11 -> cells 1..2; centre click at (8, 8)
    box = torch.tensor([[3.5, 3.5, 11.5, 11.5], [NAN] * 4])
    center = torch.tensor([[8.0, 8.0], [NAN, NAN]])
    perfect = torch.full((2, 1, 4, 4), -30.0)
    perfect[0, :, 1:3, 1:3] = 30.0
    outside, hit = click_mask_terms(perfect, box, center, 4)
    assert outside.item() == pytest.approx(0, abs=1e-6) and hit.item() == pytest.approx(0, abs=1e-6)
    # logits 0 everywhere: BCE log 2 on each of the 12 + 16 outside cells, log 2 at the one click
    outside, hit = click_mask_terms(torch.zeros(2, 1, 4, 4), box, center, 4)
    assert outside.item() == pytest.approx(math.log(2)) and hit.item() == pytest.approx(math.log(2))
    # foreground inside the box is free; foreground outside costs
    spill = perfect.clone()
    spill[0, :, 0, 0] = 30.0
    assert click_mask_terms(spill, box, center, 4)[0].item() == pytest.approx(30 / 28, rel=1e-3)


def test_click_loss_ignores_masks_and_full_loss_needs_them():
    model = tiny_pks()
    batch = _click_batch()
    out = model.decode(model.encode_image(_images(2)), model.encode_text(TEXTS[:2]), torch.arange(2),
                       **teacher_forcing(model, batch))
    with_garbage = {**batch, "mask": torch.rand(2, 1, S, S)}
    a, b = pks_click_loss(out, batch), pks_click_loss(out, with_garbage)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError):
        pks_full_loss(out, batch)


def test_locate_term_is_off_by_default_and_zero_at_the_click_gaussian():
    from refseg.methods.pks.loss import centre_heatmap, pks_targets

    model = tiny_pks()
    batch = _click_batch()
    out = model.decode(model.encode_image(_images(2)), model.encode_text(TEXTS[:2]), torch.arange(2),
                       **teacher_forcing(model, batch))
    for loss_fn, b in ((pks_click_loss, batch), (pks_full_loss, _full_batch())):
        base, extra = loss_fn(out, b), loss_fn(out, b, w_locate=3.0)
        assert "locate" not in base and extra["locate"].item() > 0
        assert extra["loss"].item() == pytest.approx(base["loss"].item() + 3.0 * extra["locate"].item(), rel=1e-5)
    # heatmap logits = log of the (normalised) click Gaussian: KL 0 (the no-target sample is left out)
    targets = pks_targets(batch)
    heat = out["prior_logits"]
    gauss = centre_heatmap(targets["center"], targets["box"], heat.shape[-2:], S // heat.shape[-1])
    exact = {**out, "prior_logits": torch.log(gauss.clamp(min=1e-12))}
    assert pks_click_loss(exact, batch, w_locate=1.0)["locate"].item() == pytest.approx(0, abs=1e-5)


# ---- the referent-region map (region_head) ---------------------------------------------------


def test_box_cover_hand_cases():
    boxes = torch.tensor([
        [0.0, 0.0, 15.0, 15.0],  # pixels 0..15: exactly cell (0, 0) of the stride-16 grid
        [8.0, 0.0, 23.0, 3.0],  # x 8..23: half of cells 0 and 1; y 0..3: a quarter of row 0
        [20.0, 36.0, 21.0, 37.0],  # a 2 x 2 pixel box inside cell (2, 1): 4 / 256
        [NAN] * 4,
    ])
    cover = box_cover(boxes, (3, 3), 16)[:, 0]
    expect = torch.zeros(4, 3, 3)
    expect[0, 0, 0] = 1.0
    expect[1, 0, 0] = expect[1, 0, 1] = 0.5 * 0.25
    expect[2, 2, 1] = 4 / 256
    assert torch.allclose(cover, expect, atol=1e-6)


def _region_out(region, size=S):
    return {"region_logits": region, "mask_logits": torch.zeros(region.shape[0], 1, size, size)}


def test_region_terms_from_clicks_hand_cases():
    # S = 64 -> a 4 x 4 grid of 16-px cells; box = pixels 16..47: cells 1..2 exactly; centre click (32, 32)
    targets = {"box": torch.tensor([[16.0, 16.0, 47.0, 47.0], [NAN] * 4]),
               "center": torch.tensor([[32.0, 32.0], [NAN, NAN]])}
    no_target = torch.tensor([False, True])
    perfect = torch.full((2, 1, 4, 4), -30.0)
    perfect[0, :, 1:3, 1:3] = 30.0
    dense, locate = region_terms(_region_out(perfect), targets, no_target)
    assert dense.item() == pytest.approx(0, abs=1e-3) and locate.item() == pytest.approx(0, abs=1e-5)
    # the same region on another object: every term costs
    elsewhere = torch.full((2, 1, 4, 4), -30.0)
    elsewhere[0, :, 0, 3] = 30.0
    dense_w, locate_w = region_terms(_region_out(elsewhere), targets, no_target)
    assert dense_w.item() > 30 and locate_w.item() > 30
    # uniform logits: softmax 1/16 per cell against the box's 1/4 on each of its 4 cells: KL = log 4
    assert region_terms(_region_out(torch.zeros(2, 1, 4, 4)), targets, no_target)[1].item() == pytest.approx(math.log(4))


def test_region_terms_from_masks_use_the_mask():
    mask = torch.zeros(2, 1, S, S)
    mask[0, :, 16:48, 16:32] = 1  # cells (1..2, 1): full
    no_target = torch.tensor([False, True])
    exact = torch.full((2, 1, 4, 4), -30.0)
    exact[0, :, 1:3, 1] = 30.0
    dense, locate = region_terms(_region_out(exact), {}, no_target, mask)
    assert dense.item() == pytest.approx(0, abs=1e-6) and locate.item() == pytest.approx(0, abs=1e-5)
    shifted = torch.full((2, 1, 4, 4), -30.0)
    shifted[0, :, 1:3, 3] = 30.0
    dense, locate = region_terms(_region_out(shifted), {}, no_target, mask)
    assert dense.item() == pytest.approx(4 * 30 / 32, rel=1e-3)  # 4 wrong cells of 32, BCE 30 each
    assert locate.item() > 30


def test_joint_peak_lets_the_region_map_pick_between_equal_heatmap_peaks():
    heat = torch.full((1, 1, 4, 4), -20.0)
    heat[0, 0, 0, 0] = heat[0, 0, 3, 3] = 5.0  # two equally confident candidates
    region = torch.full((1, 1, 4, 4), -5.0)
    region[0, 0, 3, 3] = 5.0
    assert heatmap_peak(heat, 16, region)[0].tolist() == pytest.approx([55.5, 55.5], abs=1e-2)
    region = region.flip(-1).flip(-2)
    assert heatmap_peak(heat, 16, region)[0].tolist() == pytest.approx([7.5, 7.5], abs=1e-2)


@pytest.mark.parametrize("supervision", ["full", "click"])
def test_region_head_trains_and_stays_mask_free_with_clicks(supervision):
    torch.manual_seed(0)
    model = MODELS["pks"](image_size=S, region_head=True, **TINY_PKS)
    batch = _full_batch() if supervision == "full" else _click_batch()
    out = model.decode(model.encode_image(_images(2)), model.encode_text(TEXTS[:2]), torch.arange(2),
                       **teacher_forcing(model, batch))
    assert tuple(out["region_logits"].shape) == (2, 1, S // 16, S // 16)
    loss_fn = pks_full_loss if supervision == "full" else pks_click_loss
    losses = loss_fn(out, batch)
    off = loss_fn(out, batch, w_region=0.0, w_region_locate=0.0)
    assert losses["loss"].item() == pytest.approx(
        off["loss"].item() + losses["region"].item() + 0.5 * losses["region_locate"].item(), rel=1e-5)
    losses["loss"].backward()
    assert model.head.region.weight.grad.abs().sum() > 0
    if supervision == "click":
        garbage = pks_click_loss(out, {**batch, "mask": torch.rand(2, 1, S, S)})
        assert all(torch.equal(losses[k], garbage[k]) for k in losses)
    # a model without the head has no region output and no region terms
    plain = tiny_pks()
    out = plain.decode(plain.encode_image(_images(2)), plain.encode_text(TEXTS[:2]), torch.arange(2))
    assert "region_logits" not in out and "region" not in loss_fn(out, batch)


def test_joint_peak_needs_the_region_head():
    with pytest.raises(ValueError, match="region_head"):
        MODELS["pks"](image_size=S, peak_source="joint", **TINY_PKS)
    with pytest.raises(ValueError, match="peak_source"):
        MODELS["pks"](image_size=S, region_head=True, peak_source="both", **TINY_PKS)


# ---- training through the engine -------------------------------------------------------------


def _train_losses(run):
    with open(run / "log.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["tag"] == "train/loss"]


def _without_train_masks(src, dst):
    """A copy of a refer folder whose training annotations give no mask (empty segmentation)."""
    import pickle

    shutil.copytree(src, dst)
    with open(dst / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    train_anns = {r["ann_id"] for r in refs if r["split"] == "train"}
    instances = json.loads((dst / "instances.json").read_text())
    n = 0
    for a in instances["annotations"]:
        if a["id"] in train_anns:
            a["segmentation"] = []  # no mask given: loads, and reading it is an error
            n += 1
    (dst / "instances.json").write_text(json.dumps(instances))
    assert n > 0
    return dst


@pytest.mark.parametrize("cache", ["on", "off"])
def test_click_training_never_reads_a_training_mask(synthref_tiny, tmp_path, cache):
    from refseg.data.refer import ReferFormatError, load_refer
    from refseg.engine.train import train

    data_dir = _without_train_masks(synthref_tiny, tmp_path / "data")
    data = load_refer(data_dir)
    train_sample = data.samples("train")[0]
    with pytest.raises(ReferFormatError):
        data.get_mask(train_sample.ann_id)  # the masks really are gone
    cfg = tiny_config(data_dir, tmp_path / "run", model="pks", model_kwargs=dict(TINY_PKS), supervision="click",
                      max_steps=4, val_split="val", val_max_samples=8, cache_features=cache)
    summary = train(cfg, model=tiny_pks())
    assert summary["step"] == 4 and math.isfinite(summary["train_loss"])
    assert 0 <= summary["val"]["mIoU"] <= 1  # validation reads the (intact) val masks
    with pytest.raises(ReferFormatError):  # the same data cannot train with full supervision
        train(tiny_config(data_dir, tmp_path / "full", model="pks", model_kwargs=dict(TINY_PKS),
                          supervision="full", max_steps=1, val_split=""), model=tiny_pks())


@pytest.mark.parametrize("supervision", ["full", "click"])
def test_loss_falls_when_overfitting(tmp_path, supervision):
    from refseg.engine.train import train

    data = make_shapes_refer(tmp_path / "data", n_train=2, n_val=1)
    cfg = tiny_config(data, tmp_path / "run", model="pks", model_kwargs=dict(TINY_PKS), supervision=supervision,
                      max_steps=30, batch_size=4, images_per_batch=2, lr=3e-3, warmup_steps=3, val_split="")
    train(cfg, model=tiny_pks())
    losses = _train_losses(tmp_path / "run")
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3]), losses
