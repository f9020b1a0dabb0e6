"""Evaluate a model with inference options merged into its config (same weights).

Reproduces the table "PKS from clicks: the fine-tuning rounds" of docs/RESULTS.md.

    python benchmarks/eval_with_options.py --model sag-synthref --options '{"mask_refine": 2}' --split val

For options that add no parameter (SaG's ``mask_refine``, ``refine_sigma``,
``refine_iters``; PKS's ``peak_source`` with a region head), so that they can be
chosen on val before shipping (``scripts/ship_model.py --model-kwargs``).
Prints oIoU, mIoU, P@0.5, P@0.9, PointM (%) overall and mIoU / PointM per
sentence form.
"""

import argparse
import json
import sys
import time


def parse_model_args(description: str, help_model: str = "shipped model name, run or checkpoint folder"):
    """The arguments this script shares with the other evaluation benchmarks -> (args, model loaded with them)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help=help_model)
    ap.add_argument("--options", type=json.loads, default={}, help="JSON merged into the model config")
    ap.add_argument("--data", default="data/natural-small-s0")
    ap.add_argument("--split", default="val")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from refseg.hub import load

    torch.set_num_threads(args.threads)
    return args, load(args.model, options=args.options)


def main() -> int:
    args, model = parse_model_args(__doc__.splitlines()[0])

    from refseg.engine.evaluate_core import evaluate_model

    start = time.perf_counter()
    r = evaluate_model(model, args.data, args.split, progress=False)
    overall = {k: round(100 * r[k], 2) for k in ("oIoU", "mIoU", "P@0.5", "P@0.9", "PointM")}
    forms = {f: {"mIoU": round(100 * v["mIoU"], 1), "PointM": round(100 * v["PointM"], 1)}
             for f, v in r.get("by_form", {}).items()}
    print(json.dumps({"model": args.model, "options": args.options, "split": args.split, "n": r["n"],
                      **overall, "by_form": forms, "seconds": round(time.perf_counter() - start)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
