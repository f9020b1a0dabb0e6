"""`refseg bench`: every method under every supervision budget, in one command.

    refseg bench --preset small --out reports/bench-small     # the full benchmark (hours on a CPU)
    refseg bench --preset tiny --out reports/bench-tiny       # the same pipeline in a few minutes (CI)

What it does:
1. Generates SynthRef natural and aerial (`refseg make-data`) and the weak
   aerial splits (`refseg weaken`) under --data-root, reusing complete ones.
2. For each row of `ENTRIES` (a method under one supervision on one data
   set): loads its shipped model when one exists for this preset, else
   reuses a finished run in --work, else trains it with its recipe
   (`refseg train` + `Entry.args` + the preset's schedule). A row whose
   training command does not exist yet (LRB-WREL's `--method wrel`) is
   reported as "not available" with the reason, never a crash.
3. Evaluates each model on the test split of its domain (the code of
   `refseg eval`), measures its objective on that split, and counts what its
   training labels cost (refseg.annotation). `--preset tiny` also evaluates
   each method's untrained instance (the same seed, no step taken).
4. Writes the report folder (refseg.bench.report): report.md (the table,
   the cost assumptions with their sources, targets, commands), results.json,
   accuracy_vs_cost.png and overlays/<row>.png (correct and failed cases).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from refseg import argtypes


@dataclass(frozen=True)
class Entry:
    """One row of the benchmark: a method, its supervision, its data, and how to get the model."""

    name: str  # row name; also the run folder and the overlay file name
    method: str  # the method as the report names it
    domain: str  # natural | aerial (the test split evaluated)
    budget: str  # the training labels, in words
    model: str  # refseg train --model
    supervision: str  # refseg train --supervision; also picks the annotation cost model
    data: str  # data set given to refseg train --data: natural | aerial | aerial-p<fraction> (refseg weaken)
    shipped: str  # name of the shipped model to load (refseg/weights/<shipped>.json) when it exists
    args: Tuple[str, ...] = ()  # further refseg train arguments, every preset ({seed}: the bench seed)
    labels: str = ""  # data set whose train split holds the labels paid for ("" = data)
    targets: Tuple[Tuple[str, float, str], ...] = ()  # (metric, threshold, "" or a row it is relative to)


def _wrel(p: str) -> Tuple[str, ...]:
    """LRB-WREL makes the weak split of the aerial data itself (as `refseg weaken --seed {seed}` does)."""
    return ("--method", "wrel", "--accurate-fraction", p, "--weak-seed", "{seed}")


NO_VAL = ("--val-split", "")  # weak budgets: never read validation masks to pick a checkpoint
ENTRIES: Tuple[Entry, ...] = (
    Entry("lts", "LTS", "natural", "full masks", "lts", "full", "natural", "lts-synthref",
          targets=(("mIoU", 0.85, ""), ("oIoU", 0.85, ""), ("PointM", 0.95, ""))),
    Entry("pks", "PKS", "natural", "full masks", "pks", "full", "natural", "pks-synthref",
          targets=(("mIoU", 0.85, ""),)),
    Entry("pks-click", "PKS", "natural", "clicks (centre + box corners)", "pks", "click", "natural",
          "pks-click-synthref", NO_VAL, targets=(("mIoU", 0.90, "pks"), ("PointM", 0.95, ""))),
    Entry("sag", "SaG", "natural", "text only", "sag", "text", "natural", "sag-synthref", NO_VAL,
          targets=(("PointM", 0.75, ""), ("mIoU", 0.55, "lts"))),
    Entry("lts-aerial", "LTS", "aerial", "masks, all expressions", "lts", "full", "aerial", "lts-aerial"),
    # LRB-WREL's comparison (issue 6): the upper bound, the naive baselines and LRB-WREL share one recipe
    # (AERIAL_RECIPE / WREL_RECIPE in the small preset), so the ratios compare like with like
    Entry("lts-aerial-upper", "LTS (upper bound)", "aerial", "masks, all expressions", "lts", "full", "aerial",
          "lts-aerial-upper"),
    Entry("lts-aerial-naive-p0.1", "LTS (naive)", "aerial", "masks, 10% expressions", "lts", "full",
          "aerial-p0.1", "lts-aerial-naive-p0.1"),
    Entry("wrel-aerial-p0.1", "LRB-WREL", "aerial", "masks, 10% expressions", "lts", "full", "aerial",
          "wrel-aerial-p0.1", _wrel("0.1"), labels="aerial-p0.1", targets=(("oIoU", 0.92, "lts-aerial-upper"),)),
    Entry("lts-aerial-naive-p0.5", "LTS (naive)", "aerial", "masks, 50% expressions", "lts", "full",
          "aerial-p0.5", "lts-aerial-naive-p0.5"),
    Entry("wrel-aerial-p0.5", "LRB-WREL", "aerial", "masks, 50% expressions", "lts", "full", "aerial",
          "wrel-aerial-p0.5", _wrel("0.5"), labels="aerial-p0.5", targets=(("oIoU", 0.97, "lts-aerial-upper"),)),
)
WREL_ROWS = ("lts-aerial-upper", "lts-aerial-naive-p0.1", "wrel-aerial-p0.1", "lts-aerial-naive-p0.5",
             "wrel-aerial-p0.5")

# small heads for the tiny preset (the real frozen encoders)
TINY_HEADS = {
    "lts": {"dim": 64, "depth": 1, "heads": 2, "decoder_widths": [24, 12, 8]},
    "pks": {"dim": 64, "depth": 1, "heads": 2, "fpn_width": 16, "fine_width": 8},
    "sag": {"dim": 64, "num_slots": 8, "iters": 2, "heads": 2, "decoder_hidden": 64},
}


# tiny LRB-WREL: the reference bank costs wrel_bank_iters passes over every weak ref; with the default 10
# the tiny WREL row trained in 56 s, a plain row in 6 s
TINY_WREL = ("--wrel-bank-iters", "2")
# small: the recipe of issue 6's measurements, every row of LRB-WREL's comparison (README, "Flip and
# transpose augmentation"): 1500 steps of 32 sentences from 8 images, all eight views of each aerial
# image (--flip hvt), no validation; LRB-WREL's teacher 750 steps, reference bank 4 passes at lr 0.1,
# accurate sentences listed 3 times in stage 3
AERIAL_RECIPE = ("--max-steps", "1500", "--batch-size", "32", "--images-per-batch", "8", "--warmup-steps", "50",
                 "--flip", "hvt", "--val-split", "", "--val-every", "0")
WREL_RECIPE = AERIAL_RECIPE + ("--wrel-teacher-steps", "750", "--wrel-bank-iters", "4", "--wrel-bank-lr", "0.1",
                               "--wrel-accurate-repeat", "3")


@dataclass(frozen=True)
class Preset:
    data: str  # make-data --preset
    schedule: Tuple[str, ...]  # refseg train arguments every row gets (steps, batch, learning rate ...)
    heads: Dict[str, dict] = field(default_factory=dict)  # model -> --model-kwargs ({} = the defaults)
    recipes: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # row -> arguments overriding the schedule
    untrained: bool = False  # also evaluate each method's untrained instance
    check_targets: bool = False  # judge the rows' targets
    examples: int = 4  # correct and failed cases per overlay grid row


PRESETS = {
    "tiny": Preset("tiny", ("--size", "160", "--max-steps", "40", "--batch-size", "16", "--images-per-batch", "4",
                            "--lr", "1e-3", "--warmup-steps", "4", "--val-split", "", "--log-every", "5"),
                   heads=TINY_HEADS, untrained=True, examples=3,
                   recipes={"wrel-aerial-p0.1": TINY_WREL, "wrel-aerial-p0.5": TINY_WREL}),
    "small": Preset("small", ("--max-steps", "5500", "--batch-size", "32", "--images-per-batch", "4", "--lr", "3e-4",
                              "--warmup-steps", "200", "--val-every", "1000", "--val-max-samples", "600",
                              "--log-every", "50"),
                    recipes={"pks": ("--max-steps", "4500", "--val-every", "1500"),  # the shipped PKS runs' schedule
                             "pks-click": ("--max-steps", "4500"),
                             **{row: WREL_RECIPE if row.startswith("wrel") else AERIAL_RECIPE for row in WREL_ROWS}},
                    check_targets=True),
}


def train_args(entry: Entry, preset: Preset, seed: int) -> List[str]:
    """The `refseg train` arguments of a row (without --data / --out / machine flags).

    Every part is "--flag value" pairs; a later part's flag replaces an
    earlier one's value in place: model and supervision, the preset's
    schedule, the row's recipe in that preset, the seed, the small head, the
    row's own arguments.
    """
    parts = [("--model", entry.model, "--supervision", entry.supervision), preset.schedule,
             preset.recipes.get(entry.name, ()), ("--seed", str(seed))]
    if entry.model in preset.heads:
        parts.append(("--model-kwargs", json.dumps(preset.heads[entry.model])))
    parts.append(tuple(a.replace("{seed}", str(seed)) for a in entry.args))
    flags: Dict[str, str] = {}
    for part in parts:
        assert len(part) % 2 == 0, part
        flags.update(zip(part[::2], part[1::2]))
    return [a for pair in flags.items() for a in pair]


def missing_train_support(entry: Entry, args: List[str]) -> Optional[str]:
    """None when `refseg train` accepts a row's arguments, else why not (they are parsed, never run)."""
    from refseg.engine import train as train_module

    parser = argparse.ArgumentParser(prog="refseg train")
    train_module.add_arguments(parser)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(args + ["--data", "x"])
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        detail = lines[-1].replace("refseg train: error: ", "") if lines else "parse error"
        return f"{entry.method} training is not in this refseg: `refseg train` refuses the row's arguments " \
               f"({detail})"
    return None


# ---- data -----------------------------------------------------------------------------


def data_folder(root: Path, key: str, preset: str, seed: int) -> Path:
    base, _, weak = key.partition("-")
    name = f"{base}-{preset}-s{seed}" + (f"-{weak}" if weak else "")
    return root / name


def prepare_data(root: Path, key: str, preset: str, seed: int) -> Path:
    """The data set folder of a key, generated (or weakened) when it is not complete yet."""
    from refseg.cli import main as cli

    out = data_folder(root, key, preset, seed)
    base, _, weak = key.partition("-")
    if not weak:
        if not (out / "synthref.json").exists():
            if cli(["make-data", "--domain", base, "--preset", preset, "--seed", str(seed), "--out", str(out)]):
                raise RuntimeError(f"refseg make-data failed for {out}")
        return out
    if not (out / "weak.json").exists():
        source = prepare_data(root, base, preset, seed)
        if not weak.startswith("p"):
            raise ValueError(f"data key {key!r}: expected <domain>-p<fraction>")
        if cli(["weaken", "--data", str(source), "--accurate-fraction", weak[1:], "--seed", str(seed),
                "--out", str(out)]):
            raise RuntimeError(f"refseg weaken failed for {out}")
    return out


# ---- one row --------------------------------------------------------------------------


def shipped_for(entry: Entry, preset: str) -> Optional[str]:
    """The shipped model to use for a row: it exists and was evaluated on this preset."""
    from refseg import hub

    if entry.shipped not in hub.available_models():
        return None
    data = hub.model_card(entry.shipped).get("evaluation", {}).get("data", {})
    ok = data.get("preset") == preset and data.get("domain", entry.domain) == entry.domain
    return entry.shipped if ok else None


def test_features(model, data, supervision: str, device, cache_dir: Path):
    """(RefSegDataset of the test split under `supervision`, its feature cache or None).

    The cache (engine/cache.py, keyed by data, encoders and supervision) is
    built once and shared by every evaluation of models with the same frozen
    encoders: a method's trained and untrained instances, its loss pass.
    """
    from refseg.data.dataset import RefSegDataset
    from refseg.engine import cache as feature_cache

    ds = RefSegDataset(data, "test", int(getattr(model, "image_size", 320)), supervision)
    if not feature_cache.encoders_frozen(model):
        return ds, None
    return ds, feature_cache.get_cache(model, ds, device, str(cache_dir), progress=False)


def heldout_objective(model, ds, cache, cfg, device) -> float:
    """The mean training objective of `model` over a split (the row's own loss and supervision).

    ds: RefSegDataset of the split under cfg.data.supervision; cache: its
    FeatureCache or None. Batches are drawn as in training (cfg.optim.batch_size
    sentences from about cfg.optim.images_per_batch images; seed 0, every sentence
    once), so a trained and an untrained instance see the same batches.
    """
    import torch

    from refseg.data.dataset import collate
    from refseg.engine.sampler import GroupBatchSampler
    from refseg.engine.train import StepModule, loss_function, to_step_batch

    sampler = GroupBatchSampler([s.image_id for s in ds.samples], cfg.optim.batch_size, cfg.optim.images_per_batch, seed=0,
                                drop_last=False)
    loss_fn, step = loss_function(cfg), StepModule(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in sampler.batches(0):
            if cache is not None:
                batch = cache.batch(rows, device)
            else:
                batch = to_step_batch(collate([ds[i] for i in rows]), device)
            total += float(loss_fn(step(batch), batch)["loss"]) * len(rows)
            count += len(rows)
    model.train(was_training)
    return total / max(count, 1)


def evaluate_row(model, data, cfg, ctx: "Context", vis_dir: Optional[Path]) -> Dict[str, Any]:
    """Metrics, the held-out objective and the overlay examples of a model on the test split."""
    from refseg.engine.evaluate_core import evaluate_model

    start = time.perf_counter()
    ds, cache = test_features(model, data, cfg.data.supervision if cfg is not None else "text", ctx.device,
                              ctx.work / "cache")
    records: List[Dict[str, Any]] = []
    metrics = evaluate_model(model, ds, device=ctx.device, progress=False, cache=cache, per_sample=records)
    out = {"metrics": metrics, "heldout_loss": heldout_objective(model, ds, cache, cfg, ctx.device) if cfg else None}
    if vis_dir is not None:
        out["examples"] = render_examples(model, data, records, ctx.preset.examples, ctx.seed, vis_dir, ctx.device)
    out["eval_seconds"] = time.perf_counter() - start
    return out


def render_examples(model, data, records, k: int, seed: int, folder: Path, device) -> Dict[str, list]:
    """Overlays of k correct (IoU >= 0.5) and k failed test sentences, drawn at random with `seed`.

    Returns {"correct": [(path, iou), ...], "failed": [...]}; the PNGs are
    written by evaluate_model's save_vis (prediction red, truth blue).
    """
    import numpy as np

    from refseg.data.dataset import RefSegDataset
    from refseg.engine.evaluate_core import evaluate_model

    rng = np.random.default_rng(seed)
    groups = {"correct": [r for r in records if r["iou"] >= 0.5], "failed": [r for r in records if r["iou"] < 0.5]}
    chosen = {name: [g[i] for i in sorted(rng.permutation(len(g))[:k])] for name, g in groups.items()}
    wanted = {r["sent_id"] for g in chosen.values() for r in g}
    ds = RefSegDataset(data, "test", int(getattr(model, "image_size", 320)), "eval")
    ds.samples = [s for s in ds.samples if s.sent_id in wanted]
    if ds.samples:
        evaluate_model(model, ds, device=device, progress=False, save_vis=folder)
    return {name: [(str(folder / f"{r['sent_id']}.png"), r["iou"]) for r in g] for name, g in chosen.items()}


def train_config(targs: List[str], train_data: Path):
    """The TrainConfig `refseg train` builds from a row's arguments (flags it does not know are left out)."""
    from refseg.engine.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_known_args(targs + ["--data", str(train_data)])[0])


def shipped_model(name: str, device):
    """(model, info) of a shipped model; info as `trained_model`'s, read from its card."""
    import refseg
    from refseg.engine.config import TrainConfig

    training = refseg.hub.model_card(name).get("training", {})
    try:
        cfg = TrainConfig.from_dict(training["config"])
    except (KeyError, ValueError):
        cfg = None
    span = training.get("logged_span_minutes")
    return refseg.load(name, device=device), {
        "source": f"shipped model {name}", "train_seconds": None if span is None else 60.0 * span,
        "train_time_source": "model card (logged training span)", "config": cfg,
        "train_command": "; ".join(training.get("commands", [])) or "(not recorded in the card)"}


def trained_model(entry: Entry, ctx: "Context", train_data: Path, targs: List[str], like=None):
    """(model, info) of a row's run in WORK: reused when a bench training finished it, else trained (or resumed).

    info: {"source", "train_seconds", "train_time_source", "train_command",
    "config"}. like: the row's untrained instance, copied instead of
    rebuilding the encoders when the run is loaded.
    """
    from refseg.cli import main as cli
    from refseg.engine.checkpoint import find_checkpoint, load_model

    run = ctx.work / "runs" / f"{ctx.preset.data}-s{ctx.seed}" / entry.name
    command = ["refseg", "train", "--data", str(train_data), "--out", str(run), *targs]
    machine = ["--threads", str(ctx.threads), "--device", str(ctx.device), "--no-progress",
               "--cache-dir", str(ctx.work / "cache")]
    timing = run / "bench_train.json"  # written when a training this bench started has finished
    if timing.exists() and find_checkpoint(run, "last") is not None and not ctx.retrain:
        source = f"run reused from {run}"
    else:
        resume = find_checkpoint(run, "last") is not None and not ctx.retrain  # an interrupted training goes on
        argv = ["train", "--resume", str(run), *machine] if resume else \
            ["train", "--data", str(train_data), "--out", str(run), *targs, *machine,
             *(["--overwrite"] if run.exists() else [])]  # a retrain, or a run stopped before its first checkpoint
        start = time.perf_counter()
        if cli(argv) != 0:
            raise RuntimeError(f"training failed: refseg {shlex.join(argv)}")
        seconds = time.perf_counter() - start
        timing.write_text(json.dumps({"seconds": seconds, "resumed": resume, "command": shlex.join(command)}))
        source = "resumed and finished by this bench" if resume else "trained by this bench"
    recorded = json.loads(timing.read_text())
    return load_model(run, device=ctx.device, like=like), {
        "source": source, "train_seconds": recorded["seconds"], "train_command": shlex.join(command),
        "config": train_config(targs, train_data),
        "train_time_source": "measured (bench)" + (", since the resume" if recorded.get("resumed") else "")}


def run_entry(entry: Entry, ctx: "Context") -> List[Dict[str, Any]]:
    """The row of a trained (or shipped) model, evaluated; and its untrained instance's row when asked."""
    from refseg.annotation import annotation_cost
    from refseg.data import load_refer
    from refseg.engine.train import build_model, seed_everything

    targs = train_args(entry, ctx.preset, ctx.seed)
    train_data = prepare_data(ctx.data_root, entry.data, ctx.preset.data, ctx.seed)
    labels = prepare_data(ctx.data_root, entry.labels or entry.data, ctx.preset.data, ctx.seed)
    test_data = ctx.data(entry.domain)
    shipped = None if ctx.no_shipped else shipped_for(entry, ctx.preset.data)
    if shipped:
        model, info = shipped_model(shipped, ctx.device)
        cfg = info.pop("config")
        fresh = None
        trained_on = Path(cfg.data.path) if cfg is not None else train_data
        if trained_on.name != train_data.name:  # e.g. lts-synthref: trained on SynthRef natural `full`
            if cfg.data.accurate_fraction is not None:  # weakened by refseg train itself
                info["note"] = (f"trained on {trained_on.name} weakened to {cfg.data.accurate_fraction:g} accurate "
                                f"expressions (--accurate-fraction, weak seed {cfg.data.weak_seed}): the annotation cost "
                                f"is that of {train_data.name}'s training split")
            elif (trained_on / "instances.json").exists():
                labels = trained_on
                info["note"] = f"trained on {trained_on.name}: the annotation cost is that of its training split"
            else:
                info["note"] = (f"trained on {trained_on.name}, not found here: the annotation cost is that of "
                                f"{train_data.name}'s training split")
    else:
        cfg = train_config(targs, train_data)
        fresh = None
        if ctx.untrained:
            seed_everything(cfg.run.seed)  # the state the training starts from
            fresh = build_model(cfg).to(ctx.device).eval()
        model, info = trained_model(entry, ctx, train_data, targs, like=fresh)
        info.pop("config")
    row = {"name": entry.name, "method": entry.method, "domain": entry.domain, "budget": entry.budget,
           "supervision": entry.supervision, "trained": True, **info,
           "annotation": annotation_cost(load_refer(labels), "train", entry.supervision)}
    row.update(evaluate_row(model, test_data, cfg, ctx, ctx.vis_tmp / entry.name))
    rows = [row]
    if ctx.untrained and cfg is not None:
        if fresh is None:
            seed_everything(cfg.run.seed)
            fresh = build_model(cfg).to(ctx.device).eval()
        rows.append({**{k: row[k] for k in ("method", "domain", "budget", "supervision")},
                     "name": f"{entry.name} (untrained)", "trained": False, "source": "untrained (seed init)",
                     "train_seconds": 0.0, "train_time_source": "none", "train_command": "",
                     "annotation": {**row["annotation"], "seconds": 0.0, "hours": 0.0, "seconds_per_ref": 0.0},
                     **evaluate_row(fresh, test_data, cfg, ctx, None)})
    return rows


# ---- the command ----------------------------------------------------------------------


@dataclass
class Context:
    preset: Preset
    seed: int
    data_root: Path
    work: Path
    vis_tmp: Path
    threads: int
    device: "torch.device"  # noqa: F821
    retrain: bool
    no_shipped: bool
    untrained: bool
    _data: Dict[str, Any] = field(default_factory=dict)

    def data(self, domain: str):
        """The loaded test data set of a domain (loaded once)."""
        from refseg.data import load_refer

        if domain not in self._data:
            self._data[domain] = load_refer(prepare_data(self.data_root, domain, self.preset.data, self.seed))
        return self._data[domain]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="data size and training schedule")
    p.add_argument("--out", default=None, help="report folder (default: reports/bench-<preset>)")
    p.add_argument("--work", default=None, help="runs and feature caches (default: bench-work/)")
    p.add_argument("--data-root", default=None, help="where SynthRef folders are found or made (default: WORK/data)")
    p.add_argument("--seed", type=argtypes.nonneg_int, default=0, help="data and training seed")
    p.add_argument("--methods", default=None, help="comma list of rows to run (default: all): "
                   + ", ".join(e.name for e in ENTRIES))
    p.add_argument("--threads", type=argtypes.positive_threads, default=2, help="torch CPU threads")
    p.add_argument("--device", type=argtypes.device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--retrain", action="store_true", help="train even when a finished run exists")
    p.add_argument("--no-shipped", action="store_true", help="train every row, even those with a shipped model")
    p.add_argument("--untrained", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate each method's untrained instance (default: on for tiny)")


def run_rows(entries, ctx: Context) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(rows, skipped): every entry run (trained + untrained rows), or skipped with its reason."""
    rows, skipped = [], []
    for entry in entries:
        reason = missing_train_support(entry, train_args(entry, ctx.preset, ctx.seed))
        if reason and (ctx.no_shipped or not shipped_for(entry, ctx.preset.data)):
            skipped.append({"name": entry.name, "status": "not available", "reason": reason})
            print(f"refseg bench: {entry.name}: not available: {reason}", file=sys.stderr)
            continue
        print(f"refseg bench: {entry.name} ...", file=sys.stderr)
        try:
            rows.extend(run_entry(entry, ctx))
        except Exception as e:  # one failed row must not lose the others' hours
            traceback.print_exc()
            skipped.append({"name": entry.name, "status": "failed", "reason": f"{type(e).__name__}: {e}"})
    return rows, skipped


def main(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from refseg.bench.report import judge_targets, write_report

    preset = PRESETS[args.preset]
    names = [e.name for e in ENTRIES]
    chosen = names if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"refseg bench: error: unknown --methods {', '.join(unknown)}; known: {', '.join(names)}",
              file=sys.stderr)
        return 2
    entries = [e for e in ENTRIES if e.name in chosen]
    try:  # checked first: the plot is drawn after hours of training
        import matplotlib  # noqa: F401
    except ImportError:
        print("refseg bench: error: the report's plot needs matplotlib: "
              "pip install -c constraints.txt -e \".[bench]\"", file=sys.stderr)
        return 2
    out = Path(args.out or f"reports/bench-{args.preset}")
    work = Path(args.work or "bench-work")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=".vis-", dir=out) as tmp:
            ctx = Context(preset, args.seed, Path(args.data_root) if args.data_root else work / "data", work,
                          Path(tmp), args.threads, device, args.retrain, args.no_shipped,
                          preset.untrained if args.untrained is None else args.untrained)
            rows, skipped = run_rows(entries, ctx)
            data = {d: ctx.data(d) for d in sorted({r["domain"] for r in rows})}
            write_report(out, {
                "preset": args.preset, "seed": args.seed, "threads": args.threads, "device": str(device),
                "command": _command(args), "seconds": time.perf_counter() - started, "rows": rows,
                "skipped": skipped, "targets": judge_targets(entries, rows) if preset.check_targets else [],
                "data": {d: {"path": str(v.ann_dir), **_synthref_meta(v.ann_dir)} for d, v in data.items()},
            })
    finally:
        torch.set_num_threads(threads_before)
    print(f"refseg bench: wrote {out}", file=sys.stderr)
    return 0


def _command(args: argparse.Namespace) -> str:
    """The bench command line that reproduces this report."""
    words = ["refseg", "bench", "--preset", args.preset, "--seed", str(args.seed)]
    for flag in ("out", "work", "data_root", "methods", "device"):
        if getattr(args, flag) not in (None, "auto"):
            words += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    words += ["--threads", str(args.threads)]
    words += [f for f, on in (("--retrain", args.retrain), ("--no-shipped", args.no_shipped)) if on]
    if args.untrained is not None:
        words.append("--untrained" if args.untrained else "--no-untrained")
    return shlex.join(words)


def _synthref_meta(folder: Path) -> Dict[str, Any]:
    meta = Path(folder) / "synthref.json"
    if not meta.exists():
        return {}
    d = json.loads(meta.read_text())
    return {k: d.get(k) for k in ("domain", "preset", "seed", "version")}
