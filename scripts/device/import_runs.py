"""Unpack a GPU session's tars (scripts/device/gpu_jobs.py) and rebuild fp32 checkpoints: DST/runs/<name>/{best,last}.

    python scripts/device/import_runs.py FILES_AT DST
"""
import json, sys, tarfile
from pathlib import Path
import torch
from safetensors.torch import load_file
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from refseg.engine import checkpoint as ckpt

src = Path(sys.argv[1]); dst = Path(sys.argv[2]); dst.mkdir(parents=True, exist_ok=True)
for t in sorted(src.glob("runs*.tar.gz")) + sorted(src.glob("logs.tar.gz")):
    tarfile.open(t).extractall(dst / "raw")
for run in sorted((dst / "raw").iterdir()):
    if run.name == "logs":
        continue
    out = dst / "runs" / run.name
    out.mkdir(parents=True, exist_ok=True)
    for f in ["config.json", "log.csv", "test.json", "test-student.json"]:
        if (run / f).exists():
            (out / f).write_bytes((run / f).read_bytes())
    for sub in ["best", "last"]:
        w = run / sub / "model.fp16.safetensors"
        if not w.exists() or (out / sub).exists():
            continue
        meta = json.loads((run / sub / "model.json").read_text())
        model = ckpt.build_model(meta["config"])
        ckpt.load_weights(model, load_file(str(w)), None, source=str(w))
        state = json.loads((run / sub / "state.json").read_text())
        state.pop("rng", None); state.pop("optimizer", None)
        state["note"] = "trained on an H200 (weights carried back in fp16, rebuilt in fp32)"
        ckpt.save_checkpoint(out / sub, model, None, state, with_rng=False)
        print("rebuilt", out / sub)
