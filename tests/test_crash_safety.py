"""Crash safety, fast versions of stress/kill_train.py and stress/kill_make_data.py.

The attempts are forked from the test process (no interpreter start-up)
and SIGKILLed; the scripts' own checks run after every kill (checkpoint
files whole and SHA-256-verified, the resume point bitwise equal to an
uninterrupted run's checkpoint at that step, no half-written data set
loadable) and raise on any failure. The long versions with >= 10 kills are
the scripts themselves.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _engine_fixtures import one_thread, tiny_config, tiny_model  # noqa: F401 (one_thread: an autouse fixture)

from refseg.data.atomic import INCOMPLETE_MARKER, remove_stale_staging
from refseg.data.synthref.vocab import PRESETS
from refseg.engine.config import TrainConfig, write_text_atomic
from refseg.engine.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "stress"))
import kill_make_data  # noqa: E402
import kill_train  # noqa: E402


def test_training_killed_twice_resumes_exactly(synthref_tiny, tmp_path):
    figures = kill_train.run(kills=2, steps=16, save_every=2, seed=1, work=tmp_path, data=synthref_tiny, fork=True,
                             verbose=False)
    assert figures["kills"] == 2 and figures["final_step"] == 16
    assert figures["attempts"] == 3


def test_make_data_killed_never_leaves_a_loadable_partial_set(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "micro", (6, 2, 2))  # the forked runs inherit it
    figures = kill_make_data.run(kills=2, seed=2, work=tmp_path, fork=True, rerun_every=2, preset="micro",
                                 verbose=False)
    assert sum(figures["outcomes"].values()) == 2 and figures["reruns"] >= 1


def test_resume_before_the_first_checkpoint_starts_over(synthref_tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(synthref_tiny, run, max_steps=3, val_split="", cache_features="off")
    cfg.save(run / "config.json")  # what a run killed before its first save leaves
    summary = train(tiny_config(synthref_tiny, run, max_steps=3, val_split="", cache_features="off",
                                resume=str(run)), model=tiny_model())
    assert summary["step"] == 3
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 3


def test_config_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    TrainConfig.from_dict(dict(lr=0.5)).save(path)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "{half")
    assert TrainConfig.load(path).optim.lr == 0.5  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # and no temporary file is left


def _staging(parent: Path, name: str, pid: int, host: str) -> Path:
    folder = parent / f".{name}.tmp-{pid}-abc"
    folder.mkdir()
    (folder / INCOMPLETE_MARKER).write_text(json.dumps({"pid": pid, "host": host}))
    return folder


def test_only_dead_runs_staging_folders_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = _staging(tmp_path, "out", dead.pid, socket.gethostname())
    alive = _staging(tmp_path, "out", os.getpid(), socket.gethostname())
    elsewhere = _staging(tmp_path, "out", dead.pid + 1_000_000, "another-host")
    other_target = _staging(tmp_path, "other", dead.pid, socket.gethostname())
    unmarked = tmp_path / ".out.tmp-1-xyz"
    unmarked.mkdir()
    assert remove_stale_staging(tmp_path / "out") == [gone]
    assert not gone.exists() and alive.exists() and elsewhere.exists() and other_target.exists() and unmarked.exists()
