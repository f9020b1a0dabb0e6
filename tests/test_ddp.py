"""Two-process DistributedDataParallel smoke run on CPU (gloo), through the real CLI and torchrun."""

import argparse
import json
import os
import subprocess
import sys

import pytest
from _engine_fixtures import SIZE, TINY_LTS, make_shapes_refer

from refseg.engine import checkpoint as ckpt


@pytest.mark.slow
def test_two_process_training_writes_a_checkpoint(tmp_path):
    """`refseg train --nproc 2` relaunches itself under torchrun; rank 0 builds the feature
    cache on disk while rank 1 waits, both train, validation metrics are merged."""
    data = make_shapes_refer(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "refseg.cli", "train", "--nproc", "2"]
    cmd += ["--data", str(data), "--size", str(SIZE),
            "--model-kwargs", json.dumps(TINY_LTS), "--batch-size", "4", "--images-per-batch", "2",
            "--max-steps", "3", "--warmup-steps", "1", "--val-every", "2", "--val-max-samples", "6",
            "--cache-features", "on", "--save-frozen", "--no-progress", "--threads", "1", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ckpt.find_checkpoint(run, "last") == run / "last"
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["step"] == 3
    assert state["val"]["n"] == 6  # metrics merged over both ranks
    assert (run / "best").is_dir() and (run / "log.csv").exists()
    model = ckpt.load_model(run)
    assert model.image_size == SIZE


def test_relaunch_passes_the_given_flags_on():
    from refseg.engine.train_cli import _to_argv, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--data", "d", "--nproc", "2", "--model-kwargs", '{"dim": 8}', "--no-progress", "--lr", "0.001",
            "--resume", "none"]
    args = parser.parse_args(argv)
    again = parser.parse_args(_to_argv(args))
    assert {k: v for k, v in vars(again).items() if k != "nproc"} == {k: v for k, v in vars(args).items() if k != "nproc"}
    assert again.nproc == 1
