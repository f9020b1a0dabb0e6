"""Backends: ONNX Runtime graphs built on first use and cached per model hash, PyTorch as fallback.

One real export of the tiny LTS checkpoint (module fixture, into a temporary
$REFSEG_CACHE); the cache's own logic is also tested with a fake builder.
"""

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from _serve_fixtures import red_square_image, tiny_lts_file

import refseg
from refseg import backends, cli
from refseg.backends import BackendError, cached_graphs, is_complete, load_predictor, source_key
from refseg.export import PARITY_TOLERANCE, OnnxPredictor
from refseg.predictor import Predictor

TEXTS = ["the red square", "the blue circle on the left", "the third star from the top right corner"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint path, cache root): the tiny LTS as a checkpoint file, its graphs built once by load_predictor."""
    folder = tmp_path_factory.mktemp("ckpt")
    weights = tiny_lts_file(folder)
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("REFSEG_CACHE")
    os.environ["REFSEG_CACHE"] = str(cache)
    try:
        p = load_predictor(weights, backend="onnx")
    finally:
        if old is None:
            del os.environ["REFSEG_CACHE"]
        else:
            os.environ["REFSEG_CACHE"] = old
    assert isinstance(p, OnnxPredictor)
    return weights, cache


@pytest.fixture
def cache_env(built, monkeypatch):
    monkeypatch.setenv("REFSEG_CACHE", str(built[1]))
    monkeypatch.delenv("REFSEG_BACKEND", raising=False)  # the default: auto
    return built


def test_default_is_onnx_and_matches_pytorch_through_postprocess(cache_env):
    weights, cache = cache_env
    onnx_p = load_predictor(weights)  # backend None -> auto -> the cached graphs
    torch_p = load_predictor(weights, backend="torch")
    assert isinstance(onnx_p, OnnxPredictor) and type(torch_p) is Predictor
    image = red_square_image(57, 93)  # not square: letterbox and its inverse are exercised
    onnx_p.set_image(image)
    torch_p.set_image(image)
    a, b = torch_p.predict(TEXTS), onnx_p.predict(TEXTS)
    assert a.logits.std() > 0.3, "constant logits would make the comparison vacuous"
    assert np.abs(a.logits - b.logits).max() < PARITY_TOLERANCE
    assert np.abs(a.no_target_prob - b.no_target_prob).max() < PARITY_TOLERANCE
    assert (a.no_target == b.no_target).all()
    assert np.abs(a.scores - b.scores).max() < PARITY_TOLERANCE
    # points: the argmax of the logits; where two pixels are within tolerance either may win
    for k in range(len(TEXTS)):
        x, y = b.points[k]
        assert a.logits[k][y, x] >= a.logits[k].max() - 2 * PARITY_TOLERANCE
    undecided = np.abs(a.logits) < PARITY_TOLERANCE
    assert ((a.masks == b.masks) | undecided).all()


def test_second_use_reuses_the_cache_without_exporting(cache_env, monkeypatch):
    weights, cache = cache_env

    def no_export(*a, **k):
        raise AssertionError("export_onnx called although the graphs are cached")

    monkeypatch.setattr("refseg.export.export_onnx", no_export)
    p = load_predictor(weights, backend="onnx")
    assert isinstance(p, OnnxPredictor)
    folders = [d for d in cache.joinpath("onnx").iterdir() if d.is_dir()]
    assert len(folders) == 1 and is_complete(folders[0])
    assert folders[0].name == source_key(weights)


def test_key_changes_with_the_weights_and_the_options(built, tmp_path):
    weights, _ = built
    copy = tmp_path / "tiny-lts.safetensors"
    copy.write_bytes(weights.read_bytes())
    copy.with_suffix(".json").write_text(weights.with_suffix(".json").read_text())
    assert source_key(copy) == source_key(weights)  # the hash of the contents, not the path
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    copy.write_bytes(bytes(data))
    assert source_key(copy) != source_key(weights)
    assert source_key(weights, {"mask_refine": 2}) != source_key(weights)


def test_a_shipped_model_with_changed_weights_is_refused(tmp_path, monkeypatch):
    from refseg import hub
    from refseg.engine.checkpoint import CheckpointError

    folder = tmp_path / "weights"
    folder.mkdir()
    name = "lts-synthref"
    (folder / f"{name}.json").write_text((hub.WEIGHTS_DIR / f"{name}.json").read_text())
    data = bytearray((hub.WEIGHTS_DIR / f"{name}.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / f"{name}.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(hub, "WEIGHTS_DIR", folder)
    with pytest.raises(CheckpointError, match="SHA-256"):
        source_key(name)


def _fake_build(calls):
    def build(stem: Path):
        calls.append(stem)
        time.sleep(0.2)
        stem.with_name("model.image.onnx").write_bytes(b"x" * 10)
        stem.with_name("model.json").write_text("{}")
    return build


def test_cache_builds_once_rebuilds_on_a_new_key_and_ignores_incomplete_folders(tmp_path):
    calls = []
    a = cached_graphs("a" * 64, _fake_build(calls), root=tmp_path)
    assert len(calls) == 1 and is_complete(a)
    assert cached_graphs("a" * 64, _fake_build(calls), root=tmp_path) == a and len(calls) == 1  # reused
    b = cached_graphs("b" * 64, _fake_build(calls), root=tmp_path)
    assert len(calls) == 2 and b != a  # another hash: built anew
    # a folder without COMPLETE (a build killed before its rename, a copy ...) is never used
    c = tmp_path / ("c" * 64)
    c.mkdir()
    (c / "model.json").write_text("{}")
    assert not is_complete(c)
    assert cached_graphs("c" * 64, _fake_build(calls), root=tmp_path) == c and len(calls) == 3 and is_complete(c)
    # COMPLETE that lists a file now truncated: rebuilt
    (a / "model.image.onnx").write_bytes(b"x")
    assert not is_complete(a)
    cached_graphs("a" * 64, _fake_build(calls), root=tmp_path)
    assert len(calls) == 4 and is_complete(a)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging folder left


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(stem: Path):
        stem.with_name("model.image.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cached_graphs("d" * 64, broken, root=tmp_path)
    assert not (tmp_path / ("d" * 64)).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_concurrent_first_uses_build_once(tmp_path):
    calls, results, errors = [], [], []

    def use():
        try:
            results.append(cached_graphs("e" * 64, _fake_build(calls), root=tmp_path))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and len(set(results)) == 1 and is_complete(results[0])


def test_falls_back_to_pytorch_with_one_warning_when_onnxruntime_is_missing(cache_env, monkeypatch, tmp_path):
    weights, _ = cache_env
    monkeypatch.setenv("REFSEG_CACHE", str(tmp_path))  # nothing cached: a build would be needed
    monkeypatch.setattr(backends, "onnx_missing", lambda build=True: "onnxruntime")
    monkeypatch.setattr(backends, "_reported", set())
    with pytest.warns(RuntimeWarning, match="onnxruntime is not installed"):
        p = load_predictor(weights)
    assert type(p) is Predictor
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        assert type(load_predictor(weights)) is Predictor
    with pytest.raises(BackendError, match="onnxruntime is not installed"):
        load_predictor(weights, backend="onnx")


def test_falls_back_to_pytorch_when_the_export_fails(cache_env, monkeypatch, tmp_path):
    weights, _ = cache_env
    monkeypatch.setenv("REFSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(backends, "_reported", set())

    def failing(*a, **k):
        raise RuntimeError("ONNX and PyTorch mask logits differ by 1.0e+00")

    monkeypatch.setattr("refseg.export.export_onnx", failing)
    with pytest.warns(RuntimeWarning, match="the ONNX export failed"):
        assert type(load_predictor(weights)) is Predictor
    assert not (tmp_path / "onnx" / source_key(weights)).exists()


def test_bad_backend_values_are_refused(cache_env, monkeypatch):
    weights, _ = cache_env
    with pytest.raises(ValueError, match="backend must be one of"):
        load_predictor(weights, backend="tensorrt")
    monkeypatch.setenv("REFSEG_BACKEND", "fast")
    with pytest.raises(BackendError, match="REFSEG_BACKEND='fast'"):
        load_predictor(weights)


def test_cli_uses_the_cached_graphs_and_reports_a_fallback_once(cache_env, monkeypatch, tmp_path, capsys):
    weights, _ = cache_env
    image = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(red_square_image()).save(image)
    monkeypatch.setattr("refseg.export.export_onnx", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert cli.main(["predict", "--model", str(weights), "--image", str(image), "--text", "the red square",
                     "--mask-out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").is_file() and capsys.readouterr().err == ""
    monkeypatch.setattr(backends, "onnx_missing", lambda build=True: "onnxruntime")
    monkeypatch.setattr(backends, "_reported", set())
    assert cli.main(["predict", "--model", str(weights), "--image", str(image), "--text", "x"]) == 0
    err = capsys.readouterr().err
    assert err.count("using the PyTorch backend: onnxruntime is not installed") == 1
    assert cli.main(["predict", "--backend", "onnx", "--model", str(weights), "--image", str(image),
                     "--text", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("refseg predict: error: backend 'onnx': onnxruntime is not installed") and "\n" not in err


def test_the_predict_path_imports_neither_transformers_nor_gradio(cache_env):
    """A fresh process: `import refseg` imports no heavy package; the ONNX predictor adds no transformers."""
    weights, cache = cache_env
    code = ("import sys, refseg, refseg.cli, refseg.predict_cli, refseg.backends\n"
            "heavy = ('torch', 'transformers', 'gradio', 'onnxruntime')\n"
            "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
            f"p = refseg.load_predictor({str(weights)!r})\n"
            "assert type(p).__name__ == 'OnnxPredictor', type(p)\n"
            "assert 'transformers' not in sys.modules and 'gradio' not in sys.modules\n")
    env = {**os.environ, "REFSEG_CACHE": str(cache)}
    env.pop("REFSEG_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_int8_is_opt_in_and_close(cache_env):
    """int8=True runs the int8 text and head graphs built with the float ones: other logits, same masks
    almost everywhere; the default stays float (within the parity tolerance, tested above)."""
    weights, _ = cache_env
    image = red_square_image(57, 93)
    runs = {}
    for int8 in (False, True):
        p = load_predictor(weights, backend="onnx", int8=int8)
        p.set_image(image)
        runs[int8] = p.predict(TEXTS)
    diff = np.abs(runs[True].logits - runs[False].logits)
    assert diff.max() > 1e-4, "the int8 graphs gave the float graphs' logits: they were not used"
    assert diff.mean() < 0.1 * np.abs(runs[False].logits).mean()
    assert (runs[True].masks == runs[False].masks).mean() > 0.98


def test_needs_build_tells_the_demo_when_graphs_are_missing(cache_env, monkeypatch, tmp_path):
    """`refseg demo` builds missing graphs in the background (so /health answers at once) and loads cached
    ones before it listens; needs_build tells the two apart and checks the source first."""
    weights, _ = cache_env
    assert not backends.needs_build(weights)  # cached
    assert not backends.needs_build(weights, "torch")
    monkeypatch.setenv("REFSEG_CACHE", str(tmp_path))
    assert backends.needs_build(weights) and backends.needs_build(weights, "onnx")
    with pytest.raises(FileNotFoundError, match="nor an existing path"):
        backends.needs_build(str(tmp_path / "missing.safetensors"))
