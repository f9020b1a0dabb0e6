"""The LTS targets on SynthRef natural `small` test, with the figures that decide them.

    python benchmarks/lts_synthref.py                          # the shipped lts-synthref
    python benchmarks/lts_synthref.py --model runs/lts-a       # any run / checkpoint
    python benchmarks/lts_synthref.py --data DIR --split test  # another refer-format split

Generates SynthRef natural small (seed 0) into --data if it is missing,
evaluates the model on the split with `refseg.engine.evaluate_core`
(the same code as `refseg eval`), and prints the metric table, the
per-form breakdown, the targets (mIoU >= 0.85, oIoU >= 0.85, PointM >= 0.95),
and the training record stored with the model (command, wall time, steps,
cached-step throughput) when the model is a shipped one.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

TARGETS = {"mIoU": 0.85, "oIoU": 0.85, "PointM": 0.95}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lts-synthref", help="shipped model name or run/checkpoint path")
    ap.add_argument("--data", default="data/natural-small-s0", help="SynthRef natural small folder (made if missing)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import refseg
    from refseg.cli import main as cli
    from refseg.data import load_refer
    from refseg.engine.evaluate import table_rows
    from refseg.engine.evaluate_core import evaluate_model
    from refseg.metrics import format_table

    torch.set_num_threads(args.threads)
    data_dir = Path(args.data)
    if not (data_dir / "synthref.json").exists():
        if cli(["make-data", "--domain", "natural", "--preset", "small", "--seed", "0", "--out", str(data_dir)]) != 0:
            return 1
    model = refseg.load(args.model)
    data = load_refer(data_dir)
    start = time.perf_counter()
    results = evaluate_model(model, data, split=args.split, batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    print(format_table(table_rows(results, f"{Path(args.model).name} / {args.split}")))
    print(f"\n{results['n']} sentences evaluated in {seconds:.1f} s ({args.threads} threads)\n")
    ok = True
    for key, target in TARGETS.items():
        passed = results[key] >= target
        ok &= passed
        print(f"  {key:<7} {results[key]:.4f}  target >= {target:.2f}  {'PASS' if passed else 'FAIL'}")
    if args.model in refseg.available_models():
        card = refseg.hub.model_card(args.model)
        train = card.get("training", {})
        if train:
            print("\ntraining record (from the model card):")
            for k in ("commands", "note", "steps", "batch_size", "logged_span_minutes", "cached_step_samples_per_s_median"):
                if k in train:
                    print(f"  {k}: {train[k]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "split": args.split, "metrics": results,
                                               "targets": TARGETS, "seconds": seconds}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
