"""`refseg train`: train a model on a refer-format data set.

    refseg train --data data/synthref --batch-size 32 --max-steps 3000 --out runs/lts
    refseg train --config runs/lts/config.json --lr 1e-4 --out runs/lts-lr1e-4
    refseg train --resume runs/lts --max-steps 6000       # continue exactly where last/ stopped
    refseg train --overwrite --data D --out runs/lts ...   # start anew in a folder that holds a run
    refseg train --nproc 2 ...                             # = torchrun --nproc_per_node 2 -m refseg.cli train ...
    refseg train --accurate-fraction 0.1 --data D ...      # on the weak split of D (made in RUN/data)
    refseg train --method wrel --accurate-fraction 0.1 --data D ...   # LRB-WREL, three stages (refseg/methods/wrel/)

What a run does:
1. Builds the model (`refseg.methods.METHODS[model].build(**model_kwargs)`), with
   the seed set, and the data set (`RefSegDataset`, one item per sentence).
2. When both encoders are frozen (cache_features=auto), encodes every image
   and sentence of the training split (and the validation subset) once into
   an fp16 cache (engine/cache.py); a step then only runs `model.decode`.
   Otherwise every step runs the encoders too (on the unique images of the
   batch only).
3. AdamW over the trainable parameters (no decay on biases and norms),
   linear warm-up then cosine decay to min_lr, gradient clipping, autocast
   (+ GradScaler for fp16) on cuda, DistributedDataParallel under torchrun
   (gloo on CPU, NCCL on cuda; rank 0 alone logs and writes checkpoints).
   With --flip h / hv / hvt each batch shows every image in one view drawn
   per image (data/augment.py: image, mask and clicks flipped or
   transposed, direction words swapped); cached runs cache each view of the
   split too.
4. Logs to RUN/log.csv (time, step, epoch, tag, value) and TensorBoard
   (RUN/tb); validates every val_every steps with RISMetrics and keeps the
   checkpoint of the best val mIoU in RUN/best/, the latest in RUN/last/.

The run folder: a folder that already holds a run is refused unless
`--resume` continues it or `--overwrite` replaces it (open_run); the folder
is locked (RUN/.lock, fcntl.flock) while a process trains in it, so a second
`refseg train` on it is refused. `--resume` checks every file of the
checkpoint it continues from against its manifest and every field of its
state.json first; when last/ is damaged it falls back to the newest whole
one (an interrupted save's copy, the previous last/ kept as .last.prev,
best/) and says so, and it refuses a change of the settings the data order
depends on (RESUME_FIXED). A failed write (a full disk) ends the run with
one line; the last complete checkpoint stays in place for --resume.

With `accurate_fraction` set, the run first writes the weak-expression split
of DATA into RUN/data (`refseg weaken`, reused when it is already there) and
trains on that; `train_subset accurate` trains on the refs it left accurate
only. `method wrel` runs LRB-WREL's three stages (refseg/methods/wrel/), which use
this loop for stages 1 and 3 through `TrainHooks`.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import inspect
import math
import os
import random
import shutil
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from refseg.data.augment import FLIP_CHOICES as FLIP_VIEWS
from refseg.data.augment import swap_directions
from refseg.engine import distributed
from refseg.engine.config import TrainConfig, add_config_arguments, config_from_args, read_config_file
from refseg.engine.optim import lr_at, make_optimizer, resolve_amp
from refseg.engine.runlog import RunLog
from refseg.argtypes import positive_int
from refseg.engine.state import StateError

class TrainError(ValueError):
    """A configuration or data problem, reported to the user in one line."""


class TrainHooks:
    """What a training method adds to the loop; the defaults add nothing (a plain run).

    LRB-WREL's student stage (refseg/methods/wrel/train.py) uses them: it swaps the text features of
    weak sentences, moves an EMA teacher after every step, validates and
    ships the teacher, and keeps it in RUN/last/ for --resume.
    """

    def setup(self, model: nn.Module, train_ds, device: torch.device) -> None:
        """Called once, after the model, data set and cache are ready and before a resume loads last/."""

    def repeats(self, sample) -> int:
        """How many times this training sample appears in each epoch."""
        return 1

    def augmentable(self, sample) -> bool:
        """Whether the flip augmentation (--flip) may show this training sample flipped."""
        return True

    def prepare(self, batch: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        """The step's batch (cached: vis + txt; uncached: images + text) before the forward pass."""
        return batch

    def after_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Called after optimiser step `step` (0-based) has updated the model."""

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The network that validation scores and RUN/best/ holds."""
        return model

    def state_tensors(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Extra tensors RUN/last/ keeps for --resume: {file stem: tensors}."""
        return {}

    def load_state(self, ckpt: Path) -> None:
        """Restore what state_tensors saved, from a resumed checkpoint folder."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="processes to train with (launches torchrun --nproc_per_node N); batch_size is split between them")
    parser.add_argument("--data-root", default="data",
                        help="where a recipe's SynthRef split is found, or made when missing (default: data)")


def main(args: argparse.Namespace) -> int:
    from refseg.data.refer import ReferFormatError
    from refseg.engine import recipe

    if recipe.is_recipe_run(args):  # configs/<model>.yaml: stages into OUT/<stage>/ (engine/recipe.py)
        return recipe.main(args)
    if args.nproc > 1 and "RANK" not in os.environ:
        return distributed.launch(args.nproc, _to_argv(args))
    try:
        base: Dict[str, Any] = {}
        if getattr(args, "resume", None):
            run_config = Path(args.resume) / "config.json"
            if not run_config.exists():
                raise TrainError(f"--resume {args.resume}: no config.json in that folder")
            base = {**read_config_file(run_config), "out": str(args.resume), "overwrite": False}
        try:
            cfg = config_from_args(args, base)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if not cfg.data:
            raise TrainError("--data is required (a refer-format folder)")
        train(cfg)
    except (TrainError, FileNotFoundError, ReferFormatError) as e:
        print(f"refseg train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _to_argv(args: argparse.Namespace) -> List[str]:
    """The flags given (config fields present in the namespace, --config), for the torchrun relaunch."""
    import json

    argv = ["--config", args.config] if args.config else []
    for name in TrainConfig.__dataclass_fields__:
        if name not in vars(args):
            continue
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, "none" if value is None else str(value)]
    return argv


# ---- pieces -------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def method_of(cfg: TrainConfig):
    """The registry entry (refseg.methods.METHODS) of cfg.model."""
    from refseg.methods import METHODS, MODELS

    if cfg.model not in MODELS:
        raise TrainError(f"unknown model {cfg.model!r}; known: {', '.join(sorted(MODELS))}")
    return METHODS[cfg.model]


def build_model(cfg: TrainConfig) -> nn.Module:
    kwargs = dict(cfg.model_kwargs)
    kwargs.setdefault("image_size", cfg.size)
    model = method_of(cfg).build(**kwargs)
    if model.image_size != cfg.size:
        raise TrainError(f"the model's image_size {model.image_size} differs from --size {cfg.size}")
    return model


def loss_function(cfg: TrainConfig) -> Callable:
    """The training loss of cfg.model under cfg.supervision, with cfg.loss_kwargs bound."""
    from refseg.methods import METHODS

    fn = method_of(cfg).losses.get(cfg.supervision)
    if fn is None:
        known = ", ".join(f"{m}/{s}" for m in sorted(METHODS) if METHODS[m].name == METHODS[m].model
                          for s in sorted(METHODS[m].losses))
        raise TrainError(f"no loss for model {cfg.model!r} with supervision {cfg.supervision!r} "
                         f"(known: {known})")
    name = fn.__name__
    if not cfg.loss_kwargs:
        return fn
    params = inspect.signature(fn).parameters
    unknown = sorted(k for k in cfg.loss_kwargs if k not in params or k in ("out", "batch"))
    if unknown:
        allowed = ", ".join(k for k in params if k not in ("out", "batch"))
        raise TrainError(f"loss_kwargs: {name} has no argument {', '.join(map(repr, unknown))} (it takes: {allowed})")
    return functools.partial(fn, **cfg.loss_kwargs)


def set_train_mode(model: nn.Module) -> None:
    """model.train(), with frozen sub-modules (the encoders) kept in eval mode."""
    from refseg.engine.checkpoint import frozen_prefixes

    model.train()
    for name in frozen_prefixes(model):
        model.get_submodule(name).eval()


class StepModule(nn.Module):
    """forward(batch) -> the model's output dict. A cached batch carries `vis`
    and `txt` and runs decode only; otherwise the encoders run on `images`
    (the batch's unique images) and `text`. The model's method may add
    training-only decode arguments (its teacher_forcing). DDP wraps this module."""

    def __init__(self, model: nn.Module):
        from refseg.methods import teacher_forcing

        super().__init__()
        self.model = model
        self.teacher_forcing = teacher_forcing(model)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        if "vis" in batch:
            vis, txt = batch["vis"], batch["txt"]
        else:
            vis, txt = self.model.encode_image(batch["images"]), self.model.encode_text(batch["text"])
        extra = self.teacher_forcing(self.model, batch) if self.teacher_forcing is not None else {}
        return self.model.decode(vis, txt, batch["image_index"], **extra)


def to_step_batch(items: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """A collated batch of data set items -> the uncached step's inputs: unique images + image_index."""
    from refseg.engine.evaluate_core import unique_images

    images, image_index = unique_images(items)
    out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in items.items() if k != "image"}
    out["images"] = images.to(device)
    out["image_index"] = image_index.to(device)
    return out


def subset_rows(samples, subset: str) -> np.ndarray:
    """Indices of the training sentences used: all, or those of refs not marked weak."""
    if subset == "all":
        return np.arange(len(samples), dtype=np.int64)
    return np.array([i for i, s in enumerate(samples) if not s.weak], dtype=np.int64)


def weak_data_dir(cfg: TrainConfig, run: Path) -> Path:
    """RUN/data: the weak split of cfg.data at cfg.accurate_fraction (made, or reused when it matches)."""
    from refseg.data.weak import ensure_weak

    try:
        return ensure_weak(cfg.data, run / "data", cfg.accurate_fraction, cfg.weak_seed,
                           split_by=cfg.split_by or "unc", images_dir=cfg.images)
    except FileExistsError as e:
        raise TrainError(str(e)) from None


def draw_views(batch_rows: List[int], views: Sequence[str], flippable: np.ndarray, samples,
               key: Tuple[int, ...]) -> List[str]:
    """The flip view of each sentence of a batch: one view per image, drawn uniformly from `views`
    (a pure function of `key` = (seed, epoch, batch index), so a resumed run draws the same), and
    "none" for sentences the method keeps unflipped (TrainHooks.augmentable)."""
    if len(views) == 1:
        return ["none"] * len(batch_rows)
    rng = np.random.default_rng([*key, 0xF11B])
    chosen: Dict[int, str] = {}
    out = []
    for r in batch_rows:
        image = samples[r].image_id
        if image not in chosen:
            chosen[image] = views[int(rng.integers(len(views)))]
        out.append(chosen[image] if flippable[r] else "none")
    return out


def cached_batch(batch_rows: List[int], batch_views: List[str], cache, view_caches: Dict[str, Any],
                 view_texts: Dict[str, List[str]], device: torch.device) -> Dict[str, Any]:
    """A cached step batch: each sentence's features from the cache of its flip view, rows in batch order."""
    from refseg.engine.cache import merge_batches

    groups: Dict[str, List[int]] = {}
    for i, view in enumerate(batch_views):
        groups.setdefault(view, []).append(i)
    parts, placed = [], []
    for view, idx in groups.items():
        rows = [batch_rows[i] for i in idx]
        source = cache if view == "none" else view_caches[view]
        parts.append(dict(source.batch(rows, device), text=[view_texts[view][r] for r in rows]))
        placed.extend(idx)
    return merge_batches(parts, np.argsort(np.asarray(placed)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TimeBudget:
    """`time_budget`: fit a run's schedule into a wall-clock budget.

    The step rate is measured over steps [first, decide) of the loop,
    validation excluded; at step `decide` (inside the warm-up when
    warmup_steps >= decide, so no learning rate used so far depends on the
    length chosen) total_steps becomes the steps that fit into what is left
    of the budget, times MARGIN, if that is fewer. After that the run stops
    once the budget is spent in any case; its final validation and
    checkpoint follow. Under DDP rank 0 decides for every rank. A resumed
    run keeps the length decided before it was stopped and gets no new
    budget (so that --resume stays exact), unless it stopped before deciding.
    """

    MARGIN = 0.9  # room for the validations, whose time the rate does not count

    def __init__(self, seconds: float, started: float, warmup_steps: int, info, step: int = 0):
        self.seconds, self.started, self.info = seconds, started, info
        self.decide = min(100, max(20, warmup_steps))
        self.first = self.decide // 4
        self.active = seconds > 0 and step < self.decide
        self.t_first: Optional[float] = None
        self.paused_first = 0.0

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def after_step(self, step: int, total_steps: int, paused: float) -> int:
        """The run's total_steps after optimiser step `step` (1-based count); `paused`: seconds spent validating."""
        if not self.active:
            return total_steps
        if step == self.first:
            self.t_first, self.paused_first = time.perf_counter(), paused
        elif step == self.decide and self.t_first is not None:
            busy = time.perf_counter() - self.t_first - (paused - self.paused_first)
            rate = (step - self.first) / max(busy, 1e-9)
            fit = step + int(self.MARGIN * rate * max(0.0, self.left()))
            total_steps = distributed.broadcast_object(max(step + 1, min(total_steps, fit)), self.info)
        if not self.info.enabled or step % 10 == 0:
            if distributed.broadcast_object(self.left() <= 0, self.info):
                total_steps = min(total_steps, step)
        return total_steps


# ---- the run folder -----------------------------------------------------------------

LOCK_FILE = ".lock"

# settings the data order and a checkpoint's position in it depend on: a resumed run must keep them
RESUME_FIXED = ("model", "method", "supervision", "size", "train_split", "train_subset", "split_by",
                "accurate_fraction", "weak_seed", "batch_size", "images_per_batch", "group_refs", "flip", "seed",
                "wrel_accurate_repeat", "wrel_bank_batch", "wrel_bank_prompts", "wrel_bank_site")


class RunLock:
    """An exclusive lock on a run folder: fcntl.flock on RUN/.lock (created with the folder when missing).

    The kernel drops the lock when the process ends, however it ends (SIGKILL
    included), so a dead run's lock never blocks the next one. RUN/.lock holds
    the holder's pid, which a refused process names. Raises TrainError when
    another process holds it.
    """

    def __init__(self, run: Path):
        self.run, self.fd = run, None
        self.created = not run.exists()
        run.mkdir(parents=True, exist_ok=True)
        path = run / LOCK_FILE
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise TrainError(f"{run} is in use: another refseg train (pid {holder}) trains in it; "
                                     "wait for it to end, or train into another --out") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the folder was replaced (--overwrite) between open and flock: lock what is there now
        else:
            raise TrainError(f"{run} keeps being replaced by another process; cannot lock it")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd

    def release(self) -> None:
        """Unlock; a folder this lock created that holds nothing but the lock file is removed."""
        if self.fd is None:
            return
        try:
            if self.created and [p.name for p in self.run.iterdir()] == [LOCK_FILE]:
                (self.run / LOCK_FILE).unlink()
                self.run.rmdir()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _same_folder(a: Any, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def open_run(run: Path, cfg: TrainConfig) -> RunLock:
    """Check and lock the run folder `run` before anything is written to it; returns the held lock.

    A folder that already holds anything (but the lock file, and the weak
    split RUN/data that a run with accurate_fraction reuses) is refused
    unless cfg.resume names it, or cfg.overwrite is set: then the old run is
    renamed aside in one step (to .<name>.replaced-* beside it, nothing
    deleted) and removed once the new run has saved its first complete
    checkpoint (drop_replaced), so a new run that fails before that leaves
    the old one recoverable.
    """
    if cfg.overwrite and cfg.resume:
        raise TrainError("--overwrite starts a new run and --resume continues one: give only one of them")
    if run.exists() and not run.is_dir():
        raise TrainError(f"--out {run}: exists and is not a folder")
    lock = RunLock(run)
    try:
        keep = {LOCK_FILE} | ({"data"} if cfg.accurate_fraction is not None else set())
        held = sorted((p.name for p in run.iterdir() if p.name not in keep), key=lambda n: (n.startswith("."), n))
        if held and not (cfg.resume and _same_folder(cfg.resume, run)):
            if not cfg.overwrite:
                listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
                raise TrainError(f"--out {run} already holds a run ({listed}): continue it with --resume {run}, "
                                 "or replace it with --overwrite")
            lock = _replace_run(run, lock, cfg.progress)
    except BaseException:
        lock.release()
        raise
    return lock


def _replace_run(run: Path, lock: RunLock, say: bool) -> RunLock:
    """--overwrite: an empty, locked folder at `run`; the old one renamed to .<name>.replaced-<tag>."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = run.parent / f".{run.name}.new-{tag}"
    aside = run.parent / f".{run.name}.replaced-{tag}"
    new = RunLock(staging)
    try:
        os.replace(run, aside)
        os.replace(staging, run)
    except BaseException:
        if aside.exists() and not run.exists():
            os.replace(aside, run)
        new.release()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    new.run, new.created = run, False
    lock.release()
    if say:
        print(f"refseg train: --overwrite: the run that was in {run} is kept in {aside} until this run's "
              "first checkpoint", file=sys.stderr)
    return new


def drop_replaced(run: Path) -> None:
    """Delete what --overwrite set aside (.<name>.replaced-*, and staging folders of an interrupted swap)."""
    for old in [*run.parent.glob(f".{run.name}.replaced-*"), *run.parent.glob(f".{run.name}.new-*")]:
        shutil.rmtree(old, ignore_errors=True)


def check_resume_config(cfg: TrainConfig, saved: Dict[str, Any], source: Path) -> None:
    """Raise TrainError naming the field and both values when `cfg` changes a RESUME_FIXED setting of the
    config `saved` (read from `source`) that a resumed run continues."""
    for name in RESUME_FIXED:
        if name in saved and saved[name] != getattr(cfg, name):
            flag = "--" + name.replace("_", "-")
            raise TrainError(f"--resume {cfg.resume}: {name} is {getattr(cfg, name)!r} here but {saved[name]!r} in "
                             f"{source}; a resumed run keeps the data order it was saved in (drop {flag}, or train "
                             "a new run into another --out)")


def choose_resume_point(run: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(checkpoint folder, its state.json) that --resume continues from; (None, None) when the run holds no
    checkpoint at all (it stopped before its first: it starts over).

    Every candidate (checkpoint.resume_candidates) is checked completely
    (checkpoint.verify_resume_point); the newest whole one wins, last/ on a
    tie. When that is not last/, the reason is printed on stderr. Raises
    TrainError with each candidate's reason when none is whole.
    """
    from refseg.engine import checkpoint as ckpt

    problems: List[str] = []
    whole = []
    for folder in ckpt.resume_candidates(run):
        try:
            state = ckpt.verify_resume_point(folder)
        except (ckpt.CheckpointError, StateError) as e:
            problems.append(" ".join(str(e).split()))
            continue
        whole.append((state["step"], folder.name == "last", folder, state))
    if not whole:
        if problems:
            raise TrainError(f"--resume {run}: no checkpoint to continue from is whole: {'; '.join(problems)}")
        return None, None
    step, _, folder, state = max(whole, key=lambda w: w[:2])
    if folder != run / "last":
        why = problems[0] if (run / "last").exists() and problems else f"{run / 'last'} is missing"
        print(f"refseg train: {why}; resuming from {folder} (step {step}) instead", file=sys.stderr)
    return folder, state


# ---- the run ------------------------------------------------------------------------


def train(cfg: TrainConfig, model: Optional[nn.Module] = None, data=None,
          hooks: Optional[TrainHooks] = None, opened: bool = False) -> Dict[str, Any]:
    """Run training as configured; returns {"run", "step", "best", "val", "train_loss"}.

    model / data: ready-built objects to use instead of building them from
    cfg.model / cfg.data (tests, notebooks); cfg still names them in config.json.
    hooks: a training method's additions to the loop (see TrainHooks). A
    config whose method is not plain, without hooks, runs that method's stages (METHODS[method].train).
    opened: the caller (a method running this as one of its stages) has
    already checked and locked the run folder (open_run); otherwise this does.
    """
    if cfg.method != "plain" and hooks is None:  # a multi-stage method runs its own stages
        from refseg.methods import METHODS

        return METHODS[cfg.method].train(cfg, model, data)
    with ExitStack() as cleanup:
        return _train(cfg, model, data, hooks or TrainHooks(), opened, cleanup)


def _train(cfg: TrainConfig, model: Optional[nn.Module], data, hooks: TrainHooks, opened: bool,
           cleanup: ExitStack) -> Dict[str, Any]:
    """train()'s body; `cleanup` closes the progress bar and the log and unlocks the run, however it ends."""
    from refseg.data.dataset import RefSegDataset, collate
    from refseg.engine import cache as feature_cache
    from refseg.engine import checkpoint as ckpt
    from refseg.engine.evaluate_core import evaluate_model
    from refseg.engine.sampler import GroupBatchSampler
    from refseg.hub import weights_path

    cfg.validate()
    started = time.perf_counter()  # the time budget counts from here
    info = distributed.env_info()
    device = resolve_device(cfg.device, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = distributed.init(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif info.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    main_rank = info.is_main
    progress = cfg.progress and main_rank

    # data, model, loss (checked before anything is written, but the weak split)
    loss_fn = loss_function(cfg)
    run = Path(cfg.out or f"runs/{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}")
    run = Path(distributed.broadcast_object(str(run), info))
    if main_rank and not opened:
        cleanup.callback(open_run(run, cfg).release)
    # the checkpoint a resume continues from: checked whole, and against this config, before anything is written
    resume_from: Optional[Path] = None
    if cfg.resume:
        if main_rank:
            resume_from, saved = choose_resume_point(Path(cfg.resume))
            if saved is not None:
                check_resume_config(cfg, saved["config"], resume_from / ckpt.STATE_JSON)
        found = distributed.broadcast_object(None if resume_from is None else str(resume_from), info)
        resume_from = None if found is None else Path(found)
    if data is None:
        from refseg.data.refer import load_refer

        data_dir = cfg.data
        if cfg.accurate_fraction is not None:
            if main_rank:
                weak_data_dir(cfg, run)
            distributed.barrier(info)
            data_dir = run / "data"
        data = load_refer(data_dir, split_by=cfg.split_by, images_dir=cfg.images)
    if cfg.train_split not in data.splits():
        raise TrainError(f"no split {cfg.train_split!r} in {cfg.data} (splits: {', '.join(data.splits())})")
    seed_everything(cfg.seed)
    if model is None:
        model = build_model(cfg)
    if cfg.init_from:  # a resumed run's last/ overrides these weights below
        try:
            fresh = ckpt.init_weights(model, weights_path(cfg.init_from))
        except (ckpt.CheckpointError, FileNotFoundError) as e:
            raise TrainError(f"--init-from {cfg.init_from}: {e}") from None
        if main_rank and progress:
            print(f"initialised from {cfg.init_from}"
                  + (f"; {len(fresh)} tensors it lacks start fresh: {', '.join(fresh[:6])}"
                     + (" ..." if len(fresh) > 6 else "") if fresh else ""), file=sys.stderr)
    model.to(device)

    def save_config() -> None:
        with writing(run / "config.json"):
            TrainConfig.from_dict({**cfg.to_dict(), "out": str(run), "resume": None,
                                   "overwrite": False}).save(run / "config.json")

    if main_rank:
        run.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # a resumed run rewrites it once its checkpoint has loaded
            save_config()
    distributed.barrier(info)

    train_ds = RefSegDataset(data, cfg.train_split, cfg.size, cfg.supervision)
    val_ds = None
    if cfg.val_split:
        if cfg.val_split in data.splits():
            val_ds = RefSegDataset(data, cfg.val_split, cfg.size, "text")
            if cfg.val_max_samples:
                val_ds.samples = val_ds.samples[:cfg.val_max_samples]
        elif main_rank:
            print(f"refseg train: no split {cfg.val_split!r} in {cfg.data}; training without validation",
                  file=sys.stderr)

    # feature cache
    use_cache = cfg.cache_features != "off" and feature_cache.encoders_frozen(model)
    if cfg.cache_features == "on" and not use_cache:
        raise TrainError("--cache-features on needs frozen encoders (their outputs need gradients)")
    views = FLIP_VIEWS[cfg.flip]  # the flip views a training sentence is shown in (data/augment.py)
    train_cache = val_cache = None
    view_caches: Dict[str, Any] = {}  # flip view -> cache of the split seen that way
    if use_cache:
        cache_dir = cfg.cache_dir or (str(run / "cache") if info.enabled else None)
        t0 = time.perf_counter()
        caches = []
        for ds in [train_ds] + ([val_ds] if val_ds is not None else []):
            if main_rank:
                caches.append(feature_cache.get_cache(model, ds, device, cache_dir, workers=cfg.workers,
                                                      progress=progress))
            distributed.barrier(info)
            if not main_rank:
                caches.append(feature_cache.get_cache(model, ds, device, cache_dir, build=False))
        train_cache = caches[0]
        val_cache = caches[1] if len(caches) > 1 else None
        for view in views[1:]:  # each flipped view of the train split: its own images encoded, its own texts
            view_ds = RefSegDataset(data, cfg.train_split, cfg.size, cfg.supervision, view=view)
            if main_rank:
                view_caches[view] = feature_cache.get_cache(model, view_ds, device, cache_dir, workers=cfg.workers,
                                                            progress=progress)
            distributed.barrier(info)
            if not main_rank:
                view_caches[view] = feature_cache.get_cache(model, view_ds, device, cache_dir, build=False)
            caches.append(view_caches[view])
        if main_rank and progress:
            mb = sum(c.nbytes() for c in caches) / 2**20
            print(f"feature cache: {len(train_cache)} train sentences / {train_cache.meta['n_images']} images"
                  f"{f', {len(val_cache)} val sentences' if val_cache else ''}, {mb:.0f} MiB, "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # optimisation
    optimizer = make_optimizer(model, cfg)
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16 and device.type == "cuda")
    rows = subset_rows(train_ds.samples, cfg.train_subset)  # data set indices trained on
    repeats = np.array([hooks.repeats(train_ds.samples[r]) for r in rows], dtype=np.int64)
    if (repeats != 1).any():  # a method's oversampling (e.g. wrel_accurate_repeat): rows listed repeatedly
        rows = np.repeat(rows, repeats)
    # each view's expressions, by data set row (= cache row): what the cached path feeds the step
    view_texts = {view: [swap_directions(s.text, view) for s in train_ds.samples] for view in views}
    flippable = np.array([hooks.augmentable(s) for s in train_ds.samples], dtype=bool)
    sampler = GroupBatchSampler([train_ds.samples[r].image_id for r in rows], cfg.batch_size, cfg.images_per_batch,
                                seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                ref_ids=[train_ds.samples[r].ref_id for r in rows] if cfg.group_refs else None)
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        raise TrainError(f"split {cfg.train_split!r} has no sentences"
                         + (f" in subset {cfg.train_subset!r}" if cfg.train_subset != "all" else ""))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]

    hooks.setup(model, train_ds, device)

    # resume
    step, epoch, position, best = 0, 0, 0, None
    if cfg.resume:
        found = resume_from
        if found is None:  # stopped before its first checkpoint: the run starts over, as it first did
            if main_rank:
                print(f"no complete checkpoint in {cfg.resume} yet: starting at step 0", file=sys.stderr)
        else:
            state = ckpt.load_training_state(found, model, optimizer, restore_rng=True)
            step, epoch, position, best = state["step"], state["epoch"], state["position"], state.get("best")
            saved_epoch = state.get("steps_per_epoch", steps_per_epoch)
            if saved_epoch != steps_per_epoch or position >= steps_per_epoch:
                raise StateError(f"{found / ckpt.STATE_JSON}: saved at batch {position} of an epoch of {saved_epoch} "
                                 f"batches, but the training data and batch settings now give {steps_per_epoch} "
                                 "batches per epoch: resume with the data it was trained on")
            if state.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(state["scaler"])
            hooks.load_state(found)
            if cfg.time_budget and state.get("total_steps"):  # the length the budget chose
                total_steps = int(state["total_steps"])
            if main_rank and progress:
                print(f"resumed from {found} at step {step} (epoch {epoch}, batch {position})", file=sys.stderr)
        if main_rank:
            save_config()
    budget = TimeBudget(cfg.time_budget, started, cfg.warmup_steps, info, step)
    paused = 0.0  # seconds spent validating and saving inside the loop

    step_module: nn.Module = StepModule(model)
    if info.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    log = RunLog(run, main_rank)
    cleanup.callback(log.close)
    last_val: Dict[str, Any] = {}

    def state_dict() -> Dict[str, Any]:
        return {"step": step, "epoch": epoch, "position": position, "total_steps": total_steps,
                "scheduler": {"kind": "warmup_cosine", "step": step, "lr": lr_at(min(step, total_steps - 1), cfg,
                                                                                 total_steps)},
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "best": _jsonable(best or {}) or None, "val": _jsonable(last_val), "config": cfg.to_dict(),
                "steps_per_epoch": steps_per_epoch}

    def save(name: str) -> None:
        if main_rank:
            with writing(run / name, kept=ckpt.find_checkpoint(run, "last")):
                if name == "last":  # what --resume needs; the one it replaces is kept as .last.prev
                    ckpt.save_checkpoint(run / name, model, optimizer, state_dict(), include_frozen=cfg.save_frozen,
                                         extra=hooks.state_tensors(), keep_previous=True)
                else:  # the network validation scored
                    scored = hooks.eval_model(model)
                    ckpt.save_checkpoint(run / name, scored, optimizer if scored is model else None, state_dict(),
                                         include_frozen=cfg.save_frozen)
            if name == "last" and not opened:
                drop_replaced(run)  # what --overwrite set aside: this run now has a checkpoint of its own
        distributed.barrier(info)

    def validate() -> None:
        nonlocal best, last_val
        if val_ds is None:
            return
        result = evaluate_model(hooks.eval_model(model), val_ds, batch_size=max(cfg.batch_size, 32), device=device,
                                progress=progress, cache=val_cache, dist=info, amp_dtype=amp_dtype)
        set_train_mode(model)
        last_val = result
        log.scalars(step, epoch, {f"val/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        for form, r in result["by_form"].items():
            log.scalars(step, epoch, {f"val_{form}/{k}": r[k] for k in ("mIoU", "oIoU", "PointM")})
        improved = best is None or not isinstance(best.get("mIoU"), (int, float)) or result["mIoU"] > best["mIoU"]
        if improved:
            best = {"step": step, **{k: v for k, v in result.items() if k != "by_form"}}
        save("last")
        if improved:
            save("best")
        if progress:
            from refseg.metrics import format_table

            print(f"\nstep {step}: val {cfg.val_split}\n{format_table(result)}", file=sys.stderr)

    # the loop
    from tqdm.auto import tqdm

    set_train_mode(model)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    cleanup.callback(bar.close)  # an error's message then starts on a line of its own
    running: Dict[str, float] = {}
    n_running, t_log, seen_log = 0, time.perf_counter(), 0
    loss_ema = None
    while step < total_steps:
        # the epoch's batches from `position` on (the sampler refuses a position outside the epoch)
        batches = [rows[b].tolist() for b in sampler.batches(epoch, start=position)]
        batch_views = [draw_views(b, views, flippable, train_ds.samples, (cfg.seed, epoch, position + i))
                       for i, b in enumerate(batches)]
        if use_cache:
            # the expressions too (a model's teacher_forcing may read them, e.g. SaG's word negatives)
            source = (cached_batch(b, v, train_cache, view_caches, view_texts, device)
                      for b, v in zip(batches, batch_views))
        else:
            loader = torch.utils.data.DataLoader(
                train_ds, batch_sampler=[list(zip(b, v)) for b, v in zip(batches, batch_views)],
                collate_fn=collate, num_workers=cfg.workers,
                generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            source = (to_step_batch(items, device) for items in loader)
        t0 = time.perf_counter()
        step_before = step
        for batch in source:
            lr = lr_at(step, cfg, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = hooks.prepare(batch, model)
            with autocast():
                out = step_module(batch)
                losses = loss_fn(out, batch)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
            else:
                grad_norm = float("nan")
            scaler.step(optimizer)
            scaler.update()
            hooks.after_step(step, total_steps, steps_per_epoch)
            step += 1
            position += 1
            if position >= steps_per_epoch:
                epoch, position = epoch + 1, 0

            # bookkeeping
            n = len(batch["image_index"]) * info.world_size
            seen_log += n
            values = {k: float(v.detach()) for k, v in losses.items()}
            for k, v in values.items():
                running[k] = running.get(k, 0.0) + v
            running["grad_norm"] = running.get("grad_norm", 0.0) + grad_norm
            n_running += 1
            loss_ema = values["loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * values["loss"]
            dt = time.perf_counter() - t0  # this step, its data included
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.4f}", sps=f"{n / max(dt, 1e-9):.1f}", refresh=False)
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t_log
                row = {f"train/{k}": v / n_running for k, v in running.items()}
                row.update({"train/lr": lr, "train/samples_per_s": seen_log / max(elapsed, 1e-9)})
                log.scalars(step, epoch, row)
                running, n_running, t_log, seen_log = {}, 0, time.perf_counter(), 0
            t_pause = time.perf_counter()
            validated = False
            if cfg.val_every and step % cfg.val_every == 0 and step < total_steps:
                validate()
                validated = True
            if cfg.save_every and step % cfg.save_every == 0 and not validated and step < total_steps:
                save("last")
            t0 = time.perf_counter()
            t_log += t0 - t_pause  # samples/s counts training time only
            paused += t0 - t_pause
            fitted = budget.after_step(step, total_steps, paused)
            if fitted != total_steps:
                if main_rank:
                    why = "budget spent" if fitted == step else f"{fitted} steps fit"
                    print(f"\ntime budget {cfg.time_budget:.0f} s: {why}; the run ends at step {fitted} "
                          f"(was {total_steps})", file=sys.stderr)
                total_steps = fitted
                bar.total = total_steps
                bar.refresh()
            if step >= total_steps:
                break
        if step == step_before:  # never loop without training: an epoch pass always runs a step
            raise RuntimeError(f"epoch {epoch} from batch {position} gave no batch to train on")
    bar.close()
    if val_ds is not None:
        validate()
    else:
        save("last")
    log.close()
    summary = {"run": str(run), "step": step, "total_steps": total_steps, "best": best, "val": last_val,
               "train_loss": loss_ema}
    distributed.barrier(info)
    distributed.shutdown()
    return summary


@contextmanager
def writing(path: Path, kept: Optional[Path] = None):
    """Turn an OS error (a full disk, no permission) raised inside into a one-line TrainError naming `path`
    (not a temporary file) and, when given, the complete checkpoint `kept` that is still in place."""
    try:
        yield
    except OSError as e:
        code = e.errno if e.errno is not None else (e.args[0] if len(e.args) == 1 else None)
        reason = e.strerror or (os.strerror(code) if isinstance(code, int) else str(e))
        keep = f"; {kept} is intact: free space, then continue with --resume {path.parent}" if kept else ""
        raise TrainError(f"cannot write {path}: {reason}{keep}") from None


def _jsonable(d: Dict[str, Any]) -> Dict[str, Any]:
    """NaN -> None, recursively, for JSON files."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out
