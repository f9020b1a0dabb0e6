"""`refseg train` attacked the ways that lose work: a finished run trained over, a damaged last/, a resume
with other batch settings, two processes on one run folder, a state.json missing a field, a full disk.

Every test drives the real command line (refseg.cli.main) on the tiny LTS of tests/_engine_fixtures.py
(random encoders, 64 px, 4 steps with cached features on SynthRef tiny); a resume that could loop
forever runs in a child process with a timeout.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _engine_fixtures import TINY_LTS, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from safetensors import SafetensorError
from safetensors.torch import load_file

from refseg.cli import main as cli
from refseg.engine import checkpoint as ckpt
from refseg.engine.sampler import GroupBatchSampler

STEPS = 4  # saves: last/ at step 2, then last/ (the step-2 one kept as .last.prev) and best/ at step 4
ROOT = Path(__file__).resolve().parent.parent


def train_args(data: Path, run: Path, cache: Path) -> list:
    return ["train", "--data", str(data), "--out", str(run), "--model", "lts", "--model-kwargs", json.dumps(TINY_LTS),
            "--size", "64", "--batch-size", "4", "--images-per-batch", "2", "--max-steps", str(STEPS),
            "--save-every", "2", "--val-every", "0", "--val-max-samples", "12", "--warmup-steps", "2", "--lr", "3e-3",
            "--threads", "1", "--log-every", "1", "--seed", "0", "--cache-dir", str(cache), "--save-frozen"]


@pytest.fixture(scope="module")
def finished(synthref_tiny, tmp_path_factory):
    """One finished run (the reference every damaged copy must get back to)."""
    work = tmp_path_factory.mktemp("train-attack")
    run = work / "run"
    assert cli(train_args(synthref_tiny, run, work / "cache") + ["--no-progress"]) == 0
    assert json.loads((run / ".last.prev" / "state.json").read_text())["step"] == 2
    return SimpleNamespace(run=run, data=synthref_tiny, cache=work / "cache")


def copy_run(finished, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished.run, run)
    return run


def files_of(run: Path) -> dict:
    """{relative path: bytes} of every file in the run but its lock file (whose content is the holder's pid)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("refseg train: error: "), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return lines[-1]


def rewrite_state(ckpt_dir: Path, edit) -> None:
    """Edit state.json and record the new file in the manifest, as a consistent (not truncated) file would be."""
    path = ckpt_dir / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"size": path.stat().st_size, "sha256": ckpt.sha256_of(path)}
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


def cli_child(argv: list, timeout: float) -> subprocess.CompletedProcess:
    """`refseg <argv>` in a child process; a run that never ends fails the test instead of hanging it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run([sys.executable, "-m", "refseg.cli", *argv], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"refseg {' '.join(argv[:3])} ... still running after {timeout} s (an endless loop)")


# ---- a finished run is never trained over -----------------------------------------------------


def test_training_into_a_finished_run_is_refused_and_changes_nothing(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = files_of(run)
    assert cli(train_args(finished.data, run, finished.cache) + ["--no-progress", "--lr", "1e-2"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert files_of(run) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(finished, tmp_path, capsys, monkeypatch):
    run = copy_run(finished, tmp_path)
    best = load_file(str(run / "best" / "model.safetensors"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the new run is stopped before its first checkpoint

    monkeypatch.setattr(ckpt, "save_checkpoint", crash)
    assert cli(train_args(finished.data, run, finished.cache) + ["--no-progress", "--overwrite"]) == 130
    monkeypatch.undo()
    aside = list(tmp_path.glob(".run.replaced-*"))
    assert len(aside) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert ckpt.verify_resume_point(aside[0] / "last")["step"] == STEPS  # the old run, whole, under one name
    assert same_tensors(aside[0] / "best" / "model.safetensors", finished.run / "best" / "model.safetensors")
    assert not (run / "best").exists() and not (run / "last").exists()

    assert cli(train_args(finished.data, run, finished.cache) + ["--no-progress", "--overwrite",
                                                                 "--max-steps", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old runs went with the first checkpoint
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 2
    assert not all(torch.equal(v, load_file(str(run / "best" / "model.safetensors"))[k]) for k, v in best.items())
    capsys.readouterr()
    assert cli(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "only one of them" in one_line_error(capsys.readouterr().err)


# ---- resume from a damaged last/ ---------------------------------------------------------------


def damage(last: Path, how: str) -> str:
    """Damage last/ as a crash, a full disk or a hand could; returns the name the error must mention."""
    if how == "file deleted":
        (last / "optimizer.safetensors").unlink()
        return "optimizer.safetensors"
    if how == "file truncated":
        f = last / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return "model.safetensors"
    if how == "corrupt JSON":
        (last / "state.json").write_text('{"step": 4, "epoch"')
        return "state.json"
    if how == "manifest deleted":
        (last / "manifest.json").unlink()
        return "manifest.json"
    shutil.rmtree(last)
    return "last"


DAMAGE = ["file deleted", "file truncated", "corrupt JSON", "manifest deleted"]


@pytest.mark.parametrize("how", DAMAGE + ["folder deleted"])
def test_resume_with_a_damaged_last_continues_from_the_previous_checkpoint(finished, tmp_path, capsys, how):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "best")  # (the step-4 best/ would be the newest whole one: see the test below)
    named = damage(run / "last", how)
    assert cli(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert named in err and f"resuming from {run / '.last.prev'} (step 2)" in err, err
    # it went on from step 2, exactly: the end is the uninterrupted run's, bitwise
    assert json.loads((run / "last" / "state.json").read_text())["step"] == STEPS
    for name in ("last/model.safetensors", "last/optimizer.safetensors", "best/model.safetensors"):
        assert same_tensors(run / name, finished.run / name), name


@pytest.mark.parametrize("how", DAMAGE)
def test_resume_with_no_whole_checkpoint_is_refused_and_changes_nothing(finished, tmp_path, capsys, how):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / ".last.prev")
    shutil.rmtree(run / "best")
    named = damage(run / "last", how)
    before = files_of(run)
    assert cli(["train", "--resume", str(run), "--no-progress"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert named in line and str(run) in line
    assert files_of(run) == before  # nothing restarted at step 0, nothing written


def test_resume_falls_back_to_best_when_it_is_the_only_whole_checkpoint(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / ".last.prev")
    damage(run / "last", "file deleted")
    assert cli(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"]) == 0
    assert f"resuming from {run / 'best'} (step {STEPS})" in capsys.readouterr().err
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 6


# ---- state.json missing a field, or holding a wrong one ---------------------------------------------


@pytest.mark.parametrize("field, edit", [
    ("position", lambda s: s.pop("position")),
    ("epoch", lambda s: s.pop("epoch")),
    ("rng", lambda s: s.pop("rng")),
    ("rng", lambda s: s["rng"].update(numpy=[1, 2])),
    ("optimizer.param_groups", lambda s: s["optimizer"].pop("param_groups")),
    ("position", lambda s: s.update(position="3")),
    ("best", lambda s: s.update(best=[0.5])),
])
def test_state_file_missing_a_field_is_one_line_naming_file_and_field(finished, tmp_path, capsys, field, edit):
    run = copy_run(finished, tmp_path)
    for folder in ("last", ".last.prev", "best"):
        rewrite_state(run / folder, edit)
    before = files_of(run)
    assert cli(["train", "--resume", str(run), "--no-progress"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "state.json" in line and field in line, line
    assert files_of(run) == before


# ---- resume under other batch settings ---------------------------------------------------------------


@pytest.mark.parametrize("flags, field, now, saved", [
    (["--batch-size", "128"], "batch_size", "128", "4"),  # 2 batches per epoch: the saved batch 4 lies beyond
    (["--images-per-batch", "1"], "images_per_batch", "1", "2"),
])
def test_resume_with_other_batch_settings_is_refused_naming_the_field(finished, tmp_path, flags, field, now, saved):
    run = copy_run(finished, tmp_path)
    proc = cli_child(["train", "--resume", str(run), "--max-steps", "8", "--no-progress", *flags], timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line_error(proc.stderr)
    assert field in line and now in line and saved in line
    assert json.loads((run / "last" / "state.json").read_text())["step"] == STEPS


def test_resume_from_a_position_beyond_the_epoch_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    for folder in ("last", ".last.prev", "best"):
        rewrite_state(run / folder, lambda s: s.update(position=9999))
    # (no feature cache: the refusal comes before training, a cache would be built for nothing)
    proc = cli_child(["train", "--resume", str(run), "--max-steps", "8", "--no-progress", "--cache-features", "off"],
                     timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line_error(proc.stderr)
    assert "state.json" in line and "9999" in line


def test_sampler_refuses_a_start_outside_the_epoch():
    s = GroupBatchSampler([1, 1, 2, 2, 3, 3, 4, 4], batch_size=4, images_per_batch=2, seed=0)
    assert len(s) == 2 and s.batches(0, start=1) == s.batches(0)[1:]
    for start in (2, 5, -1):
        with pytest.raises(ValueError, match="outside the epoch"):
            s.batches(0, start=start)


# ---- two processes on one run folder ------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(300)
"""


def test_second_process_on_a_run_is_refused_and_a_killed_holder_never_blocks(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = files_of(run)
        for argv in (["train", "--resume", str(run), "--max-steps", "6", "--no-progress"],
                     train_args(finished.data, run, finished.cache) + ["--no-progress", "--overwrite"]):
            assert cli(argv) == 2
            line = one_line_error(capsys.readouterr().err)
            assert str(run) in line and f"pid {holder.pid}" in line, line
        assert files_of(run) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    assert cli(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"]) == 0
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 6


# ---- a full disk during a save ------------------------------------------------------------------------


def _fail_on_call(n: int, real, error: BaseException):
    calls = {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    return write


@pytest.mark.parametrize("target, call, error", [
    # the step-4 last/: its weights (safetensors reports the OS error inside its own exception) ...
    ("save_file", 3, SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    # ... or its state.json
    ("_write_json", 5, OSError(errno.ENOSPC)),
])
def test_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_resumes(finished, tmp_path, capsys,
                                                                                 monkeypatch, target, call, error):
    run = tmp_path / "run"
    monkeypatch.setattr(ckpt, target, _fail_on_call(call, getattr(ckpt, target), error))
    assert cli(train_args(finished.data, run, finished.cache)) == 2  # with the progress bar
    monkeypatch.undo()
    line = one_line_error(capsys.readouterr().err)
    assert f"cannot write {run / 'last'}: No space left on device" in line and f"--resume {run}" in line, line
    assert ckpt.verify_resume_point(run / "last")["step"] == 2
    assert not list(run.glob(".last.tmp-*"))
    assert cli(["train", "--resume", str(run), "--no-progress"]) == 0
    for name in ("last/model.safetensors", "last/optimizer.safetensors", "best/model.safetensors"):
        assert same_tensors(run / name, finished.run / name), name
