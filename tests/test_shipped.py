"""The shipped default model: listed, integrity-checked, and actually segmenting."""

import shutil

import numpy as np
import pytest
import torch

import refseg
from refseg import hub


def test_default_model_is_listed_and_has_a_card():
    assert "lts-synthref" in refseg.available_models()
    card = hub.model_card("lts-synthref")
    assert card["sha256"] == hub.sha256_of(hub.WEIGHTS_DIR / "lts-synthref.safetensors")
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
