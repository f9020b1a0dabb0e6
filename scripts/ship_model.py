"""Ship a trained run as a named model in refseg/weights/ (heads only + model card).

    python scripts/ship_model.py --run runs/lts-a --name lts-synthref \
        --command "refseg train ..." --eval-data data/natural-small-s0 --split test

Loads the run's best checkpoint (falls back to last), evaluates it on the
given split with the same code as `refseg eval`, and writes
`refseg/weights/<name>.safetensors` (trainable weights only: the frozen
encoders come from their pip packages) and `<name>.json` (model config,
SHA-256, the training command(s), the training record read from the run's
log.csv, and the measured scores). An LRB-WREL run (`refseg train --method
wrel`) ships its best/ (the EMA teacher by default) and records its three
stages. A recipe's run folder (`refseg train --config configs/<model>.yaml
--out RUN`) ships its final stage and records the recipe file in the card
(training.recipe; --recipe names it otherwise).
"""

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path


def training_record(run: Path) -> dict:
    """Steps, wall time of the logged training steps, and median cached-step throughput from log.csv."""
    times, steps, speeds = [], [], []
    with open(run / "log.csv") as f:
        for row in csv.DictReader(f):
            if row["tag"] == "train/loss":
                times.append(float(row["time"]))
                steps.append(int(row["step"]))
            elif row["tag"] == "train/samples_per_s":
                speeds.append(float(row["value"]))
    from refseg.engine.config import flat_view

    config = flat_view(json.loads((run / "config.json").read_text()))  # the card keeps the flat form (the flags')
    record = {
        "steps": max(steps) if steps else 0,
        "batch_size": config.get("batch_size"),
        "logged_span_minutes": round((max(times) - min(times)) / 60, 1) if times else None,
        "cached_step_samples_per_s_median": round(statistics.median(speeds), 1) if speeds else None,
        "config": config,
    }
    if (run / "stage1-teacher" / "log.csv").exists():  # an LRB-WREL run (refseg/methods/wrel/): stages 1 and 2 too
        record["stages"] = {"teacher": training_record(run / "stage1-teacher"),
                            "bank": bank_record(run / "stage2-bank")}
    return record


def bank_record(folder: Path) -> dict:
    """LRB-WREL stage 2 from its log.csv: batches, mean loss before / after fitting, mean IoU after, wall time."""
    values, times = {}, []
    with open(folder / "log.csv") as f:
        for row in csv.DictReader(f):
            values.setdefault(row["tag"], []).append(float(row["value"]))
            times.append(float(row["time"]))
    mean = {tag: round(statistics.mean(v), 4) for tag, v in values.items()}
    return {"batches": len(values.get("bank/loss_last", [])), "mean": mean,
            "logged_span_minutes": round((max(times) - min(times)) / 60, 1) if times else None}


def recipe_run(run: Path):
    """(the run folder to ship, the recipe file): a recipe's run folder (RUN/recipe.json) gives its final
    stage and the recipe it was trained with; any other run folder gives itself and None."""
    from refseg.engine.checkpoint import RECIPE_RUN_FILE as RUN_FILE, final_stage

    final = final_stage(run)
    if final is None:
        return run, None
    return final, json.loads((run / RUN_FILE).read_text())["recipe"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", choices=("best", "last"), default=None,
                    help="which checkpoint of the run to ship (default: best, else last); e.g. last for an "
                         "LRB-WREL run's student, whose best/ holds the EMA teacher")
    ap.add_argument("--name", required=True)
    ap.add_argument("--command", action="append", default=[], help="the command(s) that trained it, in order")
    ap.add_argument("--recipe", default=None, help="the recipe file that trains it (configs/<model>.yaml; default: "
                    "the one a recipe's run folder records)")
    ap.add_argument("--note", default="", help="free text for the card (machine, caveats)")
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--model-kwargs", type=json.loads, default={},
                    help="JSON of inference options merged into the model config before evaluating and shipping "
                         "(e.g. SaG's {\"mask_refine\": 4}); the trained weights must fit the new model exactly")
    ap.add_argument("--metrics-json", help="reuse the figures of `refseg eval --out` "
                    "(any JSON with 'model' or 'checkpoint', 'split', 'metrics') for this run and split "
                    "instead of evaluating again")
    args = ap.parse_args()

    from refseg.data import load_refer
    from refseg.engine.checkpoint import export_heads, load_model, with_options
    from refseg.engine.evaluate_core import evaluate_model
    from refseg.hub import WEIGHTS_DIR

    run, recipe = recipe_run(Path(args.run))
    target = run / args.checkpoint if args.checkpoint else run
    model = with_options(load_model(target).eval(), args.model_kwargs)  # inference options: same weights
    data = load_refer(args.eval_data)
    if args.metrics_json:
        saved = json.loads(Path(args.metrics_json).read_text())
        figures_of = saved.get("model", saved.get("checkpoint", ""))
        same = Path(figures_of).resolve() == target.resolve() or (
            not args.checkpoint and Path(figures_of).resolve() == (run / "best").resolve())
        if not same or saved.get("split") != args.split:
            print(f"error: {args.metrics_json} holds figures of model {figures_of!r} split {saved.get('split')!r}, "
                  f"not of {str(target)!r} split {args.split!r}", file=sys.stderr)
            return 2
        results = saved["metrics"]
    else:
        results = evaluate_model(model, data, split=args.split, batch_size=32, progress=False)
    synth = json.loads((Path(args.eval_data) / "synthref.json").read_text()) if (Path(args.eval_data) / "synthref.json").exists() else {}
    meta = {
        "name": args.name,
        "training": {"commands": args.command, **({"recipe": args.recipe or recipe} if args.recipe or recipe else {}),
                     "note": args.note, "inference_options": args.model_kwargs, "checkpoint": args.checkpoint or ("best" if (run / "best").exists() else "last"),
                     **training_record(run)},
        "evaluation": {"data": {k: synth.get(k) for k in ("domain", "preset", "seed", "version")},
                       "split": args.split, "metrics": results},
    }
    st, js = export_heads(model, WEIGHTS_DIR / args.name, extra_meta=meta, fp16=args.fp16)
    print(json.dumps({k: round(v, 4) for k, v in results.items() if isinstance(v, float)}, indent=1))
    print(f"wrote {st} ({st.stat().st_size / 1e6:.1f} MB) and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
