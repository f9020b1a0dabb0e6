"""LRB-WREL on SynthRef aerial small: the upper bound, the naive baseline and LRB-WREL, side by side.

Reproduces the table "LRB-WREL on SynthRef aerial" of docs/RESULTS.md (the commands printed there).

    python benchmarks/wrel_aerial.py --accurate-fraction 0.1 --seed 0 1 --steps 3000 --cache-dir cache
    python benchmarks/wrel_aerial.py --accurate-fraction 0.5 --seed 0 1 --steps 3000 --cache-dir cache
    python benchmarks/wrel_aerial.py --accurate-fraction 0.1 --seed 0 1 --upper-seed 0 ...   # one upper-bound run
    python benchmarks/wrel_aerial.py ... --results-json a.json b.json   # reuse figures of finished runs evaluated before

For each seed s (the training seed; the weak split's seed is --weak-seed,
the same split for every training seed) it trains, or resumes, or reuses
when finished, three runs under --runs:

    upper-s<s>         LTS on 100 % accurate expressions (DATA as generated)
    naive-p<p>-s<s>    LTS on the weak split (refseg train --accurate-fraction p): weak refs say only their class name
    wrel-p<p>-s<s>     LRB-WREL on the same weak split (refseg train --method wrel --accurate-fraction p)

then evaluates each run's best/ on the accurate expressions of --split
(test) with refseg.engine.evaluate_core (the code of `refseg eval`), and
for WREL also the network best/ does not hold (the student, or the EMA
teacher with --wrel-final student; shown as an extra row, left out of the
verdicts), and prints oIoU / mIoU / PointM with the ratios to the upper bound, and the
targets: WREL oIoU >= 0.92 x upper at p = 0.1, >= 0.97 x at
p = 0.5, and (with two or more seeds) WREL beats naive by more than the
seed-to-seed spread (max - min over seeds of either). --json writes it all.

DATA (default data/aerial-small-s0) is generated with
`refseg make-data --domain aerial --preset small --seed 0` when missing.
Training runs in this process through the `refseg` command line; each
command is printed so that a run can be repeated or shipped
(scripts/ship_model.py --run RUNS/wrel-p0.1-s0 ...).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TARGET_RATIO = {0.1: 0.92, 0.5: 0.97}  # WREL oIoU / upper-bound oIoU, from the issue
CONDITIONS = ("upper", "naive", "wrel")


def run_name(condition: str, p: float, seed: int) -> str:
    return f"upper-s{seed}" if condition == "upper" else f"{condition}-p{p:g}-s{seed}"


def train_argv(condition: str, args, seed: int, out: Path) -> list:
    """The `refseg train` arguments of one condition (a fresh run)."""
    argv = ["train", "--data", str(args.data), "--out", str(out), "--seed", str(seed), "--max-steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    if args.model_kwargs:
        argv += ["--model-kwargs", args.model_kwargs]
    if condition != "upper":
        argv += ["--accurate-fraction", str(args.accurate_fraction), "--weak-seed", str(args.weak_seed)]
    if condition == "wrel":
        argv += ["--method", "wrel", "--wrel-teacher-steps", str(args.teacher_steps or args.steps)]
        if args.bank_iters:
            argv += ["--wrel-bank-iters", str(args.bank_iters)]
    return argv + list(args.train_arg)


def ensure_run(condition: str, args, seed: int) -> Path:
    """Train the run, resume it, or leave it when finished; returns its folder."""
    from refseg.cli import main as cli
    from refseg.engine.checkpoint import find_checkpoint
    from refseg.methods.wrel.train import stage_done

    out = Path(args.runs) / run_name(condition, args.accurate_fraction, seed)
    if (out / "config.json").exists() and stage_done(out):
        print(f"[{condition} s{seed}] finished run reused: {out}", flush=True)
        return out
    # a WREL run resumes from whichever stage it reached; a plain one needs its last/
    started = (out / "config.json").exists() and (condition == "wrel" or find_checkpoint(out, "last") is not None)
    argv = ["train", "--resume", str(out)] if started else train_argv(condition, args, seed, out)
    print(f"[{condition} s{seed}] refseg {' '.join(_quote(a) for a in argv)}", flush=True)
    if args.dry_run:
        return out
    start = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"training {out} failed")
    print(f"[{condition} s{seed}] trained in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return out


def other_network(run: Path) -> tuple:
    """(name, model) of the WREL network best/ does not hold: the student (last/) or the EMA teacher (last/ema)."""
    import refseg
    from refseg.engine.checkpoint import load_extra, load_weights

    from refseg.engine.config import flat_view

    final = flat_view(json.loads((run / "config.json").read_text())).get("wrel_final", "teacher")
    model = refseg.load(run / "last")  # the student
    if final == "teacher":
        return "student", model
    load_weights(model, load_extra(run / "last", "ema"), source=f"{run}/last/ema.safetensors")
    return "teacher", model


def earlier_results(paths, data_dir: Path, split: str) -> dict:
    """{(run name, network, seed, folder): metrics} from earlier --json files of this benchmark on the same
    data and split (a finished run does not change, so its figures need not be computed twice)."""
    found = {}
    for path in paths:
        blob = json.loads(Path(path).read_text())
        if blob.get("data") != str(data_dir.resolve()) or blob.get("split") != split:
            print(f"{path}: another data set or split, not used", flush=True)
            continue
        for row, r in blob["runs"].items():
            name = row.split(" (")[0]
            folder = blob["folders"].get(name)
            if folder is not None:
                found[(name, r["network"], r["seed"], folder)] = r["metrics"]
    return found


def table(rows: dict) -> str:
    """Aligned text: one row per run; oIoU, mIoU, PointM in %, the ratios to the upper bound as fractions."""
    cols = ["oIoU", "mIoU", "PointM", "oIoU/upper", "mIoU/upper"]
    cells = [["run", *cols]]
    for name, r in rows.items():
        cells.append([name] + [f"{100 * r[c]:.2f}" for c in cols[:3]]
                     + ["-" if r[c] != r[c] else f"{r[c]:.4f}" for c in cols[3:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols) + 1)]
    return "\n".join("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
                     for row in cells)


def _quote(a: str) -> str:
    return f"'{a}'" if any(c in a for c in " {}\"[],") or a == "" else a


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accurate-fraction", type=float, required=True, help="p, the share of accurate train refs")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="training seed(s); two for the spread")
    ap.add_argument("--upper-seed", type=int, nargs="+", default=None,
                    help="training seed(s) of the upper bound (default: --seed); ratios use their mean")
    ap.add_argument("--weak-seed", type=int, default=0, help="seed of the weak split (refseg weaken)")
    ap.add_argument("--data", default="data/aerial-small-s0", help="SynthRef aerial small folder (made if missing)")
    ap.add_argument("--runs", default="runs/wrel-aerial", help="folder of the runs (reused when finished)")
    ap.add_argument("--steps", type=int, default=3000, help="optimiser steps of upper, naive and the WREL student")
    ap.add_argument("--teacher-steps", type=int, default=0, help="WREL stage-1 steps (0 = --steps)")
    ap.add_argument("--bank-iters", type=int, default=0, help="WREL stage-2 Adam steps per weak ref (0 = the default)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="shared feature cache folder (recommended)")
    ap.add_argument("--model-kwargs", default=None, help="JSON for refseg train --model-kwargs")
    ap.add_argument("--train-arg", action="append", default=[],
                    help="one more refseg train argument for every fresh run (repeat; e.g. --train-arg=--val-every=500)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="which of upper,naive,wrel to run")
    ap.add_argument("--split", default="test")
    ap.add_argument("--eval-max-samples", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the training commands only")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--results-json", nargs="+", default=[],
                    help="earlier --json files: runs evaluated there (same folder, data and split) are not evaluated again")
    args = ap.parse_args()

    import refseg
    from refseg.cli import main as cli
    from refseg.data import load_refer
    from refseg.engine.evaluate import write_json_atomic
    from refseg.engine.evaluate_core import evaluate_model

    torch.set_num_threads(args.threads)
    conditions = [c for c in args.conditions.split(",") if c]
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        ap.error(f"unknown condition(s) {unknown}; choose from {CONDITIONS}")
    data_dir = Path(args.data)
    if not (data_dir / "synthref.json").exists() and not args.dry_run:
        if cli(["make-data", "--domain", "aerial", "--preset", "small", "--seed", "0", "--out", str(data_dir)]) != 0:
            return 1
    upper_seeds = args.upper_seed if args.upper_seed is not None else args.seed
    seeds_of = {c: (upper_seeds if c == "upper" else args.seed) for c in conditions}
    runs = {(c, s): ensure_run(c, args, s) for c in conditions for s in seeds_of[c]}
    if args.dry_run:
        return 0

    data = load_refer(data_dir)
    earlier = earlier_results(args.results_json, data_dir, args.split)
    results, names = {}, {}  # (label, seed) -> metrics, row name
    for (c, s), run in runs.items():
        name = run_name(c, args.accurate_fraction, s)
        labels = [c] + (["wrel-student", "wrel-teacher"] if c == "wrel" else [])
        found = {lb: earlier[(name, lb, s, str(run))] for lb in labels if (name, lb, s, str(run)) in earlier}
        if c in found and (c != "wrel" or len(found) == 2):  # every network of this run was evaluated already
            for label, m in found.items():
                results[(label, s)] = m
                names[(label, s)] = name + (f" ({label[5:]})" if label != c else "")
                print(f"[{label} s{s}] {m['n']} {args.split} sentences: figures from --results-json", flush=True)
            continue
        networks = [(c, refseg.load(run))]
        if c == "wrel":  # also the network the run does not ship, for the teacher-or-student choice
            other, model = other_network(run)
            networks.append((f"wrel-{other}", model))
        for label, model in networks:
            start = time.perf_counter()
            results[(label, s)] = evaluate_model(model, data, split=args.split, batch_size=32,
                                                 max_samples=args.eval_max_samples, progress=False)
            names[(label, s)] = run_name(c, args.accurate_fraction, s) + (f" ({label[5:]})" if label != c else "")
            print(f"[{label} s{s}] evaluated {results[(label, s)]['n']} {args.split} sentences in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)

    upper_mean = ({k: statistics.mean(results[("upper", s)][k] for s in upper_seeds) for k in ("oIoU", "mIoU")}
                  if "upper" in conditions else None)
    rows = {}
    for (label, s), m in results.items():
        row = {k: m[k] for k in ("oIoU", "mIoU", "PointM")}
        upper = results.get(("upper", s), upper_mean)  # the same seed's upper bound, else the mean of those run
        for k in ("oIoU", "mIoU"):
            row[f"{k}/upper"] = m[k] / upper[k] if upper is not None and upper[k] else float("nan")
        rows[names[(label, s)]] = row
    mean = {c: statistics.mean(results[(c, s)]["oIoU"] for s in seeds_of[c]) for c in conditions}
    spread = {c: max(results[(c, s)]["oIoU"] for s in seeds_of[c]) - min(results[(c, s)]["oIoU"] for s in seeds_of[c])
              for c in conditions}
    print(f"\n{data_dir.name}, {args.split}, p = {args.accurate_fraction:g}, seeds {args.seed}")
    print(table(rows))
    print("\nmean oIoU over seeds: " + ", ".join(f"{c} {mean[c]:.4f} (spread {spread[c]:.4f})" for c in conditions))

    verdicts = {}
    target = TARGET_RATIO.get(args.accurate_fraction)
    if {"upper", "wrel"} <= set(conditions) and target is not None:
        ratio = mean["wrel"] / mean["upper"] if mean["upper"] else float("nan")
        verdicts["ratio"] = {"value": ratio, "target": target, "pass": ratio >= target}
        print(f"  WREL / upper oIoU {ratio:.4f}  target >= {target:.2f}  {'PASS' if ratio >= target else 'FAIL'}")
    if {"naive", "wrel"} <= set(conditions) and len(args.seed) >= 2:
        margin, noise = mean["wrel"] - mean["naive"], max(spread["wrel"], spread["naive"])
        verdicts["beats_naive"] = {"margin": margin, "spread": noise, "pass": margin > noise}
        print(f"  WREL - naive oIoU {margin:+.4f}  seed spread {noise:.4f}  {'PASS' if margin > noise else 'FAIL'}")
    if args.json:
        write_json_atomic({
            "data": str(data_dir.resolve()), "split": args.split, "accurate_fraction": args.accurate_fraction,
            "seeds": args.seed, "upper_seeds": upper_seeds if "upper" in conditions else [],
            "weak_seed": args.weak_seed, "steps": args.steps,
            "runs": {names[(label, s)]: {"network": label, "seed": s, "metrics": m} for (label, s), m in results.items()},
            "folders": {run_name(c, args.accurate_fraction, s): str(run) for (c, s), run in runs.items()},
            "mean_oIoU": mean, "spread_oIoU": spread, "verdicts": verdicts,
        }, Path(args.json))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
