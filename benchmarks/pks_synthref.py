"""Train (or load) PKS with full masks and with clicks on a refer-format data set, evaluate both, print one table.

    python benchmarks/pks_synthref.py --data data/synthref --out runs/pks-bench --max-steps 3000
    python benchmarks/pks_synthref.py --data data/synthref --out runs/pks-bench --eval-only   # reuse the runs
    python benchmarks/pks_synthref.py --data data/synthref --out runs/pks-bench --supervision click --split test

For each supervision (default: full and click) the run folder is
OUT/<supervision>; when it already holds a checkpoint (best/ or last/) and
--retrain is not given, training is skipped and that checkpoint is evaluated.
Training goes through `refseg.engine.train.train` (feature cache, AdamW,
warm-up + cosine); --model-kwargs (JSON) go to `MODELS["pks"]`. The table
has one row per supervision (plus one per sentence form with --by-form) and
every metric refseg reports (oIoU, mIoU, P@0.5..0.9, PointM, and
N-acc / T-acc on splits with no-target expressions). A click-trained run
never reads a training mask (the data set's click mode); evaluation reads
the split's masks.
"""

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="refer-format folder (e.g. a SynthRef data set)")
    ap.add_argument("--out", default="runs/pks-bench", help="parent folder of the runs OUT/full, OUT/click")
    ap.add_argument("--supervision", nargs="+", default=["full", "click"], choices=["full", "click"])
    ap.add_argument("--split", default="val", help="split evaluated")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments of MODELS['pks']")
    ap.add_argument("--max-samples", type=int, default=0, help="evaluate the first N sentences only (0: all)")
    ap.add_argument("--eval-only", action="store_true", help="never train; fail when a run has no checkpoint")
    ap.add_argument("--retrain", action="store_true", help="train even when a checkpoint exists")
    ap.add_argument("--by-form", action="store_true", help="also print one row per sentence form")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch

    from refseg.engine.checkpoint import find_checkpoint, load_model
    from refseg.engine.config import TrainConfig
    from refseg.engine.evaluate_core import evaluate_model
    from refseg.engine.train import resolve_device, train
    from refseg.metrics import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results, timings = {}, {}
    for sup in args.supervision:
        run = Path(args.out) / sup
        found = None if args.retrain else (find_checkpoint(run, "best") or find_checkpoint(run, "last"))
        if found is None:
            if args.eval_only:
                print(f"pks_synthref: no checkpoint in {run} (--eval-only)", file=sys.stderr)
                return 2
            cfg = TrainConfig(model="pks", model_kwargs=json.loads(args.model_kwargs), data=args.data,
                              supervision=sup, size=args.size, batch_size=args.batch_size, lr=args.lr,
                              max_steps=args.max_steps, val_every=max(args.max_steps // 4, 1),
                              threads=args.threads, device=args.device, out=str(run))
            t0 = time.perf_counter()
            train(cfg)
            timings[sup] = time.perf_counter() - t0
            found = find_checkpoint(run, "best") or find_checkpoint(run, "last")
        model = load_model(found, device=device)
        result = evaluate_model(model, args.data, split=args.split, device=device,
                                max_samples=args.max_samples or None, progress=False)
        if not args.by_form:
            result.pop("by_form", None)
        results[f"pks/{sup}"] = result
        print(f"pks/{sup}: {found}" + (f", trained in {timings[sup] / 60:.1f} min" if sup in timings else ""),
              file=sys.stderr)
    print(f"PKS on {args.data}, split {args.split}")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, "split": args.split, "results": results,
                                               "train_seconds": timings}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
