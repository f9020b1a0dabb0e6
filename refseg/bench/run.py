"""`refseg bench`: every method under every supervision budget, in one command.

    refseg bench --preset small --out reports/bench-small     # the full benchmark (hours on a CPU)
    refseg bench --preset tiny --out reports/bench-tiny       # the same pipeline in a few minutes (CI)

What it does:
1. Generates the SynthRef test splits (`refseg make-data`) under --data-root,
   reusing complete ones.
2. For each row of `ENTRIES` (a method under one supervision on one data
   set, with the recipe file that trains it, configs/<model>.yaml): loads its
   shipped model when one exists for this preset, else reuses a finished run
   in --work, else trains it with its recipe: `refseg train --config RECIPE`
   with the preset's overrides as flags (`tiny`: a short schedule, small heads
   and the preset's own split; `small`: none, the recipe as written). A row
   whose recipe `refseg train` refuses is reported as "not available" with
   the reason, never a crash.
3. Evaluates each model on the test split of its domain (the code of
   `refseg eval`), measures its objective on that split, and counts what its
   training labels cost (refseg.annotation; a recipe that weakens its split,
   data.accurate_fraction, pays for the weak split its own accurate_fraction
   and weak_seed make). `--preset tiny` also evaluates each method's untrained
   instance (the final stage's config and seed, no step taken).
4. Writes the report folder (refseg.bench.report): report.md (the table,
   the cost assumptions with their sources, targets, the recipe command of
   each row), results.json, accuracy_vs_cost.png and overlays/<row>.png
   (correct and failed cases).
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
from refseg.argtypes import config_flags

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/ beside refseg/


@dataclass(frozen=True)
class Entry:
    """One row of the benchmark: a method, its supervision, its data, and how to get the model."""

    name: str  # row name; also the run folder and the overlay file name
    method: str  # the method as the report names it
    domain: str  # natural | aerial (the test split evaluated)
    budget: str  # the training labels, in words
    shipped: str  # name of the shipped model to load (refseg/weights/<shipped>.json) when it exists
    recipe: str  # the recipe file that trains it (relative to the checkout), the one the model card names
    targets: Tuple[Tuple[str, float, str], ...] = ()  # (metric, threshold, "" or a row it is relative to)

    def recipe_file(self) -> Path:
        return ROOT / self.recipe


ENTRIES: Tuple[Entry, ...] = (
    Entry("lts", "LTS", "natural", "full masks", "lts-synthref", "configs/lts-synthref.yaml",
          targets=(("mIoU", 0.85, ""), ("oIoU", 0.85, ""), ("PointM", 0.95, ""))),
    Entry("pks", "PKS", "natural", "full masks", "pks-synthref", "configs/pks-synthref.yaml",
          targets=(("mIoU", 0.85, ""),)),
    Entry("pks-click", "PKS", "natural", "clicks (centre + box corners)", "pks-click-synthref",
          "configs/pks-click-synthref.yaml", targets=(("mIoU", 0.90, "pks"), ("PointM", 0.95, ""))),
    Entry("sag", "SaG", "natural", "text only", "sag-synthref", "configs/sag-synthref.yaml",
          targets=(("PointM", 0.75, ""), ("mIoU", 0.55, "lts"))),
    Entry("lts-aerial", "LTS", "aerial", "masks, all expressions", "lts-aerial", "configs/lts-aerial.yaml"),
    # LRB-WREL's comparison: the upper bound, the naive baselines and LRB-WREL share one schedule in their
    # recipes, so the ratios compare like with like; each weak row's recipe weakens the split itself
    # (data.accurate_fraction, data.weak_seed)
    Entry("lts-aerial-upper", "LTS (upper bound)", "aerial", "masks, all expressions", "lts-aerial-upper",
          "configs/lts-aerial-upper.yaml"),
    Entry("lts-aerial-naive-p0.1", "LTS (naive)", "aerial", "masks, 10% expressions", "lts-aerial-naive-p0.1",
          "configs/lts-aerial-naive-p0.1.yaml"),
    Entry("wrel-aerial-p0.1", "LRB-WREL", "aerial", "masks, 10% expressions", "wrel-aerial-p0.1",
          "configs/wrel-aerial-p0.1.yaml", targets=(("oIoU", 0.92, "lts-aerial-upper"),)),
    Entry("lts-aerial-naive-p0.5", "LTS (naive)", "aerial", "masks, 50% expressions", "lts-aerial-naive-p0.5",
          "configs/lts-aerial-naive-p0.5.yaml"),
    Entry("wrel-aerial-p0.5", "LRB-WREL", "aerial", "masks, 50% expressions", "wrel-aerial-p0.5",
          "configs/wrel-aerial-p0.5.yaml", targets=(("oIoU", 0.97, "lts-aerial-upper"),)),
)

# small heads for the tiny preset (the real frozen encoders); they replace the recipe's model kwargs
TINY_HEADS = {
    "lts": {"dim": 64, "depth": 1, "heads": 2, "decoder_widths": [24, 12, 8]},
    "pks": {"dim": 64, "depth": 1, "heads": 2, "fpn_width": 16, "fine_width": 8},
    "sag": {"dim": 64, "num_slots": 8, "iters": 2, "heads": 2, "decoder_hidden": 64},
}
# the tiny schedule, set on every stage: 40 steps of 16 sentences from 4 images at 160 px, no validation,
# no time budget, no flip views (each view is a feature cache of its own: 8 for --flip hvt)
TINY = {"size": 160, "max_steps": 40, "batch_size": 16, "images_per_batch": 4, "lr": 1e-3, "warmup_steps": 4,
        "time_budget": 0.0, "val_split": "", "log_every": 5, "flip": "none"}
# tiny LRB-WREL: its teacher as long as the run (the recipe's 750 steps exceed it) and 2 passes of the
# reference bank over every weak ref (the recipe's 4 cost most of the row's time at this size)
TINY_WREL = {"wrel_teacher_steps": 0, "wrel_bank_iters": 2}


@dataclass(frozen=True)
class Preset:
    data: str  # make-data --preset of the test splits
    overrides: Dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (flat names) set on every stage of every recipe ({} = the recipes as written)
    heads: Dict[str, dict] = field(default_factory=dict)  # model -> model kwargs replacing the recipe's
    rows: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # row -> further fields set on its stages
    own_split: bool = False  # train on this preset's split of the recipe's domain (--data), not the recipe's split
    untrained: bool = False  # also evaluate each method's untrained instance
    check_targets: bool = False  # judge the rows' targets
    examples: int = 4  # correct and failed cases per overlay grid row


PRESETS = {
    "tiny": Preset("tiny", TINY, heads=TINY_HEADS, own_split=True, untrained=True, examples=3,
                   rows={"wrel-aerial-p0.1": TINY_WREL, "wrel-aerial-p0.5": TINY_WREL}),
    "small": Preset("small", check_targets=True),  # every row trained as its recipe (and shipped model) was
}


def recipe_overrides(entry: Entry, preset: Preset, seed: int) -> Dict[str, Any]:
    """The TrainConfig fields (flat names) the bench sets on every stage of a row's recipe: the preset's
    overrides, its small head for the recipe's model, the row's own, and with --seed S > 0 the training
    seeds (run.seed and data.weak_seed; at 0 the recipe's seeds stand)."""
    from refseg.engine.recipe import load_recipe

    values = dict(preset.overrides)
    model = load_recipe(entry.recipe_file()).stages[-1].values.get("model", "lts")
    if model in preset.heads:
        values["model_kwargs"] = preset.heads[model]
    values.update(preset.rows.get(entry.name, {}))
    if seed:
        values.update(seed=seed, weak_seed=seed)
    return values


def train_argv(entry: Entry, preset: Preset, seed: int, run: Path, data_root: Path,
               train_data: Optional[Path] = None, recipe: Optional[str] = None) -> List[str]:
    """`refseg train` arguments of a row: its recipe, the run folder, where the recipe's split is made,
    the preset's split when it trains on its own (train_data), then the overrides (recipe_overrides).
    recipe: the recipe path as written (default: the file's absolute path)."""
    argv = ["train", "--config", recipe or str(entry.recipe_file()), "--out", str(run), "--data-root", str(data_root)]
    if train_data is not None:
        argv += ["--data", str(train_data)]
    return argv + config_flags(recipe_overrides(entry, preset, seed))


def _train_parser() -> argparse.ArgumentParser:
    from refseg.engine import train_cli

    parser = argparse.ArgumentParser(prog="refseg train")
    train_cli.add_arguments(parser)
    return parser


def command_configs(argv: List[str]):
    """The resolved TrainConfig of every stage `refseg ARGV` (a recipe's train command) trains, in order,
    without training (refseg.engine.recipe.command_configs)."""
    from refseg.engine.recipe import command_configs as resolve_command

    assert argv[0] == "train", argv
    return resolve_command(_train_parser().parse_args(argv[1:]))


def missing_train_support(entry: Entry, argv: List[str]) -> Optional[str]:
    """None when `refseg train` accepts a row's recipe command, else why not (it is resolved, never run)."""
    from refseg.engine.train import TrainError

    if not entry.recipe_file().is_file():
        return f"{entry.method} training is not in this refseg: its recipe {entry.recipe} is not in this checkout"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            command_configs(argv)
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        detail = lines[-1].replace("refseg train: error: ", "") if lines else "parse error"
    except (ValueError, TrainError) as e:  # ConfigError is a ValueError
        detail = " ".join(str(e).split())
    else:
        return None
    return f"{entry.method} training is not in this refseg: `refseg train` refuses the row's recipe ({detail})"


# ---- data -----------------------------------------------------------------------------


def data_folder(root: Path, domain: str, preset: str, seed: int) -> Path:
    return root / f"{domain}-{preset}-s{seed}"


def prepare_data(root: Path, domain: str, preset: str, seed: int) -> Path:
    """The SynthRef split of a domain, generated when it is not complete yet."""
    from refseg.cli import main as cli

    out = data_folder(root, domain, preset, seed)
    if not (out / "synthref.json").exists():
        if cli(["make-data", "--domain", domain, "--preset", preset, "--seed", str(seed), "--out", str(out)]):
            raise RuntimeError(f"refseg make-data failed for {out}")
    return out


def labels_folder(cfg, trained_on: Path, fallback: Path, root: Path) -> Tuple[Path, Optional[str]]:
    """(the data set whose train split holds the labels a model paid for, a note or None).

    cfg: the TrainConfig it was trained with; trained_on: its data folder;
    fallback: the folder counted when trained_on is not here. A config that
    weakens its split (data.accurate_fraction p, data.weak_seed w) pays for
    the weak split `refseg train` makes with those values (data.weak.ensure_weak
    into ROOT/<folder>-p<p>-w<w>).
    """
    from refseg.data.weak import ensure_weak

    note = None
    folder = trained_on
    if not (folder / "instances.json").exists():
        note = (f"trained on {folder.name}, not found here: the annotation cost is that of {fallback.name}'s "
                "training split")
        folder = fallback
    d = cfg.data
    if d.accurate_fraction is not None:
        weak = root / f"{folder.name}-p{d.accurate_fraction:g}-w{d.weak_seed}"
        folder = ensure_weak(folder, weak, d.accurate_fraction, d.weak_seed, split_by=d.split_by or "unc",
                             images_dir=d.images)
    return folder, note


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

    ds = RefSegDataset(data, "test", model.image_size, supervision)
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
    # scored from the images as served (fp32 encoder maps), not from the fp16 feature cache of the held-out loss
    metrics = evaluate_model(model, ds, device=ctx.device, progress=False, per_sample=records)
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
    ds = RefSegDataset(data, "test", model.image_size, "eval")
    ds.samples = [s for s in ds.samples if s.sent_id in wanted]
    if ds.samples:
        evaluate_model(model, ds, device=device, progress=False, save_vis=folder)
    return {name: [(str(folder / f"{r['sent_id']}.png"), r["iou"]) for r in g] for name, g in chosen.items()}


def recipe_command(entry: Entry, argv: Optional[List[str]] = None) -> str:
    """The command line of a row's recipe: `refseg train --config configs/<model>.yaml --out runs/<model>`,
    or `argv` (the bench's own, with its overrides) with the recipe named as in the checkout."""
    if argv is None:
        return shlex.join(["refseg", "train", "--config", entry.recipe, "--out", f"runs/{entry.shipped}"])
    argv = list(argv)
    argv[argv.index("--config") + 1] = entry.recipe
    return shlex.join(["refseg", *argv])


def shipped_model(entry: Entry, name: str, device):
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
        "train_command": recipe_command(entry)}


def trained_model(entry: Entry, ctx: "Context", argv: List[str], like=None):
    """(model, info) of a row's recipe run in WORK: reused when a bench training finished it, else trained
    (a run stopped part-way goes on: finished stages are skipped, the unfinished one resumed).

    argv: the row's `refseg train` arguments (train_argv). info: {"source",
    "train_seconds", "train_time_source", "train_command"}. like: the row's
    untrained instance, copied instead of rebuilding the encoders.
    """
    from refseg.cli import main as cli
    from refseg.engine.checkpoint import load_model
    from refseg.engine.recipe import RUN_FILE

    run = Path(argv[argv.index("--out") + 1])
    machine = ["--threads", str(ctx.threads), "--device", str(ctx.device), "--no-progress",
               "--cache-dir", str(ctx.work / "cache")]
    timing = run / "bench_train.json"  # written when a training this bench started has finished
    if timing.exists() and not ctx.retrain:
        source = f"run reused from {run}"
    else:
        resume = (run / RUN_FILE).exists() and not ctx.retrain
        full = [*argv, *machine, *(["--overwrite"] if ctx.retrain and run.exists() else [])]
        start = time.perf_counter()
        if cli(full) != 0:
            raise RuntimeError(f"training failed: refseg {shlex.join(full)}")
        seconds = time.perf_counter() - start
        timing.write_text(json.dumps({"seconds": seconds, "resumed": resume, "command": shlex.join(argv)}))
        source = "resumed and finished by this bench" if resume else "trained by this bench"
    recorded = json.loads(timing.read_text())
    return load_model(run, device=ctx.device, like=like), {
        "source": source, "train_seconds": recorded["seconds"], "train_command": recipe_command(entry, argv),
        "train_time_source": "measured (bench)" + (", since the resume" if recorded.get("resumed") else "")}


def recipe_domain(entry: Entry) -> str:
    """The SynthRef domain of a row's recipe (the row's test domain when the recipe names a folder)."""
    from refseg.engine.recipe import load_recipe

    data = load_recipe(entry.recipe_file()).data
    return data["domain"] if isinstance(data, dict) else entry.domain


def row_argv(entry: Entry, ctx: "Context") -> List[str]:
    """The `refseg train` arguments the bench trains a row with (WORK/runs/<preset>-s<seed>/<row>)."""
    run = ctx.work / "runs" / f"{ctx.preset.data}-s{ctx.seed}" / entry.name
    own = data_folder(ctx.data_root, recipe_domain(entry), ctx.preset.data, ctx.seed) if ctx.preset.own_split \
        else None
    return train_argv(entry, ctx.preset, ctx.seed, run, ctx.data_root, own)


def run_entry(entry: Entry, ctx: "Context") -> List[Dict[str, Any]]:
    """The row of a trained (or shipped) model, evaluated; and its untrained instance's row when asked."""
    from refseg.annotation import annotation_cost
    from refseg.data import load_refer
    from refseg.engine.recipe import load_recipe
    from refseg.engine.train import build_model, seed_everything

    test_folder = prepare_data(ctx.data_root, entry.domain, ctx.preset.data, ctx.seed)
    test_data = ctx.data(entry.domain)
    shipped = None if ctx.no_shipped else shipped_for(entry, ctx.preset.data)
    fresh = None
    if shipped:
        model, info = shipped_model(entry, shipped, ctx.device)
        cfg = info.pop("config")
        trained_on = load_recipe(entry.recipe_file()).data_folder(ctx.data_root) if entry.recipe_file().is_file() \
            else Path(cfg.data.path)
    else:
        argv = row_argv(entry, ctx)
        cfg = command_configs(argv)[-1]  # the final stage: the model evaluated
        trained_on = Path(cfg.data.path)
        if ctx.preset.own_split:  # else `refseg train` makes the recipe's own split
            prepare_data(ctx.data_root, recipe_domain(entry), ctx.preset.data, ctx.seed)
        if ctx.untrained:
            seed_everything(cfg.run.seed)  # the state the final stage's model is built in
            fresh = build_model(cfg).to(ctx.device).eval()
        model, info = trained_model(entry, ctx, argv, like=fresh)
    supervision = cfg.data.supervision if cfg is not None else "full"
    labels, note = labels_folder(cfg, trained_on, test_folder, ctx.data_root) if cfg is not None \
        else (test_folder, None)
    if note:
        info["note"] = note
    row = {"name": entry.name, "method": entry.method, "domain": entry.domain, "budget": entry.budget,
           "supervision": supervision, "trained": True, **info,
           "annotation": annotation_cost(load_refer(labels), "train", supervision)}
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
        try:
            reason = missing_train_support(entry, row_argv(entry, ctx) if entry.recipe_file().is_file() else [])
        except ValueError as e:  # a recipe that does not parse (ConfigError)
            reason = f"{entry.method} training is not in this refseg: {' '.join(str(e).split())}"
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
