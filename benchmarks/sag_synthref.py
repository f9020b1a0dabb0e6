"""SaG trained from text alone on a SynthRef (or any refer) folder, with and without hard negatives.

    python benchmarks/sag_synthref.py --data data/synthref-small --steps 3000 --out runs/sag-bench
    python benchmarks/sag_synthref.py --data DIR --out runs/sag-bench --reuse     # evaluate existing runs only
    python benchmarks/sag_synthref.py                                             # SynthRef tiny, a short smoke run

For each variant (``hard``: hard_negatives=1, ``no-hard``: hard_negatives=0;
``--variants`` picks), trains ``refseg train --model sag --supervision text``
into OUT/<variant> (or, with ``--reuse``, loads OUT/<variant>/last when it is
there), then evaluates the ``last`` checkpoint on ``--eval-split`` and prints
one metric table (oIoU, mIoU, P@X, PointM; rows per variant and per sentence
form). The ``last`` checkpoint, not ``best``: best is picked by val mIoU,
which reads val masks, and this benchmark measures what text alone gives.
Training uses no validation unless ``--val-every`` is set.
The same seed, data order and step count serve every variant, so the rows
differ by the hard-negative term alone. Each run's train-time accuracies
(acc_image, acc_hard: share of sentences whose positive beats every other
image / every same-image hard negative) are printed from its log.csv too.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

VARIANTS = {"hard": 1.0, "no-hard": 0.0}


def _generate_tiny(folder: Path) -> Path:
    from refseg.cli import main as cli

    out = folder / "synthref-tiny"
    if cli(["make-data", "--preset", "tiny", "--seed", "0", "--out", str(out)]) != 0:
        raise SystemExit("could not generate SynthRef tiny")
    return out


def _last_logged(run: Path, tags) -> dict:
    """The mean of the last 5 logged values of each tag in RUN/log.csv."""
    values = {t: [] for t in tags}
    with open(run / "log.csv") as f:
        for r in csv.DictReader(f):
            if r["tag"] in values:
                values[r["tag"]].append(float(r["value"]))
    return {t: sum(v[-5:]) / len(v[-5:]) for t, v in values.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="refer folder (default: generate SynthRef tiny in a temp folder)")
    ap.add_argument("--out", default=None, help="folder of the runs (default: a temp folder)")
    ap.add_argument("--variants", default="hard,no-hard", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--reuse", action="store_true", help="load OUT/<variant>/last instead of training when present")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images-per-batch", type=int, default=8, help="sentences per image = batch / this")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--val-every", type=int, default=0, help="validate during training (reads val masks) every N steps")
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--model-kwargs", default="{}", help="JSON: extra build_sag arguments (num_slots, dim ...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=None, help="reuse frozen-encoder features across variants/runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from refseg.engine.checkpoint import find_checkpoint, load_model
    from refseg.engine.config import TrainConfig
    from refseg.engine.evaluate_core import evaluate_model
    from refseg.engine.train import train
    from refseg.metrics import format_table

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="sag-bench-"))
    data = Path(args.data) if args.data else _generate_tiny(tmp)
    out = Path(args.out) if args.out else tmp / "runs"
    cache_dir = args.cache_dir or str(out / "cache")
    extra = json.loads(args.model_kwargs)
    results, train_stats = {}, {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        run = out / name
        if not (args.reuse and find_checkpoint(run, "last") is not None):
            cfg = TrainConfig(model="sag", model_kwargs={**extra, "hard_negatives": VARIANTS[name]}, data=str(data),
                              supervision="text", batch_size=args.batch_size, images_per_batch=args.images_per_batch,
                              max_steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
                              val_split="val" if args.val_every else "", val_every=args.val_every,
                              threads=args.threads, device=args.device, cache_dir=cache_dir, out=str(run),
                              seed=args.seed, log_every=10, progress=False)
            print(f"== training {name}: {args.steps} steps -> {run}", file=sys.stderr)
            train(cfg)
        model = load_model(find_checkpoint(run, "last"), device="cuda" if args.device == "cuda" else "cpu")
        results[name] = evaluate_model(model, str(data), split=args.eval_split, batch_size=64, progress=False)
        train_stats[name] = _last_logged(run, ["train/infonce", "train/hard", "train/recon",
                                                "train/acc_image", "train/acc_hard"])

    print(f"\nSaG, text-only training, {args.steps} steps; {args.eval_split} split of {data}\n")
    print(format_table(results))
    print("\nend of training (mean of the last 5 logged values):")
    for name, stats in train_stats.items():
        print(f"  {name:8s} " + "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
