"""Atomic safetensors checkpoints with JSON state; `load_model`, `export_heads`.

A checkpoint is a folder (`RUN/last/`, `RUN/best/`):

    model.safetensors      the weights that are not frozen (heads only when the
                           encoders are frozen: those come back from their pip
                           packages when the model is rebuilt)
    model.json             {"config": model.config, "stored": [names], ...};
                           refseg.modeling rebuilds the model from "config"
    optimizer.safetensors  AdamW moments, keyed by parameter name
    state.json             step, epoch, data-order position, schedule, RNG
                           states, optimizer hyper-parameters, metrics
    <name>.safetensors     optional further tensors a training method keeps
                           (LRB-WREL: the EMA teacher, the reference bank)
    manifest.json          name, size and SHA-256 of every file above; written
                           last, so a folder without a matching manifest is not
                           a checkpoint

Nothing is pickled, and nothing is unpickled: weights are read only from
safetensors files (a `torch.save` pickle given instead is refused before
any byte of it is interpreted) and every other part is JSON, so a crafted
checkpoint cannot run code. A checkpoint is written into a hidden temporary folder
beside its final name and then renamed into place; the previous one is first
renamed aside (`.last.old-*`) and deleted only after the new one is in place,
so a crash at any point leaves a complete checkpoint that `find_checkpoint`
returns. Training keeps one generation more: the previous RUN/last/ stays as
`.last.prev` (when every file of it still matches its manifest), the fallback
of `--resume` when last/ was damaged after it was written (`verify_resume_point`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from refseg.engine.state import (StateError, check_training_state, load_optimizer_state, optimizer_state,
                                 rng_state, set_rng_state)

FORMAT = "refseg-checkpoint"
VERSION = 1
MODEL_FILE, MODEL_JSON = "model.safetensors", "model.json"
OPTIM_FILE, STATE_JSON, MANIFEST = "optimizer.safetensors", "state.json", "manifest.json"

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit the model."""


# ---- which weights are stored -------------------------------------------------


def frozen_prefixes(model: nn.Module) -> List[str]:
    """Names of the outermost sub-modules whose parameters are all frozen
    (requires_grad False), e.g. ["visual", "text"] for a head-only model."""
    out: List[str] = []
    for name, module in model.named_modules():
        if not name or any(name == p or name.startswith(p + ".") for p in out):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return out


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def encoders_rebuildable(config: Dict[str, Any]) -> bool:
    """Whether refseg.modeling rebuilds the frozen encoders with the same
    weights from `config` alone: not when they were randomly initialised
    (an encoder given as a config dict, or pretrained=False; see build.py)."""
    if config.get("pretrained") is False:
        return False
    return not any(isinstance(config.get(k), dict) for k in ("visual", "text"))


def stored_state(model: nn.Module, include_frozen: bool = False) -> Dict[str, torch.Tensor]:
    """The state-dict entries a checkpoint stores: everything outside frozen
    sub-modules (trainable parameters and their modules' buffers); all of
    them when `include_frozen` or when the encoders cannot be rebuilt from
    the model's config (random weights)."""
    sd = model.state_dict()
    if include_frozen or not encoders_rebuildable(getattr(model, "config", None) or {}):
        return dict(sd)
    skip = frozen_prefixes(model)
    return {k: v for k, v in sd.items() if not _under(k, skip)}


# ---- files ------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and directories on some OSes) refuse
        pass
    finally:
        os.close(fd)


def _save_safetensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": FORMAT})
    except Exception as e:  # noqa: BLE001  (SafetensorError wraps the OS error of a full disk: raise that as OSError)
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    os.chmod(path, 0o644)  # safetensors creates 0600 files; shipped weights must be readable by all


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _contiguous(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a protocol-2+ pickle; the zip that torch.save writes


def read_json(path: Path, what: str = "file") -> Any:
    """json.load with a CheckpointError naming the file (missing, not UTF-8, not JSON)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON: {e}") from None


def check_safetensors(path: PathLike) -> None:
    """Raise CheckpointError unless `path` starts like a safetensors file; pickles (.pt, .pth, .bin) are
    named as such. Reads 9 bytes; nothing is interpreted."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read weights: {e}") from None
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON ("{...")
    if len(head) < 9 or head[8:9] != b"{" or int.from_bytes(head[:8], "little") > size - 8:
        if head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(f"{path}: looks like a PyTorch pickle (torch.save); refseg reads weights only "
                                  "from safetensors and never unpickles them (convert it with "
                                  "safetensors.torch.save_file)")
        raise CheckpointError(f"{path}: not a safetensors file (truncated, empty or another format)")


def read_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """load_file with a CheckpointError naming the file; pickles (.pt, .pth, .bin) are refused unread."""
    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  (SafetensorError and friends: the file is not valid safetensors)
        raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from None


def verify_manifest(ckpt: PathLike) -> None:
    """Raise CheckpointError unless every file the manifest lists has its recorded size and SHA-256."""
    ckpt = Path(ckpt)
    manifest = read_json(ckpt / MANIFEST, "checkpoint manifest")
    try:
        files = manifest["files"]
        for name, meta in files.items():
            path = ckpt / name
            if Path(name).name != name or not path.is_file():
                raise CheckpointError(f"{ckpt}: file {name!r} listed in {MANIFEST} is missing")
            if path.stat().st_size != meta["size"] or sha256_of(path) != meta["sha256"]:
                raise CheckpointError(f"{path}: size or SHA-256 differs from {MANIFEST}; the file is truncated "
                                      "or corrupt")
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{ckpt / MANIFEST}: malformed manifest") from None


def is_complete(ckpt: PathLike) -> bool:
    """True when the folder's manifest exists and every file it lists has its size."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        return all((ckpt / f).stat().st_size == meta["size"] for f, meta in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_checkpoint(run: PathLike, name: str = "last") -> Optional[Path]:
    """RUN/<name> if complete, else a complete copy left aside by an
    interrupted save or kept as the previous generation (the one with the
    highest step), else None."""
    run = Path(run)
    if is_complete(run / name):
        return run / name
    aside = [p for p in [*run.glob(f".{name}.old-*"), run / f".{name}.prev"] if is_complete(p)]
    if not aside:
        return None
    return max(aside, key=_saved_step)


def _saved_step(ckpt: Path) -> int:
    """state.json's step of a checkpoint folder, -1 when unreadable."""
    try:
        step = json.loads((ckpt / STATE_JSON).read_text()).get("step", -1)
        return step if isinstance(step, int) else -1
    except (OSError, ValueError, AttributeError):
        return -1


def write_atomic_dir(final: Path, write_files, keep_previous: bool = False) -> Path:
    """Write a folder atomically: `write_files(tmp_dir)` fills a hidden temp
    folder, a manifest is added, then it is renamed to `final`.
    keep_previous: the folder `final` replaces is kept as `.<name>.prev`
    (replacing an older one) when all its files still match its manifest."""
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{final.name}.tmp-*"):  # left by a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write_files(tmp)
        files = {}
        for p in sorted(tmp.iterdir()):
            _fsync(p)
            files[p.name] = {"size": p.stat().st_size, "sha256": sha256_of(p)}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "files": files})
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        old = None
        if final.exists():
            old = parent / f".{final.name}.old-{tag}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if keep_previous and _verified(old):
            previous = parent / f".{final.name}.prev"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(old, previous)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for older in parent.glob(f".{final.name}.old-*"):  # from an earlier interrupted save
        shutil.rmtree(older, ignore_errors=True)
    return final


def _verified(ckpt: Path) -> bool:
    try:
        verify_manifest(ckpt)
        return True
    except CheckpointError:
        return False


# ---- training checkpoints ------------------------------------------------------


def model_meta(model: nn.Module, stored: Iterable[str], dtype: str = "float32") -> Dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError(f"{type(model).__name__} has no `config` dict to rebuild it from")
    return {"format": FORMAT, "version": VERSION, "config": config, "stored": sorted(stored), "dtype": dtype,
            "frozen": frozen_prefixes(model)}


def save_checkpoint(final: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    state: Optional[Dict[str, Any]] = None, include_frozen: bool = False,
                    with_rng: bool = True, extra: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
                    keep_previous: bool = False) -> Path:
    """Write a checkpoint folder atomically (see the module docstring). `state`
    is any JSON-able dict (step, epoch, ...); RNG states are added to it.
    extra: {name: tensors} written as `<name>.safetensors` (read back with load_extra).
    keep_previous: keep the checkpoint this one replaces as `.<name>.prev` (write_atomic_dir)."""
    extra = {name: _contiguous(tensors) for name, tensors in (extra or {}).items()}
    reserved = {MODEL_FILE, OPTIM_FILE} & {f"{name}.safetensors" for name in extra}
    if reserved:
        raise ValueError(f"extra tensors may not be named like {sorted(reserved)}")
    weights = _contiguous(stored_state(model, include_frozen))
    names = {p: n for n, p in model.named_parameters()}
    state = dict(state or {})
    if with_rng:
        state["rng"] = rng_state()
    if optimizer is not None:
        opt_tensors, state["optimizer"] = optimizer_state(optimizer, names)
        opt_tensors = _contiguous(opt_tensors)

    def write(tmp: Path) -> None:
        _save_safetensors(weights, tmp / MODEL_FILE)
        _write_json(tmp / MODEL_JSON, model_meta(model, weights))
        if optimizer is not None:
            _save_safetensors(opt_tensors, tmp / OPTIM_FILE)
        for name, tensors in extra.items():
            _save_safetensors(tensors, tmp / f"{name}.safetensors")
        _write_json(tmp / STATE_JSON, state)

    return write_atomic_dir(Path(final), write, keep_previous)


def load_extra(ckpt: PathLike, name: str) -> Dict[str, torch.Tensor]:
    """The tensors a checkpoint stored under `extra={name: ...}`."""
    path = Path(ckpt) / f"{name}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{ckpt} holds no {path.name}")
    return read_safetensors(path)


def load_training_state(ckpt: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        restore_rng: bool = True) -> Dict[str, Any]:
    """Load weights (+ optimizer, + RNG) from a checkpoint folder into live
    objects, for `--resume`; returns its state.json dict."""
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no valid {MANIFEST})")
    verify_manifest(ckpt)
    meta = read_json(ckpt / MODEL_JSON, "model JSON")
    load_weights(model, read_safetensors(ckpt / MODEL_FILE), meta, source=str(ckpt))
    state = read_json(ckpt / STATE_JSON, "training state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{ckpt / STATE_JSON}: field 'step' missing or not an integer")
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{ckpt} holds no optimizer state")
        check_training_state({"optimizer": state["optimizer"]}, str(ckpt / STATE_JSON), rng=False,
                             only=("optimizer",))
        names = {p: n for n, p in model.named_parameters()}
        tensors = read_safetensors(ckpt / OPTIM_FILE)
        try:
            load_optimizer_state(optimizer, names, tensors, state["optimizer"])
        except StateError as e:
            raise StateError(f"{ckpt / STATE_JSON}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise StateError(f"{ckpt / STATE_JSON}: field 'optimizer' does not fit this model's optimizer "
                             f"({type(e).__name__}: {e})") from None
    if restore_rng and "rng" in state:
        try:
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise StateError(f"{ckpt / STATE_JSON}: field 'rng' is malformed ({type(e).__name__}: {e})") from None
    return state


def verify_resume_point(ckpt: PathLike, optimizer: bool = True) -> Dict[str, Any]:
    """Check a checkpoint folder completely before `--resume` uses it; returns its state.json dict.

    Checked: the manifest, every file it lists present with its size and SHA-256,
    the files a resume reads listed (model.safetensors, model.json, state.json,
    and optimizer.safetensors when `optimizer`), and every field of state.json a
    resume reads (state.check_training_state). Raises CheckpointError or
    StateError naming the file (and the field).
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint folder")
    verify_manifest(ckpt)
    listed = read_json(ckpt / MANIFEST, "checkpoint manifest")["files"]
    for name in [MODEL_FILE, MODEL_JSON, STATE_JSON] + ([OPTIM_FILE] if optimizer else []):
        if name not in listed:
            raise CheckpointError(f"{ckpt / name}: missing ({MANIFEST} does not list it)")
    state = read_json(ckpt / STATE_JSON, "training state")
    return check_training_state(state, str(ckpt / STATE_JSON), optimizer=optimizer)


def resume_candidates(run: PathLike) -> List[Path]:
    """The checkpoint folders of a run that `--resume` may continue from, newest kind first: last/, copies an
    interrupted save left aside, the previous last/ (.last.prev), best/. Only those that exist."""
    run = Path(run)
    found = [run / "last", *sorted(run.glob(".last.old-*")), run / ".last.prev", run / "best"]
    return [p for p in found if p.is_dir()]


# ---- models -------------------------------------------------------------------------


def sha256_of(path: PathLike) -> str:
    """The hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_model(config: Dict[str, Any]) -> nn.Module:
    """Rebuild a model from its `config` dict (refseg.methods.build_model)."""
    from refseg.methods import build_model as build

    return build(config)


def load_weights(model: nn.Module, weights: Dict[str, torch.Tensor], meta: Optional[Dict[str, Any]] = None,
                 source: str = "checkpoint", strict: bool = True, allow_missing: bool = False) -> List[str]:
    """Copy stored weights into `model`, checking names and shapes.

    Keys of the model not in the file must lie in frozen sub-modules (rebuilt
    from their packages); anything else missing, any key the model lacks and
    any shape mismatch raises CheckpointError listing them (strict) or warns.
    allow_missing: missing keys are neither an error nor a warning (they keep
    the model's values; fine-tuning with a new head). Returns the missing keys.
    """
    own = model.state_dict()
    if meta is not None and sorted(meta.get("stored", weights)) != sorted(weights):
        raise CheckpointError(f"{source}: the weights file does not hold the parameters its JSON lists")
    for k, v in weights.items():  # a NaN or inf weight makes every output NaN: refuse it here, named
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {k!r} holds NaN or infinite values; the weights are corrupt "
                                  "(or come from a diverged run)")
    frozen = frozen_prefixes(model)
    unexpected = sorted(k for k in weights if k not in own)
    missing = sorted(k for k in own if k not in weights and not _under(k, frozen))
    shapes = sorted(f"{k}: stored {tuple(weights[k].shape)}, model {tuple(own[k].shape)}"
                    for k in weights if k in own and weights[k].shape != own[k].shape)
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing (model has, file lacks) {len(missing)}: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected (file has, model lacks) {len(unexpected)}: {', '.join(unexpected[:20])}")
    if shapes:
        problems.append(f"shape mismatch {len(shapes)}: {'; '.join(shapes[:20])}")
    if problems:
        message = f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems)
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=2)
    with torch.no_grad():
        for k, v in weights.items():
            if k in own and v.shape == own[k].shape:
                own[k].copy_(v.to(own[k].dtype))
    return missing


def _resolve(path: PathLike) -> Tuple[Path, Path]:
    """(weights file, its JSON) for a checkpoint folder, a run folder or a .safetensors file."""
    path = Path(path)
    if path.is_file() or path.suffix == ".safetensors":
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        return path, path.with_suffix(".json")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint, run folder or .safetensors file")
    if (path / MODEL_FILE).exists():
        if not is_complete(path):
            raise CheckpointError(f"{path} is an incomplete checkpoint (interrupted save?)")
        verify_manifest(path)
        return path / MODEL_FILE, path / MODEL_JSON
    for name in ("best", "last"):
        found = find_checkpoint(path, name)
        if found is not None:
            verify_manifest(found)
            return found / MODEL_FILE, found / MODEL_JSON
    final = final_stage(path)  # a recipe's run folder (RUN/recipe.json): its final stage's run folder
    if final is not None:
        return _resolve(final)
    raise CheckpointError(f"{path} holds no complete checkpoint (looked for {MODEL_FILE}, best/, last/)")


RECIPE_RUN_FILE = "recipe.json"  # RUN/recipe.json: the state of a recipe's run folder (engine/recipe.py)
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a recipe stage's folder name


def final_stage(run: PathLike) -> Optional[Path]:
    """RUN/<final stage> when RUN is a recipe's run folder (RUN/recipe.json names it), else None."""
    state_file = Path(run) / RECIPE_RUN_FILE
    if not state_file.is_file():
        return None
    try:
        final = json.loads(state_file.read_text(encoding="utf-8"))["final"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{state_file}: not a recipe run's state (no 'final' stage)") from None
    if not isinstance(final, str) or not STAGE_NAME.match(final):
        raise CheckpointError(f"{state_file}: field 'final' must be a stage folder name, got {final!r}")
    return Path(run) / final


def _read_checkpoint(path: PathLike) -> Tuple[Path, Path, Dict[str, Any], Dict[str, torch.Tensor]]:
    """(weights file, its JSON, the JSON's contents, the weights) of a checkpoint folder, run folder or
    ``.safetensors`` file, checked: a readable safetensors file, a JSON with a 'config' mapping, and the
    SHA-256 when the JSON holds one."""
    weights_path, json_path = _resolve(path)
    check_safetensors(weights_path)
    if not json_path.exists():
        raise CheckpointError(f"{weights_path}: no {json_path.name} beside it (it holds the model config)")
    meta = read_json(json_path, "model JSON")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{json_path}: no 'config' mapping to rebuild the model from")
    if meta.get("sha256") and sha256_of(weights_path) != meta["sha256"]:
        raise CheckpointError(f"{weights_path}: SHA-256 does not match {json_path.name}; the file is corrupt or changed")
    return weights_path, json_path, meta, read_safetensors(weights_path)


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu", strict: bool = True,
               like: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild a model and load its weights.

    path: a checkpoint folder (RUN/best), a run folder (best/, else last/), or
    a `<stem>.safetensors` file with its `<stem>.json` beside it. When the JSON
    holds a "sha256" the file is checked against it. like: a model whose
    `config` equals the checkpoint's (e.g. the run's untrained instance) is
    copied instead of rebuilt, which skips reading the encoders' weights
    again; with another config it is ignored. Returns the model in eval mode
    on `device`.
    """
    weights_path, json_path, meta, weights = _read_checkpoint(path)  # before building: a bad file fails fast
    same = like is not None and getattr(like, "config", None) == meta["config"]
    from refseg.modeling.limits import ModelConfigError

    try:
        model = copy.deepcopy(like) if same else build_model(meta["config"])
    except ModelConfigError as e:  # a field of the wrong type, out of range, unknown; unloadable encoder weights
        raise CheckpointError(f"{json_path}: {e}") from None
    except (TypeError, KeyError, ValueError) as e:  # unknown model name or factory argument, bad value
        raise CheckpointError(f"{json_path}: field 'config' does not describe a refseg model: {e}") from None
    load_weights(model, weights, meta, source=str(weights_path), strict=strict)
    return model.to(device).eval()


def init_weights(model: nn.Module, source: PathLike) -> List[str]:
    """Start ``model`` from the weights of ``source`` (fine-tuning; ``refseg train --init-from``).

    source: a checkpoint or run folder, or a ``.safetensors`` file with its JSON
    (a shipped model's: ``refseg.hub.weights_path(name)``). The stored model must be
    the same kind (config "model", "visual", "text"); its weights must all exist in
    ``model`` with the same shapes. Parameters of ``model`` that the file lacks (a
    head switched on by ``model_kwargs``) keep their fresh initialisation: their
    names are returned. Anything else raises CheckpointError naming the file and field.
    """
    weights_path, json_path, meta, weights = _read_checkpoint(Path(source))
    own_config = getattr(model, "config", {}) or {}
    for key in ("model", "visual", "text"):
        if key in own_config and meta["config"].get(key) != own_config[key]:
            raise CheckpointError(f"{json_path}: config field {key!r} is {meta['config'].get(key)!r}, "
                                  f"the model trained here has {own_config[key]!r}")
    return load_weights(model, weights, meta, source=str(weights_path), allow_missing=True)


def with_options(model: nn.Module, options: Dict[str, Any]) -> nn.Module:
    """``model`` rebuilt with ``options`` merged into its config and the same weights (inference options
    that add no parameter, e.g. SaG's ``mask_refine``); the weights must fit the new model exactly.
    Returns the new model in eval mode (``model`` itself when ``options`` is empty)."""
    if not options:
        return model
    # the kind, and what the head's weights were trained on (the encoders' features): not options
    fixed = sorted(set(options) & {"model", "visual", "text", "text_depth", "text_tokenizer", "pretrained", "stride2",
                                   "levels"})
    if fixed:
        raise ValueError(f"options may not change the model's kind or encoders {fixed}: load another model instead")
    try:
        rebuilt = build_model({**model.config, **options}).eval()
    except TypeError as e:  # an argument no factory or head takes
        raise ValueError(f"options {options}: {e}") from None
    try:
        load_weights(rebuilt, dict(model.state_dict()), source=f"{type(model).__name__} + {options}")
    except CheckpointError as e:  # one line: the problems after the header, e.g. "shape mismatch 3: ..."
        problems = " | ".join(line.strip() for line in str(e).splitlines()[1:])
        raise CheckpointError(f"options {options} would change {type(model).__name__}'s weights, "
                              f"only options that keep every tensor can be given: {problems}") from None
    return rebuilt


def export_heads(model: nn.Module, out_stem: PathLike, extra_meta: Optional[Dict[str, Any]] = None,
                 fp16: bool = False, include_frozen: bool = False) -> Tuple[Path, Path]:
    """Write `<stem>.safetensors` (non-frozen weights; floats as fp16 when
    `fp16`) and `<stem>.json` (config, stored names, dtype, SHA-256 of the
    weights file, and `extra_meta`'s keys, e.g. command and scores), as
    shipped in refseg/weights/. Returns both paths."""
    out_stem = Path(out_stem)
    if out_stem.suffix in (".safetensors", ".json"):
        out_stem = out_stem.with_suffix("")
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    weights = _contiguous(stored_state(model, include_frozen))
    if fp16:
        weights = {k: (v.half() if v.is_floating_point() else v) for k, v in weights.items()}
    st_path, json_path = Path(f"{out_stem}.safetensors"), Path(f"{out_stem}.json")
    tmp = st_path.with_name(f".{st_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    _save_safetensors(weights, tmp)
    meta = model_meta(model, weights, dtype="float16" if fp16 else "float32")
    meta["sha256"] = sha256_of(tmp)
    clash = sorted(set(extra_meta or {}) & set(meta))
    if clash:
        raise ValueError(f"extra_meta may not override {clash}")
    meta.update(extra_meta or {})
    os.replace(tmp, st_path)
    tmp_json = json_path.with_name(f".{json_path.name}.tmp")
    _write_json(tmp_json, meta)
    os.replace(tmp_json, json_path)
    return st_path, json_path
