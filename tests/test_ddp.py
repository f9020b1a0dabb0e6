"""Two-process DistributedDataParallel smoke run on CPU (gloo), through the real CLI and torchrun."""

import json
import os
import subprocess
import sys

import pytest
from _engine_fixtures import SIZE, TINY_LTS

from refseg.engine import checkpoint as ckpt


@pytest.mark.slow
@pytest.mark.parametrize("cache, launcher", [("on", "torchrun"), ("off", "--nproc")])
def test_two_process_training_writes_a_checkpoint(synthref_tiny, tmp_path, cache, launcher):
    run = tmp_path / "run"
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "refseg.cli", "train"]
    else:  # `refseg train --nproc 2` starts torchrun itself
        cmd = [sys.executable, "-m", "refseg.cli", "train", "--nproc", "2"]
    cmd += ["--data", str(synthref_tiny), "--size", str(SIZE),
            "--model-kwargs", json.dumps(TINY_LTS), "--batch-size", "4", "--images-per-batch", "2",
            "--max-steps", "3", "--warmup-steps", "1", "--val-every", "2", "--val-max-samples", "6",
            "--cache-features", cache, "--save-frozen", "--no-progress", "--threads", "1", "--out", str(run)]
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
