"""Untrusted files and names: crafted pickles never run, model names never reach outside the model
directory, the server listens on localhost unless told otherwise.

Every crafted file, when unpickled, creates a marker file (os.system,
builtins.exec, subprocess, ...); each test checks the marker never appears.
"""

import json
import os
import pickle
import subprocess

import pytest
import torch
from _serve_fixtures import RedModel, png_bytes, red_square_image, tiny_lts_file
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import refseg
from refseg import hub
from refseg.cli import main as cli
from refseg.data.refer import ReferFormatError, load_refs_file
from refseg.engine import checkpoint as ckpt
from refseg.serve import create_app


class Call:
    """Pickles to `fn(*args)`: what a malicious pickle does on load."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def payloads(marker):
    """Pickled objects that would create `marker` when loaded, by several routes."""
    return {
        "os.system": Call(os.system, f"touch {marker}"),
        "builtins.exec": Call(exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": Call(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": Call(subprocess.call, ["touch", str(marker)]),
        "nested in a ref": [{"ref_id": 1, "sentences": [{"sent": Call(os.system, f"touch {marker}")}]}],
    }


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("route", ["os.system", "builtins.exec", "builtins.eval", "subprocess.call", "nested in a ref"])
def test_refs_pickle_never_runs_code(tmp_path, route, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(payloads(marker)[route], protocol=protocol))
    with pytest.raises(ReferFormatError, match=r"refs\(unc\)\.p: .*is not allowed"):
        load_refs_file(path)
    assert not marker.exists()


def test_hand_written_protocol0_inst_opcode_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs.p"
    path.write_bytes(f"(S'touch {marker}'\nios\nsystem\n.".encode())  # INST: no __reduce__ involved
    with pytest.raises(ReferFormatError, match="os.system"):
        load_refs_file(path)
    assert not marker.exists()


def _pickled_weights(path, marker, legacy=False):
    obj = {"head.weight": Call(os.system, f"touch {marker}")}
    if legacy:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "pytorch_model.bin", "disguised.safetensors"])
@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save", "plain-pickle"])
def test_pickled_weights_are_refused_unread(tmp_path, name, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _pickled_weights(path, marker, legacy)
    path.with_suffix(".json").write_text(json.dumps({"config": {"model": "lts"}}))
    with pytest.raises(ckpt.CheckpointError, match=f"{name}: looks like a PyTorch pickle"):
        refseg.load(path)
    assert not marker.exists()


def test_a_checkpoint_folder_holding_a_pickle_is_refused_on_resume_and_load(tmp_path):
    """A run folder whose weights were replaced by a pickle, manifest rewritten to match it."""
    from _engine_fixtures import tiny_model

    marker = tmp_path / "pwned"
    model = tiny_model()
    folder = ckpt.save_checkpoint(tmp_path / "run" / "last", model,
                                  torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    for name in (ckpt.MODEL_FILE, ckpt.OPTIM_FILE):
        _pickled_weights(folder / name, marker)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        meta.update(size=(folder / name).stat().st_size, sha256=ckpt.sha256_of(folder / name))
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.is_complete(folder)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: looks like a PyTorch pickle"):
        ckpt.load_model(tmp_path / "run")
    with pytest.raises(ckpt.CheckpointError, match="looks like a PyTorch pickle"):
        ckpt.load_training_state(folder, tiny_model())
    assert not marker.exists()


def test_safetensors_metadata_is_never_executed(tmp_path):
    """The safetensors header is JSON: a 'pickle' in its metadata is only a string."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Call(os.system, f"touch {marker}")).hex()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={"format": "pt", "pickle": payload})
    assert set(ckpt.read_safetensors(tmp_path / "m.safetensors")) == {"w"}
    assert not marker.exists()


# ---- model names ---------------------------------------------------------------------------------


ESCAPES = ["../weights/lts-synthref", "../../refseg/weights/lts-synthref", "/etc/passwd", "lts-synthref/../x",
           "..", ".", "", "lts-synthref\0", "lts-synthref.json"]


@pytest.mark.parametrize("name", ESCAPES)
def test_model_card_names_never_leave_the_weights_folder(name):
    with pytest.raises(KeyError, match="unknown model"):
        hub.model_card(name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = create_app({"red": RedModel()}, default="red", demo=False)
    with TestClient(app) as c:
        yield c, app


@pytest.mark.parametrize("name", ESCAPES[:5] + ["lts-synthref", "CHECKPOINT"])
def test_server_model_names_are_only_registered_names(server, name, tmp_path):
    client, app = server
    if name == "CHECKPOINT":  # a real, loadable checkpoint path on the server's disk
        name = str(tiny_lts_file(tmp_path))
    r = client.post("/segment", files={"image": ("x.png", png_bytes(red_square_image()), "image/png")},
                    data={"text": "the red square", "model": name})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
    assert app.state.pool.loaded() in ([], ["red"])  # nothing named by a request was loaded


# ---- where the server listens ---------------------------------------------------------------------


def test_the_server_binds_to_localhost_by_default(tmp_path, monkeypatch):
    import uvicorn

    from refseg import demo_cli

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(kwargs))
    weights = tiny_lts_file(tmp_path)
    assert cli(["demo", "--model", str(weights), "--no-demo", "--no-examples", "--port", "1"]) == 0
    assert calls["host"] == "127.0.0.1"
    parser = __import__("argparse").ArgumentParser()
    demo_cli.add_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"


def test_untrusted_files_through_the_command_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _pickled_weights(tmp_path / "evil.pt", marker)
    assert cli(["predict", "--model", str(tmp_path / "evil.pt"), "--image", "x.png", "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert "evil.pt: looks like a PyTorch pickle" in err and "Traceback" not in err
    assert not marker.exists()
