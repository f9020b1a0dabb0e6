"""The trainer: one run of the generic training loop (`refseg train`'s command line: engine/train_cli.py).

    refseg train --data data/synthref --batch-size 32 --max-steps 3000 --out runs/lts
    refseg train --config runs/lts/config.json --lr 1e-4 --out runs/lts-lr1e-4
    refseg train --resume runs/lts --max-steps 6000       # continue exactly where last/ stopped
    refseg train --overwrite --data D --out runs/lts ...   # start anew in a folder that holds a run
    refseg train --nproc 2 ...                             # = torchrun --nproc_per_node 2 -m refseg.cli train ...
    refseg train --accurate-fraction 0.1 --data D ...      # on the weak split of D (made in RUN/data)
    refseg train --method wrel --accurate-fraction 0.1 --data D ...   # LRB-WREL, three stages (refseg/methods/wrel/)

What a run does (`Trainer`, in the order `train` calls it):
1. setup_run: the device, the run folder (checked and locked), the checkpoint a resume continues from.
2. setup_data: the data (with `accurate_fraction`: the weak split of DATA, made in RUN/data), the model
   (`METHODS[model.name].build(**model.kwargs)`, seeded; `init_from` weights), the data sets
   (`RefSegDataset`, one item per sentence).
3. setup_cache: when both encoders are frozen (cache_features=auto), every image and sentence of the
   training split (each flip view too) and the validation subset encoded once into an fp16 cache
   (engine/cache.py); a step then only runs `model.decode`.
4. setup_optim: AdamW (no decay on biases and norms), the batch sampler, the schedule's length.
5. resume: the optimiser, RNG, position and best score of the checkpoint continued from.
6. fit: the steps (linear warm-up then cosine decay to min_lr, gradient clipping, autocast + GradScaler
   for fp16 on cuda, DistributedDataParallel under torchrun: gloo on CPU, NCCL on cuda; rank 0 alone
   logs and writes checkpoints), validation every val_every steps (RISMetrics; the best val mIoU's
   checkpoint in RUN/best/), RUN/last/ for --resume, log.csv and TensorBoard (RUN/tb).

The loop knows no method. A model's method adds training-only decode
arguments through its registry record (`Method.teacher_forcing`); a
multi-stage method (`model.method`, e.g. wrel) runs its stages
(`Method.train`), which call `train(cfg, model, data, extras=LoopExtras(...))`
to change what the loop samples, feeds and keeps (see LoopExtras).

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
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import random
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from refseg.data.augment import FLIP_CHOICES as FLIP_VIEWS
from refseg.data.augment import swap_directions
from refseg.engine import distributed
from refseg.engine.config import GRAD_CLIP, TRAIN_SPLIT, TrainConfig
from refseg.engine.optim import lr_at, make_optimizer, resolve_amp
from refseg.engine.runlog import RunLog
from refseg.engine.run_folder import TrainError, check_resume_config, choose_resume_point, drop_replaced, open_run
from refseg.engine.state import StateError


@dataclass
class LoopExtras:
    """What a training method's stage changes in the generic loop; every field is optional (None: nothing).

    repeats(sample) -> int: how many times a training sentence appears in each epoch (default 1).
    augmentable(sample) -> bool: whether --flip may show the sentence flipped (default True).
    prepare(batch) -> batch: the step's batch (cached: vis + txt; uncached: images + text) before the
        forward pass, e.g. text features swapped for stored ones.
    ema(step, total_steps, steps_per_epoch) -> momentum: keep an exponential moving average of the model
        (engine/ema.py), moved by this momentum after optimiser step `step` (0-based); RUN/last/ keeps it
        (ema.safetensors) for --resume.
    score_ema: validation scores, and RUN/best/ holds, the moving average instead of the model.
    """

    repeats: Optional[Callable[[Any], int]] = None
    augmentable: Optional[Callable[[Any], bool]] = None
    prepare: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    ema: Optional[Callable[[int, int, int], float]] = None
    score_ema: bool = False


# ---- pieces -------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def method_of(cfg: TrainConfig):
    """The registry entry (refseg.methods.METHODS) of cfg.model.name."""
    from refseg.methods import METHODS, MODELS

    if cfg.model.name not in MODELS:
        raise TrainError(f"unknown model {cfg.model.name!r}; known: {', '.join(sorted(MODELS))}")
    return METHODS[cfg.model.name]


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model cfg.model names, built by its factory with cfg.model.kwargs (image_size: cfg.data.size)."""
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("image_size", cfg.data.size)
    model = method_of(cfg).build(**kwargs)
    if model.image_size != cfg.data.size:
        raise TrainError(f"the model's image_size {model.image_size} differs from data.size (--size) {cfg.data.size}")
    return model


def loss_function(cfg: TrainConfig) -> Callable:
    """The training loss of cfg.model.name under cfg.data.supervision, with cfg.optim.loss_kwargs bound."""
    from refseg.methods import METHODS

    supervision, loss_kwargs = cfg.data.supervision, cfg.optim.loss_kwargs
    fn = method_of(cfg).losses.get(supervision)
    if fn is None:
        known = ", ".join(f"{m}/{s}" for m in sorted(METHODS) if METHODS[m].name == METHODS[m].model
                          for s in sorted(METHODS[m].losses))
        raise TrainError(f"no loss for model {cfg.model.name!r} with supervision {supervision!r} "
                         f"(known: {known})")
    name = fn.__name__
    if not loss_kwargs:
        return fn
    params = inspect.signature(fn).parameters
    unknown = sorted(k for k in loss_kwargs if k not in params or k in ("out", "batch"))
    if unknown:
        allowed = ", ".join(k for k in params if k not in ("out", "batch"))
        raise TrainError(f"optim.loss_kwargs (--loss-kwargs): {name} has no argument {', '.join(map(repr, unknown))} (it takes: {allowed})")
    return functools.partial(fn, **loss_kwargs)


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
    """RUN/data: the weak split of cfg.data.path at cfg.data.accurate_fraction (made, or reused when it matches)."""
    from refseg.data.weak import ensure_weak

    try:
        d = cfg.data
        return ensure_weak(d.path, run / "data", d.accurate_fraction, d.weak_seed,
                           split_by=d.split_by or "unc", images_dir=d.images)
    except FileExistsError as e:
        raise TrainError(str(e)) from None


def draw_views(batch_rows: List[int], views: Sequence[str], flippable: np.ndarray, samples,
               key: Tuple[int, ...]) -> List[str]:
    """The flip view of each sentence of a batch: one view per image, drawn uniformly from `views`
    (a pure function of `key` = (seed, epoch, batch index), so a resumed run draws the same), and
    "none" for sentences the method keeps unflipped (LoopExtras.augmentable)."""
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


# ---- the run ------------------------------------------------------------------------


def train(cfg: TrainConfig, model: Optional[nn.Module] = None, data=None,
          extras: Optional[LoopExtras] = None, opened: bool = False) -> Dict[str, Any]:
    """Run training as configured; returns {"run", "step", "total_steps", "best", "val", "train_loss"}.

    model / data: ready-built objects to use instead of building them from
    cfg.model / cfg.data (tests, notebooks); cfg still names them in config.json.
    extras: a training method's changes to the loop (LoopExtras). A config
    whose model.method is not plain, without extras, runs that method's
    stages (METHODS[method].run_stages), which call back here with their extras.
    opened: the caller (a method running this as one of its stages) has
    already checked and locked the run folder (open_run); otherwise this does.
    """
    if cfg.model.method != "plain" and extras is None:  # a multi-stage method runs its own stages
        from refseg.methods import METHODS

        return METHODS[cfg.model.method].run_stages(cfg, model, data)
    cfg.validate()
    with ExitStack() as cleanup:  # closes the progress bar and the log and unlocks the run, however it ends
        trainer = Trainer(cfg, extras or LoopExtras(), cleanup)
        trainer.setup_run(opened)
        trainer.setup_data(model, data)
        trainer.setup_cache()
        trainer.setup_optim()
        trainer.resume()
        return trainer.fit()


class Trainer:
    """One run of the generic loop; `train` calls its steps in order (setup_run, setup_data, setup_cache,
    setup_optim, resume, fit). Its attributes are the run's state: `step`, `epoch`, `position` (batch
    within the epoch), `total_steps`, `best` (the best validation's scores), `last_val`."""

    def __init__(self, cfg: TrainConfig, extras: LoopExtras, cleanup: ExitStack):
        self.cfg, self.extras, self.cleanup = cfg, extras, cleanup
        self.started = time.perf_counter()  # the time budget counts from here
        self.step = self.epoch = self.position = 0
        self.best: Optional[Dict[str, Any]] = None
        self.last_val: Dict[str, Any] = {}
        self.ema: Optional[nn.Module] = None
        self.paused = 0.0  # seconds spent validating and saving inside the loop

    # ---- setup ----------------------------------------------------------------

    def setup_run(self, opened: bool) -> None:
        """Device and threads, process group, the loss, the run folder (checked and locked unless `opened`),
        and the checkpoint a resume continues from (checked whole, and against this config)."""
        from refseg.engine import checkpoint as ckpt

        cfg = self.cfg
        info = distributed.env_info()
        self.device = resolve_device(cfg.run.device, info.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.info = info = distributed.init(self.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        elif info.enabled and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
        self.main = info.is_main
        self.progress = cfg.run.progress and self.main
        self.opened = opened
        self.loss_fn = loss_function(cfg)
        run = Path(cfg.run.out or f"runs/{cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}")
        self.run = Path(distributed.broadcast_object(str(run), info))
        if self.main and not opened:
            self.cleanup.callback(open_run(self.run, cfg).release)
        found = None
        if cfg.run.resume and self.main:
            folder, saved = choose_resume_point(Path(cfg.run.resume))
            if saved is not None:
                check_resume_config(cfg, saved["config"], folder / ckpt.STATE_JSON)
            found = None if folder is None else str(folder)
        if cfg.run.resume:
            found = distributed.broadcast_object(found, info)
        self.resume_from: Optional[Path] = None if found is None else Path(found)

    def setup_data(self, model: Optional[nn.Module], data) -> None:
        """The refer data (the weak split with accurate_fraction), the model (seeded, init_from weights),
        config.json, and the training and validation data sets."""
        from refseg.data.dataset import RefSegDataset

        cfg, d = self.cfg, self.cfg.data
        self.data = data if data is not None else self._load_data()
        if TRAIN_SPLIT not in self.data.splits():
            raise TrainError(f"no split {TRAIN_SPLIT!r} in {d.path} (splits: {', '.join(self.data.splits())})")
        seed_everything(cfg.run.seed)
        self.model = model if model is not None else build_model(cfg)
        self._init_weights()
        self.model.to(self.device)
        if self.main:
            self.run.mkdir(parents=True, exist_ok=True)
            if not cfg.run.resume:  # a resumed run rewrites it once its checkpoint has loaded
                self.save_config()
        distributed.barrier(self.info)
        self.train_ds = RefSegDataset(self.data, TRAIN_SPLIT, d.size, d.supervision)
        self.val_ds = None
        if d.val_split and d.val_split in self.data.splits():
            self.val_ds = RefSegDataset(self.data, d.val_split, d.size, "text")
            if cfg.run.val_max_samples:
                self.val_ds.samples = self.val_ds.samples[:cfg.run.val_max_samples]
        elif d.val_split and self.main:
            print(f"refseg train: no split {d.val_split!r} in {d.path}; training without validation",
                  file=sys.stderr)

    def _load_data(self):
        from refseg.data.refer import load_refer

        d = self.cfg.data
        path = d.path
        if d.accurate_fraction is not None:
            if self.main:
                weak_data_dir(self.cfg, self.run)
            distributed.barrier(self.info)
            path = self.run / "data"
        return load_refer(path, split_by=d.split_by, images_dir=d.images)

    def _init_weights(self) -> None:
        """model.init_from: start from those weights (a resumed run's last/ overrides them later)."""
        from refseg.engine import checkpoint as ckpt
        from refseg.hub import weights_path

        source = self.cfg.model.init_from
        if not source:
            return
        try:
            fresh = ckpt.init_weights(self.model, weights_path(source))
        except (ckpt.CheckpointError, FileNotFoundError) as e:
            raise TrainError(f"--init-from {source}: {e}") from None
        if self.progress:
            print(f"initialised from {source}"
                  + (f"; {len(fresh)} tensors it lacks start fresh: {', '.join(fresh[:6])}"
                     + (" ..." if len(fresh) > 6 else "") if fresh else ""), file=sys.stderr)

    def save_config(self) -> None:
        """RUN/config.json: the resolved config, nested, as `--config` reads it back."""
        with writing(self.run / "config.json"):
            self.cfg.updated(out=str(self.run), resume=None, overwrite=False).save(self.run / "config.json")

    def setup_cache(self) -> None:
        """The feature caches (train split, each flip view of it, validation subset) when the encoders are frozen."""
        from refseg.data.dataset import RefSegDataset
        from refseg.engine import cache as feature_cache

        cfg = self.cfg
        self.views = FLIP_VIEWS[cfg.data.flip]  # the flip views a training sentence is shown in (data/augment.py)
        self.use_cache = cfg.run.cache_features != "off" and feature_cache.encoders_frozen(self.model)
        if cfg.run.cache_features == "on" and not self.use_cache:
            raise TrainError("--cache-features on needs frozen encoders (their outputs need gradients)")
        self.train_cache = self.val_cache = None
        self.view_caches: Dict[str, Any] = {}  # flip view -> cache of the split seen that way
        if not self.use_cache:
            return
        self.cache_dir = cfg.run.cache_dir or (str(self.run / "cache") if self.info.enabled else None)
        t0 = time.perf_counter()
        self.train_cache = self._shared_cache(self.train_ds)
        self.val_cache = self._shared_cache(self.val_ds) if self.val_ds is not None else None
        for view in self.views[1:]:  # each flipped view of the train split: its own images encoded, its own texts
            d = cfg.data
            self.view_caches[view] = self._shared_cache(RefSegDataset(self.data, TRAIN_SPLIT, d.size,
                                                                      d.supervision, view=view))
        if self.progress:
            caches = [c for c in (self.train_cache, self.val_cache, *self.view_caches.values()) if c is not None]
            mb = sum(c.nbytes() for c in caches) / 2**20
            print(f"feature cache: {len(self.train_cache)} train sentences / {self.train_cache.meta['n_images']} "
                  f"images{f', {len(self.val_cache)} val sentences' if self.val_cache else ''}, {mb:.0f} MiB, "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def _shared_cache(self, ds):
        """The cache of `ds`: rank 0 builds it (or finds it in cache_dir), the other ranks then read it."""
        from refseg.engine import cache as feature_cache

        cache = None
        if self.main:
            cache = feature_cache.get_cache(self.model, ds, self.device, self.cache_dir,
                                            workers=self.cfg.run.workers, progress=self.progress)
        distributed.barrier(self.info)
        if not self.main:
            cache = feature_cache.get_cache(self.model, ds, self.device, self.cache_dir, build=False)
        return cache

    def setup_optim(self) -> None:
        """Optimiser, precision, the rows trained on (with a method's repeats), the sampler, the schedule's
        length, and the moving average a method asks for."""
        from refseg.engine.ema import ema_copy
        from refseg.engine.sampler import GroupBatchSampler

        cfg, o, samples = self.cfg, self.cfg.optim, self.train_ds.samples
        self.optimizer = make_optimizer(self.model, o)
        self.amp_dtype = resolve_amp(o.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16
                                           and self.device.type == "cuda")
        rows = subset_rows(samples, cfg.data.train_subset)  # data set indices trained on
        if self.extras.repeats is not None:  # a method's oversampling: rows listed repeatedly
            rows = np.repeat(rows, np.array([self.extras.repeats(samples[r]) for r in rows], dtype=np.int64))
        self.rows = rows
        # each view's expressions, by data set row (= cache row): what the cached path feeds the step
        self.view_texts = {view: [swap_directions(s.text, view) for s in samples] for view in self.views}
        may_flip = self.extras.augmentable or (lambda sample: True)
        self.flippable = np.array([may_flip(s) for s in samples], dtype=bool)
        self.sampler = GroupBatchSampler([samples[r].image_id for r in rows], o.batch_size, o.images_per_batch,
                                         seed=cfg.run.seed, rank=self.info.rank, world_size=self.info.world_size,
                                         ref_ids=[samples[r].ref_id for r in rows] if cfg.data.group_refs else None)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            subset = cfg.data.train_subset
            raise TrainError(f"split {TRAIN_SPLIT!r} has no sentences"
                             + (f" in subset {subset!r}" if subset != "all" else ""))
        self.total_steps = o.max_steps or o.epochs * self.steps_per_epoch
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.extras.ema is not None:
            self.ema = ema_copy(self.model)

    def resume(self) -> None:
        """With --resume: the weights, optimiser, RNG, position and best score of the checkpoint chosen in
        setup_run (none: the run starts over at step 0); config.json rewritten. Then the time budget."""
        cfg = self.cfg
        if cfg.run.resume:
            if self.resume_from is None:  # stopped before its first checkpoint: the run starts over, as it first did
                if self.main:
                    print(f"no complete checkpoint in {cfg.run.resume} yet: starting at step 0", file=sys.stderr)
            else:
                self._load_checkpoint(self.resume_from)
            if self.main:
                self.save_config()
        self.budget = TimeBudget(cfg.optim.time_budget, self.started, cfg.optim.warmup_steps, self.info, self.step)

    def _load_checkpoint(self, found: Path) -> None:
        from refseg.engine import checkpoint as ckpt

        state = ckpt.load_training_state(found, self.model, self.optimizer, restore_rng=True)
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best = state.get("best")
        saved_epoch = state.get("steps_per_epoch", self.steps_per_epoch)
        if saved_epoch != self.steps_per_epoch or self.position >= self.steps_per_epoch:
            raise StateError(f"{found / ckpt.STATE_JSON}: saved at batch {self.position} of an epoch of {saved_epoch} "
                             f"batches, but the training data and batch settings now give {self.steps_per_epoch} "
                             "batches per epoch: resume with the data it was trained on")
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            ckpt.load_weights(self.ema, ckpt.load_extra(found, "ema"), source=f"{found}/ema.safetensors")
        if self.cfg.optim.time_budget and state.get("total_steps"):  # the length the budget chose
            self.total_steps = int(state["total_steps"])
        if self.progress:
            print(f"resumed from {found} at step {self.step} (epoch {self.epoch}, batch {self.position})",
                  file=sys.stderr)

    # ---- the loop ---------------------------------------------------------------

    def fit(self) -> Dict[str, Any]:
        """Train from the current step to total_steps, validating and saving on the way and at the end;
        returns the summary."""
        from tqdm.auto import tqdm

        step_module: nn.Module = StepModule(self.model)
        if self.info.enabled:
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_module = step_module
        self.log = RunLog(self.run, self.main)
        self.cleanup.callback(self.log.close)
        self.stats = RunningStats(self.log, self.info.world_size)
        set_train_mode(self.model)
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                        disable=not self.progress, dynamic_ncols=True)
        self.cleanup.callback(self.bar.close)  # an error's message then starts on a line of its own
        while self.step < self.total_steps:
            step_before = self.step
            self.t0 = time.perf_counter()
            for batch in self.batches():
                self.train_step(batch)
                self.between_steps()
                if self.step >= self.total_steps:
                    break
            if self.step == step_before:  # never loop without training: an epoch pass always runs a step
                raise RuntimeError(f"epoch {self.epoch} from batch {self.position} gave no batch to train on")
        self.bar.close()
        if self.val_ds is not None:
            self.validate()
        else:
            self.save("last")
        self.log.close()
        summary = {"run": str(self.run), "step": self.step, "total_steps": self.total_steps, "best": self.best,
                   "val": self.last_val, "train_loss": self.stats.loss_ema}
        distributed.barrier(self.info)
        distributed.shutdown()
        return summary

    def batches(self):
        """The step batches of the current epoch from `position` on (the sampler refuses a position outside
        the epoch), each sentence in its drawn flip view; cached or through a DataLoader."""
        from refseg.data.dataset import collate

        cfg, epoch = self.cfg, self.epoch
        batches = [self.rows[b].tolist() for b in self.sampler.batches(epoch, start=self.position)]
        views = [draw_views(b, self.views, self.flippable, self.train_ds.samples, (cfg.run.seed, epoch, self.position + i))
                 for i, b in enumerate(batches)]
        if self.use_cache:
            # the expressions too (a model's teacher_forcing may read them, e.g. SaG's word negatives)
            return (cached_batch(b, v, self.train_cache, self.view_caches, self.view_texts, self.device)
                    for b, v in zip(batches, views))
        loader = torch.utils.data.DataLoader(
            self.train_ds, batch_sampler=[list(zip(b, v)) for b, v in zip(batches, views)],
            collate_fn=collate, num_workers=cfg.run.workers,
            generator=torch.Generator().manual_seed(cfg.run.seed * 100003 + epoch))
        return (to_step_batch(items, self.device) for items in loader)

    def train_step(self, batch: Dict[str, Any]) -> None:
        """One optimiser step on `batch` (the method's prepare first), the moving average moved, the
        position advanced, the step's figures recorded."""
        o = self.cfg.optim
        lr = lr_at(self.step, o, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.extras.prepare is not None:
            batch = self.extras.prepare(batch)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            out = self.step_module(batch)
            losses = self.loss_fn(out, batch)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: loss is {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, GRAD_CLIP))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            from refseg.engine.ema import ema_update

            ema_update(self.ema, self.model, self.extras.ema(self.step, self.total_steps, self.steps_per_epoch))
        self.step += 1
        self.position += 1
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        n = len(batch["image_index"]) * self.info.world_size
        loss_ema = self.stats.add({k: float(v.detach()) for k, v in losses.items()}, grad_norm, n)
        dt = time.perf_counter() - self.t0  # this step, its data included
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss_ema:.4f}", sps=f"{n / max(dt, 1e-9):.1f}", refresh=False)
        if self.step % self.cfg.run.log_every == 0 or self.step == self.total_steps:
            self.stats.write(self.step, self.epoch, lr)

    def between_steps(self) -> None:
        """Validation and saving when due, then the time budget's say on the run's length; the time spent
        here is left out of the step rate."""
        r, step = self.cfg.run, self.step
        t_pause = time.perf_counter()
        validated = False
        if r.val_every and step % r.val_every == 0 and step < self.total_steps:
            self.validate()
            validated = True
        if r.save_every and step % r.save_every == 0 and not validated and step < self.total_steps:
            self.save("last")
        self.t0 = time.perf_counter()
        self.stats.pause(self.t0 - t_pause)  # samples/s counts training time only
        self.paused += self.t0 - t_pause
        fitted = self.budget.after_step(step, self.total_steps, self.paused)
        if fitted != self.total_steps:
            if self.main:
                why = "budget spent" if fitted == step else f"{fitted} steps fit"
                print(f"\ntime budget {self.cfg.optim.time_budget:.0f} s: {why}; the run ends at step {fitted} "
                      f"(was {self.total_steps})", file=sys.stderr)
            self.total_steps = fitted
            self.bar.total = fitted
            self.bar.refresh()

    # ---- validation and checkpoints -----------------------------------------------------

    def scored(self) -> nn.Module:
        """The network validation scores and RUN/best/ holds: the model, or its moving average (score_ema)."""
        return self.ema if self.extras.score_ema and self.ema is not None else self.model

    def validate(self) -> None:
        """Score the validation subset, log it, save last/ (and best/ on a better mIoU)."""
        from refseg.engine.evaluate_core import evaluate_model

        if self.val_ds is None:
            return
        result = evaluate_model(self.scored(), self.val_ds, batch_size=max(self.cfg.optim.batch_size, 32),
                                device=self.device, progress=self.progress, cache=self.val_cache, dist=self.info,
                                amp_dtype=self.amp_dtype)
        set_train_mode(self.model)
        self.last_val = result
        self.log.scalars(self.step, self.epoch, {f"val/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        for form, r in result["by_form"].items():
            self.log.scalars(self.step, self.epoch, {f"val_{form}/{k}": r[k] for k in ("mIoU", "oIoU", "PointM")})
        best = self.best
        improved = best is None or not isinstance(best.get("mIoU"), (int, float)) or result["mIoU"] > best["mIoU"]
        if improved:
            self.best = {"step": self.step, **{k: v for k, v in result.items() if k != "by_form"}}
        self.save("last")
        if improved:
            self.save("best")
        if self.progress:
            from refseg.metrics import format_table

            print(f"\nstep {self.step}: val {self.cfg.data.val_split}\n{format_table(result)}", file=sys.stderr)

    def state_dict(self) -> Dict[str, Any]:
        """state.json of a checkpoint: the position, the schedule, the scaler, the scores, the config (nested)."""
        step, total = self.step, self.total_steps
        return {"step": step, "epoch": self.epoch, "position": self.position, "total_steps": total,
                "scheduler": {"kind": "warmup_cosine", "step": step,
                              "lr": lr_at(min(step, total - 1), self.cfg.optim, total)},
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "best": _jsonable(self.best or {}) or None, "val": _jsonable(self.last_val),
                "config": self.cfg.to_dict(), "steps_per_epoch": self.steps_per_epoch}

    def save(self, name: str) -> None:
        """RUN/last (model, optimiser, moving average: what --resume needs; the one it replaces kept as
        .last.prev) or RUN/best (the network validation scored)."""
        from refseg.engine import checkpoint as ckpt
        from refseg.engine.ema import own_state

        run, frozen = self.run, self.cfg.run.save_frozen
        if self.main:
            with writing(run / name, kept=ckpt.find_checkpoint(run, "last")):
                if name == "last":
                    extra = {"ema": own_state(self.ema)} if self.ema is not None else {}
                    ckpt.save_checkpoint(run / name, self.model, self.optimizer, self.state_dict(),
                                         include_frozen=frozen, extra=extra, keep_previous=True)
                else:
                    scored = self.scored()
                    ckpt.save_checkpoint(run / name, scored, self.optimizer if scored is self.model else None,
                                         self.state_dict(), include_frozen=frozen)
            if name == "last" and not self.opened:
                drop_replaced(run)  # what --overwrite set aside: this run now has a checkpoint of its own
        distributed.barrier(self.info)


class RunningStats:
    """The training figures between two log rows (their means, the samples per second of training time),
    and the smoothed loss the progress bar shows."""

    def __init__(self, log: RunLog, world_size: int):
        self.log, self.world_size = log, world_size
        self.loss_ema: Optional[float] = None
        self._reset()

    def _reset(self) -> None:
        self.sums: Dict[str, float] = {}
        self.n, self.samples, self.t = 0, 0, time.perf_counter()

    def add(self, values: Dict[str, float], grad_norm: float, samples: int) -> float:
        """Record one step's losses; returns the smoothed loss."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm
        self.n += 1
        self.samples += samples
        loss = values["loss"]
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        return self.loss_ema

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (validation, saving) out of the rate."""
        self.t += seconds

    def write(self, step: int, epoch: int, lr: float) -> None:
        elapsed = time.perf_counter() - self.t
        row = {f"train/{k}": v / self.n for k, v in self.sums.items()}
        row.update({"train/lr": lr, "train/samples_per_s": self.samples / max(elapsed, 1e-9)})
        self.log.scalars(step, epoch, row)
        self._reset()


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
