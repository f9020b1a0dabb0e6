"""Evaluation scores exactly what is served: `refseg eval` and `Predictor` share one post-processing.

- On a shipped model and the SynthRef tiny test split, the figures of
  `refseg eval --out` (overall and per sentence) equal, exactly, the figures
  refseg.metrics computes from `refseg.Predictor`'s masks and points on the
  same images and sentences, in the same order.
- On hand-made decoder outputs (no-target logits at and just around 0, mask
  logits at 0, an image that is cropped and one that is resized),
  evaluation's `predict_masks` and `Predictor._postprocess` give the same
  masks, points and no-target decisions.
"""

import json

import numpy as np
import pytest
import torch

import refseg
from refseg.cli import main as cli
from refseg.data.refer import load_refer
from refseg.engine.evaluate_core import image_ordered, predict_masks
from refseg.metrics import RISMetrics

MODEL = "lts-synthref"


@pytest.fixture(scope="module")
def predictor():
    torch.set_num_threads(1)
    return refseg.Predictor(refseg.load(MODEL))


def test_eval_figures_equal_the_figures_of_the_served_predictions(synthref_tiny, predictor, tmp_path):
    out = tmp_path / "eval.json"
    assert cli(["eval", "--checkpoint", MODEL, "--data", str(synthref_tiny), "--split", "test", "--threads", "1",
                "--out", str(out), "--per-sample"]) == 0
    evaluated = json.loads(out.read_text())

    data = load_refer(synthref_tiny)
    samples = data.samples("test")
    order = [samples[i] for i in image_ordered(samples)]  # the order `refseg eval` visits (sums in one order)
    served = {}
    for image_id in dict.fromkeys(s.image_id for s in order):
        sents = [s for s in order if s.image_id == image_id]
        predictor.set_image(data.load_image(image_id))
        pred = predictor.predict([s.text for s in sents])
        served.update({s.sent_id: (pred.masks[k], tuple(pred.points[k].tolist())) for k, s in enumerate(sents)})
    metrics, by_form, ious = RISMetrics(), {}, {}
    for s in order:
        mask, point = served[s.sent_id]
        gt = data.get_mask(s.ann_id, image_id=s.image_id)
        ious[s.sent_id] = metrics.update(mask, gt, point=point, no_target=s.no_target)
        if s.form is not None:
            by_form.setdefault(s.form, RISMetrics()).update(mask, gt, point=point, no_target=s.no_target)

    expected = _strict(metrics.compute())
    assert expected["n"] == len(samples) > 10 and 0.2 < expected["mIoU"] < 1  # real masks, neither empty nor perfect
    got = evaluated["metrics"]
    assert {k: got[k] for k in expected} == expected
    assert got["by_form"] == {form: _strict(m.compute()) for form, m in by_form.items()}
    assert {r["sent_id"]: r["iou"] for r in evaluated["samples"]} == ious


def _strict(figures: dict) -> dict:
    """The figures as `refseg eval --out` writes them: NaN (undefined) as null."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in figures.items()}


@pytest.mark.parametrize("hw", [(200, 320), (237, 301)])  # 320 px wide: the crop only; else crop and resize
def test_evaluation_and_predictor_post_process_alike(predictor, hw):
    size = predictor.letterbox.size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, size, size, generator=g) * 4
    logits[:, :, 40:80, 40:80] = 0.0  # exactly at the threshold: background
    logits[:, :, 100:110, 100:110] = 1e-9
    no_target = torch.tensor([-3.0, -1e-9, 0.0, 1e-9, 1e-30, 3.0])
    out = {"mask_logits": logits, "no_target_logits": no_target}

    served = predictor._postprocess(out, hw)
    scored = predict_masks(out, torch.tensor([hw] * 6), predictor.letterbox)
    assert served.no_target.tolist() == [False, False, False, True, True, True]  # logit > 0
    for k, (mask, point, lg) in enumerate(scored):
        np.testing.assert_array_equal(mask, served.masks[k])
        assert point == tuple(served.points[k].tolist())
        np.testing.assert_array_equal(lg, served.logits[k])
        assert mask.any() != bool(served.no_target[k])


def test_bench_scores_what_refseg_eval_scores(synthref_tiny, tmp_path):
    """`refseg bench` evaluates a row from the images as served, so its figures equal `refseg eval`'s
    sentence by sentence (a feature cache in fp16 would move some IoUs)."""
    from types import SimpleNamespace

    from refseg.bench.run import evaluate_row

    out = tmp_path / "eval.json"
    assert cli(["eval", "--checkpoint", MODEL, "--data", str(synthref_tiny), "--split", "test", "--threads", "1",
                "--out", str(out), "--per-sample"]) == 0
    evaluated = json.loads(out.read_text())
    ctx = SimpleNamespace(device=torch.device("cpu"), work=tmp_path / "work")
    row = evaluate_row(refseg.load(MODEL), load_refer(synthref_tiny), None, ctx, None)
    got = _strict(row["metrics"])
    assert {k: got[k] for k in ("oIoU", "mIoU", "PointM", "n")} == \
        {k: evaluated["metrics"][k] for k in ("oIoU", "mIoU", "PointM", "n")}
