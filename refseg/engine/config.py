"""TrainConfig: every setting of `refseg train`, one comment per field.

The command-line flags are derived from the dataclass (`batch_size` ->
`--batch-size`, the field's comment -> its help), a `--config FILE` (JSON or
YAML holding a subset of the fields) sets a base, and flags given on the
command line override it. The resolved config is written as
`RUN/config.json` beside each run, which `--config` reads back unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
CACHE_CHOICES = ("auto", "on", "off")
SUPERVISION_CHOICES = ("full", "click", "text")
METHOD_CHOICES = ("plain", "wrel")
SUBSET_CHOICES = ("all", "accurate")
WREL_FINAL_CHOICES = ("teacher", "student")
WREL_EMA_RESCALE_CHOICES = ("horizon", "breaks")
WREL_BANK_SITE_CHOICES = ("encoder", "features")  # refseg/methods/wrel/bank.py SITES
FLIP_CHOICES = ("none", "h", "hv", "hvt")  # data/augment.py FLIP_CHOICES


class ConfigError(ValueError):
    """A config file or value that does not describe a TrainConfig; the message names the file or field."""


@dataclass
class TrainConfig:
    # model
    model: str = "lts"  # a model name in refseg.methods.METHODS
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the model factory (JSON on the command line)
    init_from: Optional[str] = None  # start from these weights (a shipped model name, checkpoint or run folder, .safetensors): fine-tuning; parameters the file lacks (e.g. a head switched on by model_kwargs) keep their fresh init
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the training loss, e.g. term weights (JSON on the command line; see refseg/methods/<model>/loss.py)
    # data
    data: str = ""  # refer-format folder holding refs(<split_by>).p and instances.json
    split_by: Optional[str] = None  # refs file to read: unc, google, umd (None = the only one present)
    images: Optional[str] = None  # images folder (None = DATA/images)
    train_split: str = "train"  # split trained on
    val_split: str = "val"  # split validated on ("" = no validation)
    size: int = 320  # letterbox side, pixels
    supervision: str = "full"  # training signal: full (masks), click, text
    train_subset: str = "all"  # sentences of train_split trained on: all, or accurate (refs not marked weak by refseg weaken)
    accurate_fraction: Optional[float] = None  # first make the weak-expression split of DATA (refseg weaken, this share p of accurate train refs) in RUN/data and train on it (None = DATA as it is)
    weak_seed: int = 0  # seed of refseg weaken's per-category choice (with accurate_fraction)
    # batching and length
    batch_size: int = 32  # sentences per optimiser step, summed over all processes
    images_per_batch: int = 8  # distinct images per batch; their sentences share one visual encoding (0 = sentences drawn independently)
    group_refs: bool = False  # keep the sentences of one ref in the same batch (whole refs per image chunk; see engine/sampler.py): SaG's w_distill term learns from such pairs
    flip: str = "none"  # flip augmentation, the direction words of the expression swapped to match (data/augment.py): none, h (left-right mirrors; natural photos), hv (also top-bottom mirrors and half turns; aerial scenes) or hvt (all eight symmetries of the square: also quarter turns and transposes; aerial scenes); each sentence is seen in one view drawn uniformly per epoch
    epochs: int = 10  # passes over the training sentences (ignored when max_steps > 0)
    max_steps: int = 0  # optimiser steps to run (0 = epochs x steps per epoch)
    time_budget: float = 0.0  # wall-clock seconds from the start of the run (cache building included) to its last step (0 = none): the run measures its step rate during warm-up, shortens the schedule to fit, and stops at the budget in any case
    # method
    method: str = "plain"  # plain (one model, the loop below) or wrel (LRB-WREL: teacher, reference bank, EMA student; refseg/methods/wrel/)
    wrel_teacher_steps: int = 0  # wrel stage 1 (teacher on the accurate refs) optimiser steps (0 = as max_steps / epochs)
    wrel_bank_prompts: int = 20  # wrel stage 2: learnable prompt vectors per weak ref, placed after the class-name tokens
    wrel_bank_site: str = "features"  # wrel stage 2: where the prompts enter: features (extra tokens of the frozen text encoder's output; a step costs the head only) or encoder (word embeddings read by the text encoder)
    wrel_bank_iters: int = 10  # wrel stage 2: Adam steps spent on each weak ref's prompts
    wrel_bank_lr: float = 0.01  # wrel stage 2: Adam learning rate of the prompts
    wrel_bank_batch: int = 0  # wrel stage 2: weak refs optimised together (0 = batch_size)
    wrel_ema_epochs: float = 40.0  # wrel stage 3: length in epochs of the run the EMA schedule (epochs 0-1-3) is written for; shorter runs squeeze it
    wrel_ema_rescale: str = "horizon"  # wrel stage 3, a run shorter than wrel_ema_epochs: horizon (breakpoints squeezed and each 1 - momentum scaled up by the same factor, so the EMA averages over the same fraction of the run) or breaks (breakpoints squeezed, momenta as written)
    wrel_accurate_repeat: int = 1  # wrel stage 3: each accurate sentence appears this many times per epoch, weak ones once (1 = the mixed data as they are)
    wrel_final: str = "teacher"  # wrel stage 3: the network validated, kept in best/ and shipped: teacher (the EMA) or student
    # optimisation
    lr: float = 3e-4  # AdamW peak learning rate
    min_lr: float = 3e-6  # learning rate at the end of the cosine decay
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not applied to biases and norms)
    warmup_steps: int = 200  # linear warm-up from 0 to lr, steps
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    amp: str = "auto"  # mixed precision: auto (bf16, or fp16 + GradScaler, only on cuda), off, bf16, fp16
    # machine
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...
    threads: int = 0  # torch CPU threads per process (0 = torch's default, split between processes)
    workers: int = 0  # DataLoader worker processes for the uncached path
    cache_features: str = "auto"  # precompute frozen encoder features: auto (when both encoders are frozen), on, off
    cache_dir: Optional[str] = None  # keep the feature cache memory-mapped here, reused across runs (None = in memory; RUN/cache with several processes)
    # validation, logging, checkpoints
    val_every: int = 500  # validate every this many steps, and at the end (0 = only at the end)
    val_max_samples: int = 1000  # validate on the first this many sentences of val_split (0 = all)
    log_every: int = 10  # write train metrics to log.csv / TensorBoard every this many steps
    save_every: int = 0  # write RUN/last every this many steps (0 = at each validation and at the end)
    save_frozen: bool = False  # also store the frozen encoders' weights (always done for randomly initialised ones)
    progress: bool = True  # show a tqdm progress bar
    seed: int = 0  # seed of the model init, data order and dropout
    out: str = ""  # run folder (default runs/<model>-<date>-<time>)
    resume: Optional[str] = None  # run folder to continue from its last/ checkpoint
    overwrite: bool = False  # train anew into an --out that already holds a run (refused without this or --resume): the old run is renamed aside in one step (.<name>.replaced-* beside it) and deleted only once the new run has saved its first complete checkpoint

    def validate(self) -> "TrainConfig":
        """Raise ConfigError (a ValueError) on an inconsistent config; return self."""
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.cache_features not in CACHE_CHOICES:
            raise ConfigError(f"cache_features must be one of {CACHE_CHOICES}, got {self.cache_features!r}")
        if self.supervision not in SUPERVISION_CHOICES:
            raise ConfigError(f"supervision must be one of {SUPERVISION_CHOICES}, got {self.supervision!r}")
        for name, choices in (("method", METHOD_CHOICES), ("train_subset", SUBSET_CHOICES),
                              ("wrel_final", WREL_FINAL_CHOICES), ("wrel_ema_rescale", WREL_EMA_RESCALE_CHOICES), ("wrel_bank_site", WREL_BANK_SITE_CHOICES),
                              ("flip", FLIP_CHOICES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.accurate_fraction is not None and not 0.0 <= self.accurate_fraction <= 1.0:
            raise ConfigError(f"accurate_fraction must be in [0, 1], got {self.accurate_fraction}")
        if self.method == "wrel" and self.supervision != "full":
            raise ConfigError(f"method wrel trains with full masks, got supervision {self.supervision!r}")
        for name in ("wrel_bank_prompts", "wrel_bank_iters", "wrel_accurate_repeat"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.wrel_bank_lr <= 0 or self.wrel_ema_epochs <= 0:
            raise ConfigError("wrel_bank_lr and wrel_ema_epochs must be positive")
        for name in ("batch_size", "size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("images_per_batch", "epochs", "max_steps", "warmup_steps", "threads", "workers",
                     "val_every", "val_max_samples", "log_every", "save_every", "wrel_teacher_steps", "wrel_bank_batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "time_budget"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("set epochs or max_steps")
        from refseg.argtypes import MAX_THREADS, check_device

        if self.threads > MAX_THREADS:
            raise ConfigError(f"threads must be at most {MAX_THREADS}, got {self.threads}")
        try:
            check_device(self.device)
        except ValueError as e:
            raise ConfigError(f"device: {e}") from None
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        if not isinstance(self.loss_kwargs, dict):
            raise ConfigError(f"loss_kwargs must be a dict, got {type(self.loss_kwargs).__name__}")
        return self

    # ---- serialisation -------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Build from a mapping of field names; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - names)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in d.items()})

    def save(self, path: Union[str, Path]) -> None:
        """Write JSON (or YAML when the name ends in .yaml / .yml), atomically (temp file + rename)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = _yaml().safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_text_atomic(path, text)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TrainConfig":
        return from_file_values(cls, read_config_file(path), path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: never a half-written file
    (refseg.outputs.write_text; the mode follows the umask)."""
    from refseg.outputs import write_text

    write_text(path, text)


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """A JSON or YAML file (chosen by suffix; JSON otherwise) -> dict; ConfigError names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix in (".yaml", ".yml"):
        yaml = _yaml()
        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of TrainConfig fields, got {type(d).__name__}")
    return d


def from_file_values(cls, values: Dict[str, Any], path: Union[str, Path]):
    """cls.from_dict(values), with the file named in the error."""
    try:
        return cls.from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ConfigError("YAML config files need PyYAML (pip install pyyaml); JSON works without it") from None
    return yaml


# ---- CLI flags derived from the dataclass -----------------------------------


def field_comments(cls=TrainConfig) -> Dict[str, str]:
    """{field name: its trailing `# comment`} read from the class source ({} if unavailable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for m in map(pattern.match, source.splitlines()) if m}


def _base_type(cls, name: str):
    """The field's type with Optional[...] stripped, and whether None is allowed."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _coerce(cls, name: str, value):
    """Check / convert a value read from a file to the field's type."""
    base, optional = _base_type(cls, name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"TrainConfig.{name} may not be null")
    origin = typing.get_origin(base) or base
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"TrainConfig.{name} must be a mapping, got {value!r}")
        return dict(value)
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"TrainConfig.{name} must be true or false, got {value!r}")
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (int, float, str) and (not isinstance(value, origin) or isinstance(value, bool)):
        raise ConfigError(f"TrainConfig.{name} must be {origin.__name__}, got {value!r}")
    return value


def _parse_json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"dim\": 128}}': {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _optional(base):
    """Parser of an Optional[base] flag: "", none, null -> None, else base(text)."""

    def parse(text: str):
        return None if text.lower() in ("", "none", "null") else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


CHOICES = {"amp": AMP_CHOICES, "cache_features": CACHE_CHOICES, "supervision": SUPERVISION_CHOICES,
           "method": METHOD_CHOICES, "train_subset": SUBSET_CHOICES, "wrel_final": WREL_FINAL_CHOICES,
           "wrel_ema_rescale": WREL_EMA_RESCALE_CHOICES, "wrel_bank_site": WREL_BANK_SITE_CHOICES,
           "flip": FLIP_CHOICES}


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field. Defaults are suppressed, so that the parsed
    namespace holds only the flags actually given (they override --config)."""
    comments = field_comments(cls)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON or YAML file of TrainConfig fields; flags given here override it")
    group = parser.add_argument_group("training config (TrainConfig fields)")
    defaults = cls()
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{comments.get(f.name, '')} [default: {json.dumps(default)}]".strip()
        base, optional = _base_type(cls, f.name)
        origin = typing.get_origin(base) or base
        kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if origin is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if origin is dict:
            kw.update(type=_parse_json_dict, metavar="JSON")
        elif optional:
            kw.update(type=_optional(origin), metavar=f.name.upper())
        else:
            kw.update(type=origin, metavar=f.name.upper())
        if f.name in CHOICES:
            kw.update(choices=CHOICES[f.name], metavar=None)
        group.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None, cls=TrainConfig) -> TrainConfig:
    """defaults <- `base` (e.g. a resumed run's config) <- --config FILE <- flags given on the command line."""
    values: Dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        file_values = read_config_file(args.config)
        from_file_values(cls, file_values, args.config)  # unknown keys and wrong types, named with the file
        values.update(file_values)
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls.from_dict(values).validate()
