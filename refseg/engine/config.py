"""TrainConfig: every setting of `refseg train`, in sections, one comment per field.

    model:  {name: lts, method: plain, kwargs: {text_depth: 2}, init_from: null}
    data:   {path: data/synthref, supervision: full, size: 320, flip: none, ...}
    optim:  {batch_size: 32, max_steps: 4500, lr: 3.0e-4, loss_kwargs: {w_locate: 0.5}, ...}
    run:    {device: auto, seed: 0, val_every: 500, out: runs/lts, ...}
    wrel:   {bank_lr: 0.01, ...}      # a training method's own section (METHODS[name].options)

Every field is also a command-line flag named by its flat name (`optim.lr`
-> `--lr`, `data.path` -> `--data`, `model.kwargs` -> `--model-kwargs`,
`wrel.bank_lr` -> `--wrel-bank-lr`; FLAT lists them all); the field's
comment is its help. `--config FILE` (JSON or YAML, nested as above, or the
flat mapping of flag names that earlier run folders and model cards hold)
sets a base, and flags given on the command line override it. The resolved
config is written, nested, as `RUN/config.json`, which `--config` reads
back unchanged.
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
from typing import Any, Dict, Optional, Tuple, Union

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
CACHE_CHOICES = ("auto", "on", "off")
SUPERVISION_CHOICES = ("full", "click", "text")
SUBSET_CHOICES = ("all", "accurate")
FLIP_CHOICES = ("none", "h", "hv", "hvt")  # data/augment.py FLIP_CHOICES


class ConfigError(ValueError):
    """A config file or value that does not describe a TrainConfig; the message names the file or field."""


@dataclass
class ModelSection:
    name: str = "lts"  # a model name in refseg.methods.METHODS
    method: str = "plain"  # plain (one model, the generic loop) or a multi-stage training method of METHODS, e.g. wrel (LRB-WREL: teacher, reference bank, EMA student; refseg/methods/wrel/)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the model factory, checked by the method's config class (JSON on the command line)
    init_from: Optional[str] = None  # start from these weights (a shipped model name, checkpoint or run folder, .safetensors): fine-tuning; parameters the file lacks (e.g. a head switched on by kwargs) keep their fresh init


@dataclass
class DataSection:
    path: str = ""  # refer-format folder holding refs(<split_by>).p and instances.json
    split_by: Optional[str] = None  # refs file to read: unc, google, umd (None = the only one present)
    images: Optional[str] = None  # images folder (None = DATA/images)
    val_split: str = "val"  # split validated on ("" = no validation)
    size: int = 320  # letterbox side, pixels
    supervision: str = "full"  # training signal: full (masks), click, text
    train_subset: str = "all"  # sentences of train_split trained on: all, or accurate (refs not marked weak by refseg weaken)
    accurate_fraction: Optional[float] = None  # first make the weak-expression split of DATA (refseg weaken, this share p of accurate train refs) in RUN/data and train on it (None = DATA as it is)
    weak_seed: int = 0  # seed of refseg weaken's per-category choice (with accurate_fraction)
    flip: str = "none"  # flip augmentation, the direction words of the expression swapped to match (data/augment.py): none, h (left-right mirrors; natural photos), hv (also top-bottom mirrors and half turns; aerial scenes) or hvt (all eight symmetries of the square: also quarter turns and transposes; aerial scenes); each sentence is seen in one view drawn uniformly per epoch
    group_refs: bool = False  # keep the sentences of one ref in the same batch (whole refs per image chunk; see engine/sampler.py): SaG's w_distill term learns from such pairs


@dataclass
class OptimSection:
    batch_size: int = 32  # sentences per optimiser step, summed over all processes
    images_per_batch: int = 8  # distinct images per batch; their sentences share one visual encoding (0 = sentences drawn independently)
    epochs: int = 10  # passes over the training sentences (ignored when max_steps > 0)
    max_steps: int = 0  # optimiser steps to run (0 = epochs x steps per epoch)
    time_budget: float = 0.0  # wall-clock seconds from the start of the run (cache building included) to its last step (0 = none): the run measures its step rate during warm-up, shortens the schedule to fit, and stops at the budget in any case
    lr: float = 3e-4  # AdamW peak learning rate
    min_lr: float = 3e-6  # learning rate at the end of the cosine decay
    warmup_steps: int = 200  # linear warm-up from 0 to lr, steps
    amp: str = "auto"  # mixed precision: auto (bf16, or fp16 + GradScaler, only on cuda), off, bf16, fp16
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the training loss, e.g. term weights (JSON on the command line; see refseg/methods/<model>/loss.py)


@dataclass
class RunSection:
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...
    threads: int = 0  # torch CPU threads per process (0 = torch's default, split between processes)
    workers: int = 0  # DataLoader worker processes for the uncached path
    cache_features: str = "auto"  # precompute frozen encoder features: auto (when both encoders are frozen), on, off
    cache_dir: Optional[str] = None  # keep the feature cache memory-mapped here, reused across runs (None = in memory; RUN/cache with several processes)
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


SECTIONS: Dict[str, type] = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection}
RENAMED = {("model", "name"): "model", ("model", "kwargs"): "model_kwargs", ("data", "path"): "data"}  # flat names
CHOICES = {("model", "method"): None, ("data", "supervision"): SUPERVISION_CHOICES,
           ("data", "train_subset"): SUBSET_CHOICES, ("data", "flip"): FLIP_CHOICES, ("optim", "amp"): AMP_CHOICES,
           ("run", "cache_features"): CACHE_CHOICES}  # None: filled from the registry (method_choices)
# flat fields of earlier versions that no longer exist, with the only value a flat file may still give them
RETIRED: Dict[str, Any] = {"train_split": "train", "weight_decay": 0.01, "grad_clip": 1.0}
TRAIN_SPLIT = "train"  # the split trained on
WEIGHT_DECAY = 0.01  # AdamW decoupled weight decay (not applied to biases and norms)
GRAD_CLIP = 1.0  # max global gradient norm


def method_sections() -> Dict[str, type]:
    """{method name: its section's class} of the training methods with options (METHODS[name].options)."""
    from refseg.methods import METHODS

    return {name: m.options for name, m in METHODS.items() if m.options is not None}


def method_choices() -> Tuple[str, ...]:
    """model.method's values: plain, and every multi-stage method of the registry."""
    from refseg.methods import METHODS

    return ("plain",) + tuple(sorted(name for name, m in METHODS.items() if m.train is not None))


def all_sections() -> Dict[str, type]:
    return {**SECTIONS, **method_sections()}


def flat_fields() -> Dict[str, Tuple[str, str]]:
    """{flat name (the flag without --, as earlier flat files spell it): (section, field)}, in flag order."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            out[RENAMED.get((section, f.name), f.name)] = (section, f.name)
    for section, cls in method_sections().items():
        for f in dataclasses.fields(cls):
            out[f"{section}_{f.name}"] = (section, f.name)
    return out


def flag_of(section: str, name: str) -> str:
    """The command-line flag of a field: ("optim", "lr") -> "--lr"."""
    flat = {v: k for k, v in flat_fields().items()}[(section, name)]
    return "--" + flat.replace("_", "-")


def field_name(section: str, name: str) -> str:
    """How messages name a field: "optim.lr (--lr)"."""
    return f"{section}.{name} ({flag_of(section, name)})"


def _method_sections_default() -> Dict[str, Any]:
    return {name: cls() for name, cls in method_sections().items()}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)  # what is trained
    data: DataSection = field(default_factory=DataSection)  # what it is trained on
    optim: OptimSection = field(default_factory=OptimSection)  # batches, schedule, optimiser, loss weights
    run: RunSection = field(default_factory=RunSection)  # the machine, validation, logging, checkpoints
    methods: Dict[str, Any] = field(default_factory=_method_sections_default)  # method name -> its own section (written as top-level sections)

    def section(self, name: str):
        """The section `name` (model, data, optim, run, or a method's)."""
        return self.methods[name] if name in self.methods else getattr(self, name)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError (a ValueError) naming the field (`section.field (--flag)`) of an inconsistent
        config; return self."""
        m, d, o, r = self.model, self.data, self.optim, self.run
        choices = {**CHOICES, ("model", "method"): method_choices()}
        for (section, name), allowed in choices.items():
            if getattr(self.section(section), name) not in allowed:
                raise ConfigError(f"{field_name(section, name)} must be one of {allowed}, "
                                  f"got {getattr(self.section(section), name)!r}")
        if d.accurate_fraction is not None and not 0.0 <= d.accurate_fraction <= 1.0:
            raise ConfigError(f"{field_name('data', 'accurate_fraction')} must be in [0, 1], got {d.accurate_fraction}")
        if m.method != "plain" and d.supervision != "full":
            raise ConfigError(f"method {m.method} trains with full masks, got supervision {d.supervision!r}")
        positive = [("data", "size"), ("optim", "batch_size")]
        at_least_0 = [("optim", n) for n in ("images_per_batch", "epochs", "max_steps", "warmup_steps")] + \
                     [("run", n) for n in ("threads", "workers", "val_every", "val_max_samples", "log_every",
                                           "save_every")]
        for section, name in positive + at_least_0:
            value, low = getattr(self.section(section), name), 1 if (section, name) in positive else 0
            if value < low:
                raise ConfigError(f"{field_name(section, name)} must be {'positive' if low else '>= 0'}, got {value}")
        for name in ("lr", "min_lr", "time_budget"):
            value = getattr(o, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{field_name('optim', name)} must be a finite number >= 0, got {value}")
        if o.epochs == 0 and o.max_steps == 0:
            raise ConfigError("set optim.epochs (--epochs) or optim.max_steps (--max-steps)")
        from refseg.argtypes import MAX_THREADS, check_device

        if r.threads > MAX_THREADS:
            raise ConfigError(f"{field_name('run', 'threads')} must be at most {MAX_THREADS}, got {r.threads}")
        try:
            check_device(r.device)
        except ValueError as e:
            raise ConfigError(f"{field_name('run', 'device')}: {e}") from None
        for section, name in (("model", "kwargs"), ("optim", "loss_kwargs")):
            if not isinstance(getattr(self.section(section), name), dict):
                raise ConfigError(f"{field_name(section, name)} must be a mapping, got "
                                  f"{type(getattr(self.section(section), name)).__name__}")
        self._validate_model()
        for name, options in self.methods.items():
            try:
                options.validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return self

    def _validate_model(self) -> None:
        """model.name names a model of the registry; model.kwargs are arguments of its factory, in range."""
        from refseg.methods import METHODS, MODELS
        from refseg.modeling.limits import ModelConfigError

        if self.model.name not in MODELS:
            raise ConfigError(f"{field_name('model', 'name')} must be one of {sorted(MODELS)}, got {self.model.name!r}")
        try:
            METHODS[self.model.name].config.from_dict({"image_size": self.data.size, **self.model.kwargs})
        except (ModelConfigError, TypeError) as e:
            raise ConfigError(f"{field_name('model', 'kwargs')}: {' '.join(str(e).split())}") from None

    # ---- serialisation -------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The nested mapping: {model, data, optim, run, <method>: {field: value}}."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out.update({name: dataclasses.asdict(options) for name, options in self.methods.items()})
        return out

    def to_flat(self) -> Dict[str, Any]:
        """{flat name: value}: the flags' vocabulary (what earlier flat files hold)."""
        return {flat: getattr(self.section(s), n) for flat, (s, n) in flat_fields().items()}

    def updated(self, **flat) -> "TrainConfig":
        """A copy with the fields named by their flat names (the flags, e.g. lr=1e-4, wrel_bank_lr=0.1) changed."""
        return TrainConfig.from_dict(_merge(self.to_dict(), nest(flat)))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Build from a nested mapping of sections, a flat mapping of flag names, or a mix; unknown keys and
        values of the wrong type are an error naming the field."""
        sections = all_sections()
        nested = nest(d)
        kwargs, methods = {}, {}
        for name, values in nested.items():
            known = sections[name]
            built = known(**{k: _coerce(known, name, k, v) for k, v in values.items()})
            (methods if name not in SECTIONS else kwargs)[name] = built
        config = cls(**kwargs)
        config.methods.update(methods)
        return config

    def save(self, path: Union[str, Path]) -> None:
        """Write the nested form as JSON (or YAML when the name ends in .yaml / .yml), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = _yaml().safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_text_atomic(path, text)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TrainConfig":
        return from_file_values(cls, read_config_file(path), path)


def nest(d: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """A nested, flat or mixed mapping -> {section: {field: value}} (values unchecked); ConfigError names an
    unknown key. A top-level key that is a section name with a mapping value is that section; any other
    key is a flat name (the flag's)."""
    sections, flat = all_sections(), flat_fields()
    out: Dict[str, Dict[str, Any]] = {}
    unknown = []
    for key, value in d.items():
        if key in sections and isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(sections[key])}
            unknown += [f"{key}.{k}" for k in value if k not in names]
            out.setdefault(key, {}).update({k: v for k, v in value.items() if k in names})
        elif key in flat:
            section, name = flat[key]
            out.setdefault(section, {})[name] = value
        elif key in RETIRED:  # a field of earlier versions: accepted at the value it now always has
            if value != RETIRED[key]:
                raise ConfigError(f"field {key} no longer exists (it is always {RETIRED[key]!r}), got {value!r}")
        else:
            unknown.append(str(key))
    if unknown:
        raise ConfigError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
    return out


def flat_view(d: Dict[str, Any]) -> Dict[str, Any]:
    """{flat name: value} of a saved config mapping (nested or flat), values as stored, unknown keys dropped:
    what a resume compares with (checkpoints made before the nested form hold the flat one)."""
    try:
        nested = nest(d)
    except ConfigError:
        nested = nest({k: v for k, v in d.items() if k in flat_fields() or k in all_sections()})
    return {flat: nested[s][n] for flat, (s, n) in flat_fields().items() if s in nested and n in nested[s]}


def _merge(base: Dict[str, Dict[str, Any]], over: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Section-wise update of nested mappings (a field's value, a dict included, is replaced whole)."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


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


# ---- CLI flags derived from the sections -----------------------------------


def field_comments(cls) -> Dict[str, str]:
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


def _coerce(cls, section: str, name: str, value):
    """Check / convert a value read from a file to the field's type; ConfigError names `section.name (--flag)`."""
    base, optional = _base_type(cls, name)
    where = f"TrainConfig {field_name(section, name)}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null")
    origin = typing.get_origin(base) or base
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (int, float, str) and (not isinstance(value, origin) or isinstance(value, bool)):
        raise ConfigError(f"{where} must be {origin.__name__}, got {value!r}")
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


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, named by its flat name. Defaults are suppressed, so that the parsed namespace
    holds only the flags actually given (they override --config); the namespace's names are the flat ones."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON or YAML file of TrainConfig sections (or the flat form); flags given here override it")
    sections = all_sections()
    groups = {name: parser.add_argument_group(f"training config: {name}") for name in sections}
    comments = {name: field_comments(cls) for name, cls in sections.items()}
    choices = {**CHOICES, ("model", "method"): method_choices()}
    for flat, (section, name) in flat_fields().items():
        cls = sections[section]
        default = getattr(cls(), name)
        help_text = f"{section}.{name}: {comments[section].get(name, '')} [default: {json.dumps(default)}]"
        base, optional = _base_type(cls, name)
        origin = typing.get_origin(base) or base
        kw: Dict[str, Any] = dict(dest=flat, default=argparse.SUPPRESS, help=help_text)
        flag = "--" + flat.replace("_", "-")
        if origin is bool:
            groups[section].add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if origin is dict:
            kw.update(type=_parse_json_dict, metavar="JSON")
        elif optional:
            kw.update(type=_optional(origin), metavar=flat.upper())
        else:
            kw.update(type=origin, metavar=flat.upper())
        allowed = choices.get((section, name)) or getattr(cls, "CHOICES", {}).get(name)
        if allowed:
            kw.update(choices=allowed, metavar=None)
        groups[section].add_argument(flag, **kw)


def given_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """{flat name: value} of the config flags given on the command line."""
    names = flat_fields()
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """defaults <- `base` (e.g. a resumed run's config, nested or flat) <- --config FILE <- flags given on the
    command line."""
    values = nest(base or {})
    if getattr(args, "config", None):
        file_values = read_config_file(args.config)
        from_file_values(TrainConfig, file_values, args.config)  # unknown keys and wrong types, named with the file
        values = _merge(values, nest(file_values))
    values = _merge(values, nest(given_flags(args)))
    return TrainConfig.from_dict(values).validate()
