"""Checkpoints: atomic writes, optimizer / RNG state without pickle, load_model, export_heads."""

import copy
import json
import os
import random

import numpy as np
import pytest
import torch
from _engine_fixtures import SIZE, one_thread, tiny_model  # noqa: F401 (one_thread: an autouse fixture)
from safetensors.torch import load_file

from refseg.engine import checkpoint as ckpt


def _adam_after_steps(model, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:]}], lr=1e-3)
    for _ in range(steps):
        loss = sum((p.float() ** 2).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _outputs(model):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        return model.eval()(images, ["the red square", "the blue square on the left"])


def test_stored_state_skips_frozen_encoders_that_can_be_rebuilt(model):
    assert set(ckpt.frozen_prefixes(model)) == {"visual", "text"}
    # the tiny model's encoders are random (config dicts): nothing rebuilds them, so they are stored
    assert set(ckpt.stored_state(model)) == set(model.state_dict())
    pretrained = copy.deepcopy(model)
    pretrained.config = {**model.config, "visual": "efficientnet-lite0", "text": "minilm"}
    heads = ckpt.stored_state(pretrained)
    assert heads and all(k.startswith("head.") for k in heads)
    assert set(ckpt.stored_state(pretrained, include_frozen=True)) == set(model.state_dict())


def test_save_and_resume_state_roundtrip(tmp_path, model):
    opt = _adam_after_steps(model)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    ckpt.save_checkpoint(tmp_path / "last", model, opt, {"step": 2, "epoch": 0, "position": 2})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    assert ckpt.is_complete(tmp_path / "last")
    for f in ("model.safetensors", "model.json", "optimizer.safetensors", "state.json", "manifest.json"):
        assert (tmp_path / "last" / f).is_file()
    json.loads((tmp_path / "last" / "state.json").read_text())  # plain JSON

    fresh = tiny_model(seed=3)
    fresh_opt = _adam_after_steps(fresh, steps=1)
    state = ckpt.load_training_state(tmp_path / "last", fresh, fresh_opt)
    assert state["step"] == 2
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        if n.startswith("head."):
            assert torch.equal(a, b), n
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    assert [g["weight_decay"] for g in sa["param_groups"]] == [g["weight_decay"] for g in sb["param_groups"]]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(torch.as_tensor(sa["state"][i][k]), torch.as_tensor(sb["state"][i][k]))


def test_failed_save_keeps_previous_checkpoint(tmp_path, model, monkeypatch):
    ckpt.save_checkpoint(tmp_path / "last", model, None, {"step": 1})
    before = (tmp_path / "last" / "model.safetensors").read_bytes()

    calls = {"n": 0}
    real = ckpt._save_safetensors

    def failing(tensors, path):
        calls["n"] += 1
        real(tensors, path)
        raise OSError("disk full")  # after the file was (partly) written

    monkeypatch.setattr(ckpt, "_save_safetensors", failing)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path / "last", model, None, {"step": 2})
    monkeypatch.undo()
    assert calls["n"] == 1
    assert ckpt.find_checkpoint(tmp_path, "last") == tmp_path / "last"
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "last" / "state.json").read_text())["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last"]  # the temporary folder was removed


def test_crash_between_renames_is_recovered(tmp_path, model, monkeypatch):
    ckpt.save_checkpoint(tmp_path / "last", model, None, {"step": 1})
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # old moved aside; the new one never arrives
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / "last", model, None, {"step": 2})
    monkeypatch.undo()
    assert not (tmp_path / "last").exists()
    found = ckpt.find_checkpoint(tmp_path, "last")
    assert found is not None and json.loads((found / "state.json").read_text())["step"] == 1
    # the next save cleans up and leaves a single valid folder
    ckpt.save_checkpoint(tmp_path / "last", model, None, {"step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_half_written_folder_is_not_a_checkpoint(tmp_path, model):
    ckpt.save_checkpoint(tmp_path / "last", model, None, {"step": 1})
    f = tmp_path / "last" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # truncated behind our back
    assert not ckpt.is_complete(tmp_path / "last")
    assert ckpt.find_checkpoint(tmp_path, "last") is None
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(tmp_path / "last")


def test_load_model_from_checkpoint_and_run_dir(tmp_path, model):
    ckpt.save_checkpoint(tmp_path / "run" / "best", model, None, {"step": 4}, include_frozen=True)
    ref = _outputs(model)
    for path in (tmp_path / "run" / "best", tmp_path / "run"):
        loaded = ckpt.load_model(path)
        assert not loaded.training
        out = _outputs(loaded)
        assert torch.equal(out["mask_logits"], ref["mask_logits"])


def test_load_model_copies_a_like_model_of_the_same_config(tmp_path, model, monkeypatch):
    """like= skips rebuilding: the result is a copy of `like` carrying the checkpoint's weights."""
    ckpt.save_checkpoint(tmp_path / "run" / "last", model, None, {"step": 1}, include_frozen=True)
    other = tiny_model(seed=3)  # same config, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with monkeypatch.context() as m:
        m.setattr(ckpt, "build_model", lambda config: pytest.fail("rebuilt although `like` fits"))
        loaded = ckpt.load_model(tmp_path / "run", like=other)
    assert loaded is not other
    assert torch.equal(_outputs(loaded)["mask_logits"], _outputs(model)["mask_logits"])
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # `like` left as it was
    different = copy.deepcopy(other)
    different.config = {**other.config, "dim": 999}
    rebuilt = ckpt.load_model(tmp_path / "run", like=different)
    assert rebuilt.config == model.config and torch.equal(_outputs(rebuilt)["mask_logits"],
                                                          _outputs(model)["mask_logits"])


def test_load_weights_reports_problems(model):
    bad = {k: v for k, v in ckpt.stored_state(model).items() if k.startswith("head.")}
    name, gone = sorted(bad)[0], sorted(bad)[-1]
    bad[name] = torch.zeros(3, 3, 3)
    bad.pop(gone)
    bad["head.not_a_layer.weight"] = torch.zeros(1)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_weights(tiny_model(), bad)
    text = str(err.value)
    assert "missing" in text and "unexpected" in text and "shape mismatch" in text
    assert "head.not_a_layer.weight" in text and name in text and gone in text


def test_export_heads_fp16(tmp_path, model):
    st, js = ckpt.export_heads(model, tmp_path / "weights" / "lts-tiny", {"command": "refseg train ...",
                                                                         "scores": {"mIoU": 0.5}}, fp16=True)
    meta = json.loads(js.read_text())
    assert meta["sha256"] == ckpt.sha256_of(st) and meta["dtype"] == "float16" and meta["command"]
    assert all(v.dtype == torch.float16 for v in load_file(str(st)).values() if v.is_floating_point())
    assert meta["config"] == model.config and len(meta["stored"]) == len(model.state_dict())
    assert oct(st.stat().st_mode & 0o777) == oct(0o644)
    loaded = ckpt.load_model(st)
    a, b = _outputs(model), _outputs(loaded)
    assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=5e-2)
    st.write_bytes(st.read_bytes()[:-1] + b"\0")
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_model(st)


def test_optimizer_state_survives_a_change_of_parameter_registration_order():
    from torch import nn

    from refseg.engine.state import load_optimizer_state, optimizer_state

    class AB(nn.Module):
        def __init__(self, a_first: bool):
            super().__init__()
            if a_first:
                self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 4)
            else:
                self.b, self.a = nn.Linear(2, 4), nn.Linear(3, 2)

    torch.manual_seed(0)
    src, dst = AB(a_first=True), AB(a_first=False)
    dst.load_state_dict(src.state_dict())
    opt = torch.optim.AdamW(src.parameters(), lr=0.1)
    (src.b(src.a(torch.randn(5, 3))) ** 2).sum().backward()
    opt.step()
    tensors, meta = optimizer_state(opt, {p: n for n, p in src.named_parameters()})

    opt2 = torch.optim.AdamW(dst.parameters(), lr=0.1)
    load_optimizer_state(opt2, {p: n for n, p in dst.named_parameters()}, tensors, meta)
    for name, p in dst.named_parameters():
        want = opt.state[dict(src.named_parameters())[name]]["exp_avg"]
        assert torch.equal(opt2.state[p]["exp_avg"], want), name
