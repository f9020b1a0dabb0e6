"""The shipped default model: listed, integrity-checked, and actually segmenting."""

import shutil

import numpy as np
import pytest
import torch

import refseg
from refseg import hub
from refseg.engine import checkpoint as ckpt


def test_default_model_is_listed_and_has_a_card():
    assert "lts-synthref" in refseg.available_models()
    card = hub.model_card("lts-synthref")
    assert card["sha256"] == ckpt.sha256_of(hub.WEIGHTS_DIR / "lts-synthref.safetensors")
    assert card["training"]["commands"], "the card must record the command that trained the model"


def test_corrupt_weights_are_refused(tmp_path, monkeypatch):
    for suffix in (".safetensors", ".json"):
        shutil.copy(hub.WEIGHTS_DIR / f"lts-synthref{suffix}", tmp_path / f"lts-synthref{suffix}")
    with open(tmp_path / "lts-synthref.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    monkeypatch.setattr(hub, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(Exception, match="(?i)sha-?256"):
        refseg.load("lts-synthref")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="lts-synthref"):
        refseg.load("no-such-model")


def test_default_model_segments_synthref(synthref_tiny):
    """The trained default, through the Predictor, on a split it never saw.

    The model scores mIoU ~0.83 on SynthRef natural small test; on 40 tiny
    test sentences anything under 0.6 means loading or pre/post-processing broke.
    """
    from refseg.data import load_refer
    from refseg.metrics import RISMetrics

    torch.set_num_threads(1)
    data = load_refer(synthref_tiny)
    predictor = refseg.Predictor(refseg.load("lts-synthref"))
    metrics = RISMetrics()
    samples = data.samples("test")[:40]
    for image_id in dict.fromkeys(s.image_id for s in samples):
        group = [s for s in samples if s.image_id == image_id]
        predictor.set_image(data.load_image(image_id))
        result = predictor.predict([s.text for s in group])
        for s, mask, point in zip(group, result.masks, result.points):
            metrics.update(mask, data.get_mask(s.ann_id).astype(bool), point=tuple(point))
    figures = metrics.compute()
    assert figures["n"] == 40
    assert figures["mIoU"] > 0.6 and figures["PointM"] > 0.6, figures


def test_load_with_inference_options():
    """options rebuild the model with the same weights; ones that change the weights or the kind are refused."""
    from refseg.engine.checkpoint import CheckpointError

    base = refseg.load("sag-synthref")
    fine = refseg.load("sag-synthref", options={"mask_refine": 2})
    assert base.config["mask_refine"] == 4 and fine.config["mask_refine"] == 2 and fine.head.mask_refine == 2
    assert not fine.training
    a, b = base.state_dict(), fine.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="shape"):
        refseg.load("lts-synthref", options={"dim": 64})
    with pytest.raises(ValueError, match="no_such_option"):
        refseg.load("lts-synthref", options={"no_such_option": 1})
    for changes_the_encoders in ({"text": "hf:bert-base-uncased"}, {"text_depth": 1}):
        with pytest.raises(ValueError, match="kind or encoders"):
            refseg.load("lts-synthref", options=changes_the_encoders)
