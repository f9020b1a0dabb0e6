"""Every shipped model answers fixed inputs exactly as it did when its reference outputs were recorded.

The reference (tests/data/shipped-outputs.npz) holds, per shipped model and
per expression of tests/data/reference-texts.json on the image of the
model's domain (tests/data/reference-<domain>.png; the natural one is not
square, so the letterbox is exercised): the full-resolution mask logits
subsampled every 8th pixel, the no-target probability, the score, the mask
area and the response-map point. Refactoring the model code, the loader
or the Predictor must leave all of them unchanged (logits within 1e-5).

Recorded once from a known-good tree with
    REFSEG_RECORD_REFERENCE=1 python -m pytest tests/test_shipped_outputs.py
(run it again only when a shipped model's weights are deliberately replaced).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import refseg

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "shipped-outputs.npz"
STEP = 8  # logits kept every STEP-th pixel in each direction


def _domain(name: str) -> str:
    return "aerial" if "aerial" in name else "natural"


def _outputs(name: str) -> dict:
    texts = json.loads((DATA / "reference-texts.json").read_text())[_domain(name)]
    predictor = refseg.Predictor(refseg.load(name))
    predictor.set_image(str(DATA / f"reference-{_domain(name)}.png"))
    r = predictor.predict(texts)
    return {
        "logits": np.ascontiguousarray(r.logits[:, ::STEP, ::STEP]).astype(np.float32),
        "no_target_prob": r.no_target_prob.astype(np.float32),
        "scores": r.scores.astype(np.float32),
        "area": r.masks.reshape(len(texts), -1).sum(1).astype(np.int64),
        "points": r.points.astype(np.int64),
    }


def test_reference_covers_every_shipped_model():
    stored = np.load(REFERENCE)
    names = {k.split("/")[0] for k in stored.files}
    assert names == set(refseg.available_models())


@pytest.mark.parametrize("name", refseg.available_models())
def test_shipped_model_outputs_unchanged(name):
    torch.set_num_threads(1)
    got = _outputs(name)
    if os.environ.get("REFSEG_RECORD_REFERENCE") == "1":
        stored = dict(np.load(REFERENCE)) if REFERENCE.exists() else {}
        stored.update({f"{name}/{k}": v for k, v in got.items()})
        np.savez_compressed(REFERENCE, **stored)
        pytest.skip("reference recorded")
    stored = np.load(REFERENCE)
    want = {k: stored[f"{name}/{k}"] for k in got}
    assert got["logits"].shape == want["logits"].shape
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["no_target_prob"], want["no_target_prob"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=1e-5)
    # a logit within 1e-5 of the threshold may flip one pixel, nothing more
    np.testing.assert_allclose(got["area"], want["area"], rtol=0, atol=2)
    np.testing.assert_array_equal(got["points"], want["points"])
