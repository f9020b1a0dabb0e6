"""The training engine: config, sampler, schedule, feature cache, training and exact resume."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from _engine_fixtures import SIZE, make_shapes_refer, one_thread, tiny_config, tiny_model  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file

from refseg.data.dataset import RefSegDataset, collate
from refseg.data.refer import load_refer
from refseg.engine import cache as feature_cache
from refseg.modeling.base import RISModel
from refseg.engine import train as train_module
from refseg.engine.config import TrainConfig, add_config_arguments, config_from_args
from refseg.engine.evaluate_core import evaluate_model, predict_masks
from refseg.engine.sampler import GroupBatchSampler
from refseg.engine.train import lr_at, train
from refseg.data.transforms import Letterbox

CPU = torch.device("cpu")


def _train_losses(run):
    with open(run / "log.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["tag"] == "train/loss"]


# ---- config ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_roundtrip(tmp_path, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")  # PyYAML comes with transformers; JSON needs nothing
    cfg = TrainConfig.from_dict(dict(data="d", model_kwargs={"dim": 64, "widths": [1, 2]}, lr=1e-4, split_by=None, max_steps=7))
    cfg.save(tmp_path / f"c{suffix}")
    again = TrainConfig.load(tmp_path / f"c{suffix}")
    assert again == cfg
    again.save(tmp_path / f"d{suffix}")
    assert (tmp_path / f"d{suffix}").read_text() == (tmp_path / f"c{suffix}").read_text()


def test_flags_override_config_file(tmp_path):
    TrainConfig.from_dict(dict(data="d", lr=1e-4, batch_size=8, epochs=3)).save(tmp_path / "c.json")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.json"), "--batch-size", "16",
                              "--model-kwargs", '{"dim": 32}', "--no-progress", "--split-by", "none"])
    cfg = config_from_args(args)
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.epochs, cfg.model.kwargs, cfg.run.progress, cfg.data.split_by) == \
        (1e-4, 16, 3, {"dim": 32}, False, None)
    assert "sentences per optimiser step" in parser.format_help()  # help comes from the field comments
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="amp"):
        TrainConfig.from_dict(dict(amp="fp8")).validate()


# ---- sampler and schedule ----------------------------------------------------------


def test_group_sampler_covers_each_sentence_once_and_groups_images():
    image_ids = np.repeat(np.arange(10), 6)  # 10 images x 6 sentences
    s = GroupBatchSampler(image_ids, batch_size=12, images_per_batch=3, seed=1)
    batches = s.global_batches(0)
    assert len(batches) == len(s) == 5
    assert sorted(np.concatenate(batches).tolist()) == list(range(60))
    distinct = [len(set(image_ids[b])) for b in batches]  # chunks of 4 sentences (+ remainders of 2)
    assert np.mean(distinct) <= 4.5 and max(distinct) <= 6
    assert [b.tolist() for b in batches] == [b.tolist() for b in s.global_batches(0)]  # deterministic
    assert [b.tolist() for b in batches] != [b.tolist() for b in s.global_batches(1)]
    ranks = [GroupBatchSampler(image_ids, 12, 3, seed=1, rank=r, world_size=2).batches(0) for r in range(2)]
    for g, a, b in zip(batches, *ranks):
        assert a + b == g.tolist() and len(a) == len(b) == 6


def _split_refs(batches, ref_ids):
    """Refs whose sentences are not contiguous in the epoch's sentence order."""
    flat = np.concatenate(batches)
    pos = {int(i): k for k, i in enumerate(flat)}
    split = []
    for ref in np.unique(ref_ids):
        where = sorted(pos[int(i)] for i in np.flatnonzero(ref_ids == ref))
        if where[-1] - where[0] != len(where) - 1:
            split.append(int(ref))
    return split


def test_group_sampler_keeps_refs_together():
    image_ids = np.repeat(np.arange(10), 6)  # 10 images x 6 sentences: refs of 1, 2 and 3 sentences each
    ref_ids = np.concatenate([[3 * i, 3 * i + 1, 3 * i + 1, 3 * i + 2, 3 * i + 2, 3 * i + 2] for i in range(10)])
    plain = GroupBatchSampler(image_ids, batch_size=12, images_per_batch=3, seed=1)
    assert _split_refs(plain.global_batches(0), ref_ids)  # the plain shuffle separates some refs
    s = GroupBatchSampler(image_ids, batch_size=12, images_per_batch=3, seed=1, ref_ids=ref_ids)
    for epoch in range(3):
        batches = s.global_batches(epoch)
        assert sorted(np.concatenate(batches).tolist()) == list(range(60))  # each sentence once
        assert _split_refs(batches, ref_ids) == []  # chunks of 4 hold whole refs of <= 3
        assert max(len(set(image_ids[b])) for b in batches) <= 6  # still grouped by image
    assert [b.tolist() for b in s.global_batches(0)] != [b.tolist() for b in s.global_batches(1)]
    # a ref longer than a chunk is cut into chunk-sized parts; nothing is lost
    long = GroupBatchSampler(np.zeros(10, dtype=int), batch_size=5, images_per_batch=2, seed=0,
                             ref_ids=[0] * 7 + [1] * 3)
    assert sorted(np.concatenate(long.global_batches(0)).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="ref_ids has 3 entries for 60 sentences"):
        GroupBatchSampler(image_ids, 12, 3, ref_ids=[1, 2, 3])


def test_lr_schedule():
    cfg = TrainConfig.from_dict(dict(lr=1.0, min_lr=0.1, warmup_steps=10)).optim
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)


# ---- feature cache -------------------------------------------------------------------


def test_cache_gives_the_uncached_forward(synthref_tiny, tmp_path):
    model = tiny_model().eval()
    ds = RefSegDataset(load_refer(synthref_tiny), "train", SIZE, "full")
    ds.samples = ds.samples[:40]
    rows = [0, 3, 4, 9, 10, 33]
    items = collate([ds[i] for i in rows])
    with torch.no_grad():
        full = model(items["image"], items["text"])
    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 5e-2)):
        cache = feature_cache.build_cache(model, ds, CPU, dtype=dtype, progress=False)
        b = cache.batch(rows, CPU)
        image_ids = [ds.samples[r].image_id for r in rows]
        assert len(b["vis"][0]) == len(set(image_ids))  # one visual row per distinct image
        idx = b["image_index"].tolist()
        assert all((idx[i] == idx[j]) == (image_ids[i] == image_ids[j]) for i in range(len(rows)) for j in range(len(rows)))
        with torch.no_grad():
            out = model.decode(b["vis"], b["txt"], b["image_index"])
        for k in ("mask_logits", "prior_logits", "no_target_logits"):
            assert torch.allclose(out[k], full[k], atol=atol), (dtype, k, (out[k] - full[k]).abs().max())
        assert torch.equal(b["mask"], items["mask"])
        assert torch.equal(b["no_target"], items["no_target"]) and torch.equal(b["orig_hw"], items["orig_hw"])
        assert b["sent_id"].tolist() == items["sent_id"].tolist()

    # on disk: built once, reused by a second run (keyed by data, split, size and encoder weights)
    first = feature_cache.get_cache(model, ds, CPU, str(tmp_path), progress=False)
    folders = list(tmp_path.iterdir())
    second = feature_cache.get_cache(model, ds, CPU, str(tmp_path), build=False)
    assert len(folders) == 1 and list(tmp_path.iterdir()) == folders
    assert np.array_equal(np.asarray(first.arrays["vis.0"]), np.asarray(second.arrays["vis.0"]))
    other = tiny_model()
    with torch.no_grad():
        next(other.visual.parameters()).add_(1.0)
    with pytest.raises(FileNotFoundError):  # other encoder weights: another key
        feature_cache.get_cache(other, ds, CPU, str(tmp_path), build=False)


def test_cache_encodes_each_distinct_text_once(synthref_tiny):
    model = tiny_model()
    ds = RefSegDataset(load_refer(synthref_tiny), "train", SIZE, "full")
    texts = [s.text for s in ds.samples]
    assert len(set(texts)) < len(texts), "the fixture should repeat some expressions"
    encoded = []
    encode = model.encode_text
    model.encode_text = lambda batch, **kw: (encoded.extend(batch), encode(batch, **kw))[1]
    cache = feature_cache.build_cache(model, ds, CPU, dtype=torch.float32, progress=False)
    assert sorted(encoded) == sorted(set(texts))
    rows = np.arange(len(texts))
    with torch.no_grad():
        direct = encode(texts)  # every sentence encoded on its own row
    for field, ref in zip(direct._fields, direct):
        got = torch.from_numpy(np.asarray(cache.arrays[f"txt.{field}"])[rows])
        assert torch.allclose(got.to(ref.dtype), ref, atol=1e-5), field


def test_cache_key_follows_annotation_content_not_folder(synthref_tiny, tmp_path):
    """Two copies of the same annotations (as each weak-split run writes in RUN/data) share a cache key;
    an annotation file changed in place, same size and mtime, does not."""
    import os
    import shutil

    model = tiny_model()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "images").symlink_to(synthref_tiny / "images")
    for name in ("instances.json", "refs(unc).p", "synthref.json"):
        shutil.copy2(synthref_tiny / name, copy / name)

    def key(folder):
        ds = RefSegDataset(load_refer(folder), "train", size=SIZE)
        return feature_cache.cache_key(ds, model, torch.float16)

    original = key(synthref_tiny)
    assert key(copy) == original
    path = copy / "instances.json"
    text, st = path.read_bytes(), path.stat()
    i = text.index(b'"bbox"')
    i += next(j for j, c in enumerate(text[i:]) if chr(c).isdigit())  # the first digit of a box: same length
    path.write_bytes(text[:i] + (b"7" if text[i:i + 1] != b"7" else b"3") + text[i + 1:])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert key(copy) != original


def test_frozen_encoders_are_detected():
    model = tiny_model()
    assert feature_cache.encoders_frozen(model)
    for p in model.visual.parameters():
        p.requires_grad_(True)
    assert not feature_cache.encoders_frozen(model)


# ---- evaluation --------------------------------------------------------------------------


def test_predict_masks_inverts_letterbox_and_honours_no_target():
    lb = Letterbox(8)
    logits = torch.full((2, 1, 8, 8), -5.0)
    logits[:, 0, 0:2, 4:8] = 5.0  # top right of the content; rows 4..7 are padding for a 4 x 8 image
    logits[0, 0, 1, 6] = 9.0
    out = {"mask_logits": logits, "no_target_logits": torch.tensor([-1.0, 1.0])}
    (pred0, point0, lg0), (pred1, _, _) = predict_masks(out, torch.tensor([[4, 8], [4, 8]]), lb)
    assert pred0.shape == (4, 8) and pred0[:2, 4:].all() and not pred0[2:].any() and not pred0[:, :4].any()
    assert point0 == (6, 1)
    assert not pred1.any()  # no-target logit > 0: empty mask


class _Oracle(RISModel):
    """Predicts the ground truth: returns the letterboxed masks of the sentences in the order evaluated."""

    def __init__(self, masks, size):
        super().__init__(size)
        self.masks = list(masks)  # (S, S) {0, 1}, in evaluation order
        self.w = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, images):
        return [images.float()]

    def encode_text(self, texts, trim=False):
        return texts

    def decode(self, vis, txt, image_index):
        masks = torch.stack([torch.as_tensor(self.masks.pop(0)) for _ in txt]).float()[:, None]  # (B, 1, S, S)
        return {"mask_logits": masks * 20 - 10, "no_target_logits": torch.full((len(txt),), -5.0)}


def test_evaluate_model_scores_perfect_predictions_as_perfect(synthref_tiny):
    from refseg.engine.evaluate_core import image_ordered

    data = load_refer(synthref_tiny)
    samples = data.samples("val")[:15]
    lb = Letterbox(320)
    masks = [lb.apply_mask(data.get_mask(samples[i].ann_id)) for i in image_ordered(samples)]
    result = evaluate_model(_Oracle(masks, 320), data, "val", batch_size=4, max_samples=15, progress=False)
    assert result["n"] == 15
    for k in ("oIoU", "mIoU", "P@0.9", "PointM"):
        assert result[k] == 1.0, k


def test_evaluate_model_reports_forms(synthref_tiny, tmp_path):
    model = tiny_model()
    data = load_refer(synthref_tiny)
    result = evaluate_model(model, data, "val", batch_size=5, device="cpu", max_samples=7, progress=False,
                            save_vis=tmp_path / "vis")
    assert result["n"] == 7 and 0 <= result["mIoU"] <= 1
    forms = {s.form for s in data.samples("val")[:7]}
    assert set(result["by_form"]) == forms and len(forms) > 1
    assert sum(r["n"] for r in result["by_form"].values()) == 7
    assert len(list((tmp_path / "vis").glob("*.png"))) == 7
    ds = RefSegDataset(data, "val", SIZE, "text")
    ds.samples = ds.samples[:7]
    cache = feature_cache.build_cache(model, ds, CPU, dtype=torch.float32, progress=False)
    cached = evaluate_model(model, ds, batch_size=3, progress=False, cache=cache)
    assert cached["mIoU"] == pytest.approx(result["mIoU"], abs=1e-6)


# ---- training ----------------------------------------------------------------------------


def test_loss_falls_when_overfitting_two_images(tmp_path):
    data = make_shapes_refer(tmp_path / "data", n_train=2, n_val=1)
    cfg = tiny_config(data, tmp_path / "run", max_steps=80, batch_size=4, images_per_batch=2, lr=3e-3,
                      warmup_steps=3, val_every=0)
    summary = train(cfg, model=tiny_model())
    losses = _train_losses(tmp_path / "run")
    assert len(losses) == 80
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    run = tmp_path / "run"
    assert (run / "last" / "model.safetensors").exists() and (run / "best" / "model.safetensors").exists()
    assert TrainConfig.load(run / "config.json") == TrainConfig.from_dict({**cfg.to_dict(), "resume": None})
    assert list((run / "tb").iterdir())
    assert summary["step"] == 80 and summary["best"]["step"] == 80


@pytest.mark.parametrize("cache, flip", [("on", "none"), ("off", "none"), ("on", "hv"), ("off", "h")])
def test_resume_continues_exactly(synthref_tiny, tmp_path, monkeypatch, cache, flip):
    n = 6
    common = dict(max_steps=n, save_every=n // 2, cache_features=cache, val_split="", batch_size=4,
                  images_per_batch=2, log_every=1, cache_dir=str(tmp_path / "cache"), flip=flip)
    train(tiny_config(synthref_tiny, tmp_path / "once", **common), model=tiny_model())
    once = load_file(str(tmp_path / "once" / "last" / "model.safetensors"))

    real = train_module.loss_function

    def crashing_loss(cfg):
        fn, calls = real(cfg), {"n": 0}

        def loss(out, batch):
            calls["n"] += 1
            if calls["n"] > n // 2:
                raise KeyboardInterrupt("simulated crash")
            return fn(out, batch)

        return loss

    monkeypatch.setattr(train_module, "loss_function", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(synthref_tiny, tmp_path / "twice", **common), model=tiny_model())
    monkeypatch.undo()
    assert json.loads((tmp_path / "twice" / "last" / "state.json").read_text())["step"] == n // 2
    summary = train(tiny_config(synthref_tiny, tmp_path / "twice", resume=str(tmp_path / "twice"), **common),
                    model=tiny_model())
    assert summary["step"] == n
    twice = load_file(str(tmp_path / "twice" / "last" / "model.safetensors"))
    assert once.keys() == twice.keys()
    for k in once:
        assert torch.equal(once[k], twice[k]), k
    assert _train_losses(tmp_path / "once") == _train_losses(tmp_path / "twice")


# ---- time budget -------------------------------------------------------------------


def test_time_budget_fits_the_schedule_from_the_measured_rate(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    info = train_module.distributed.env_info()
    budget = train_module.TimeBudget(100.0, 0.0, warmup_steps=200, info=info)
    assert (budget.first, budget.decide) == (25, 100)
    total, paused = 10_000, 0.0
    for step in range(1, 101):
        clock[0] += 0.1  # 10 steps/s
        if step == 50:  # a 5-s validation: not counted in the rate
            clock[0] += 5.0
            paused += 5.0
        total = budget.after_step(step, total, paused)
    # at step 100, t = 15 s: 85 s left at 10 steps/s, times the margin
    assert total == 100 + int(train_module.TimeBudget.MARGIN * 10 * 85)
    step = 100
    while step < total:
        step += 1
        clock[0] += 0.2  # the machine got slower: the budget stops the run early
        total = budget.after_step(step, total, paused)
    assert clock[0] == pytest.approx(100.0, abs=0.21)
    assert total == step < 100 + int(train_module.TimeBudget.MARGIN * 10 * 85)


def test_time_budget_spent_ends_the_run_and_resume_keeps_its_length(tmp_path):
    data = make_shapes_refer(tmp_path / "data", n_train=2, n_val=1)
    cfg = tiny_config(data, tmp_path / "run", max_steps=500, batch_size=4, images_per_batch=2, val_every=0,
                      time_budget=1e-3)
    summary = train(cfg, model=tiny_model())
    assert summary["step"] == summary["total_steps"] == 1  # the budget was spent before the first step ended
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["step"] == state["total_steps"] == 1
    again = train(tiny_config(data, tmp_path / "run", max_steps=500, batch_size=4, images_per_batch=2,
                              val_every=0, time_budget=1e-3, resume=str(tmp_path / "run")), model=tiny_model())
    assert again["step"] == 1


def test_time_budget_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="time_budget"):
        TrainConfig.from_dict(dict(data="x", max_steps=1, time_budget=-1.0)).validate()


def test_loss_kwargs_reach_the_loss_and_unknown_ones_are_named():
    cfg = TrainConfig.from_dict(dict(model="lts", supervision="full", loss_kwargs={"w_locate": 0.5, "w_dice": 2.0}))
    fn = train_module.loss_function(cfg)
    assert fn.keywords == {"w_locate": 0.5, "w_dice": 2.0}
    with pytest.raises(train_module.TrainError, match="w_nope"):
        train_module.loss_function(TrainConfig.from_dict(dict(model="lts", supervision="full", loss_kwargs={"w_nope": 1})))
    args = argparse.ArgumentParser()
    add_config_arguments(args)
    parsed = config_from_args(args.parse_args(["--loss-kwargs", '{"w_locate": 1.0}']))
    assert parsed.optim.loss_kwargs == {"w_locate": 1.0}


def test_init_from_starts_from_the_given_weights(synthref_tiny, tmp_path):
    from safetensors.torch import save_file

    from refseg.engine import checkpoint as ckpt
    from refseg.methods import MODELS
    from _engine_fixtures import TINY_LTS

    common = dict(val_split="", cache_features="off")
    train(tiny_config(synthref_tiny, tmp_path / "a", max_steps=3, **common), model=tiny_model())
    # lr 0: the run's weights stay exactly the ones it started from, those of run a
    train(tiny_config(synthref_tiny, tmp_path / "b", max_steps=1, lr=0.0, init_from=str(tmp_path / "a"), **common),
          model=tiny_model(seed=1))
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh_model = tiny_model(seed=1)
    assert not all(torch.equal(a[k], v) for k, v in fresh_model.state_dict().items() if k in a)
    # a file without one head tensor: that tensor keeps its fresh init and is named
    dropped = sorted(k for k in a if k.startswith("head."))[0]
    save_file({k: v for k, v in a.items() if k != dropped}, str(tmp_path / "part.safetensors"))
    meta = json.loads((tmp_path / "a" / "last" / "model.json").read_text())
    (tmp_path / "part.json").write_text(json.dumps({"config": meta["config"]}))
    before = fresh_model.state_dict()[dropped].clone()
    assert ckpt.init_weights(fresh_model, tmp_path / "part.safetensors") == [dropped]
    assert torch.equal(fresh_model.state_dict()[dropped], before)
    # another head width: refused, naming the tensors
    wider = MODELS["lts"](image_size=tiny_model().image_size, **{**TINY_LTS, "dim": 48})
    with pytest.raises(ckpt.CheckpointError, match="shape mismatch"):
        ckpt.init_weights(wider, tmp_path / "a")
    with pytest.raises(train_module.TrainError, match="init-from"):
        train(tiny_config(synthref_tiny, tmp_path / "c", init_from=str(tmp_path / "nowhere"), **common),
              model=tiny_model())
