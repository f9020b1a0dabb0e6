"""Training state without pickle: RNG states as JSON, optimizer state as
tensors (safetensors) + JSON, keyed by parameter name rather than position."""

from __future__ import annotations

import base64
import random
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn


class StateError(ValueError):
    """A saved training state (state.json) that is malformed, lacks a field, or does not fit the live optimizer;
    the message names the file and the field."""


# state.json fields a resume reads: name -> (types, what it must be)
RESUME_FIELDS = {
    "step": (int, "an integer >= 0"),
    "epoch": (int, "an integer >= 0"),
    "position": (int, "an integer >= 0"),
    "total_steps": (int, "an integer >= 0"),
    "config": (dict, "a mapping (the run's TrainConfig)"),
    "rng": (dict, "a mapping of RNG states"),
    "optimizer": (dict, "a mapping with 'param_groups' and 'scalars'"),
    "best": (dict, "null or a mapping of the best validation"),
}


def check_training_state(state: Any, path: str, optimizer: bool = True, rng: bool = True,
                         only: Tuple[str, ...] = tuple(RESUME_FIELDS)) -> Dict[str, Any]:
    """Raise StateError naming `path` and the field unless `state` (a parsed state.json) holds every field a
    resume reads, of the right type; returns it. optimizer / rng: whether those parts are required;
    only: the fields checked (default: all of RESUME_FIELDS)."""
    if not isinstance(state, dict):
        raise StateError(f"{path}: expected a mapping of training state fields, got {type(state).__name__}")
    rng = rng and "rng" in only
    optimizer = optimizer and "optimizer" in only
    for name, (kind, what) in RESUME_FIELDS.items():
        if name not in only or (name == "optimizer" and not optimizer) or (name == "rng" and not rng):
            continue
        if name not in state:
            if name in ("total_steps", "best"):  # optional: total_steps is read only with time_budget
                continue
            raise StateError(f"{path}: field {name!r} is missing")
        value = state[name]
        if name == "best":
            continue  # checked below
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise StateError(f"{path}: field {name!r} must be {what}, got {value!r:.80}")
    best = state.get("best")
    if "best" in only and best is not None and not (
            isinstance(best, dict) and isinstance(best.get("mIoU", 0.0), (int, float, type(None)))):
        raise StateError(f"{path}: field 'best' must be null or a mapping with a number 'mIoU', got {best!r:.80}")
    if rng:
        for key in ("python", "numpy", "torch"):
            if key not in state["rng"]:
                raise StateError(f"{path}: field 'rng.{key}' is missing")
        try:  # set into throwaway generators: every part must be a state its generator accepts
            set_rng_state(state["rng"], _Generators())
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            raise StateError(f"{path}: field 'rng' is malformed ({type(e).__name__}: {e})") from None
    if optimizer:
        for key, kind in (("param_groups", list), ("scalars", dict)):
            if not isinstance(state["optimizer"].get(key), kind):
                raise StateError(f"{path}: field 'optimizer.{key}' is missing or not a {kind.__name__}")
    return state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU, and every cuda device if initialised) RNG states, JSON-able."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


class _Generators:
    """Fresh Python, NumPy and torch generators standing in for the global ones (set_rng_state's `into`)."""

    def __init__(self):
        self.python, self.numpy, self.torch = random.Random(), np.random.RandomState(), torch.Generator()


def set_rng_state(state: Dict[str, Any], into: Optional[_Generators] = None) -> None:
    """Restore what rng_state saved into the global generators (or into `into`'s, cuda left out)."""
    version, internal, gauss = state["python"]
    (into.python if into else random).setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    (into.numpy if into else np.random).set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    (into.torch.set_state if into else torch.set_rng_state)(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and into is None:
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def optimizer_state(optimizer: torch.optim.Optimizer, names: Dict[nn.Parameter, str]
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors keyed "<param name>/<slot>", JSON part with the param groups)."""
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"]):
        for p, i in zip(group["params"], sd_group["params"]):
            index_to_name[i] = names[p]
    tensors, scalars = {}, {}
    for i, slots in sd["state"].items():
        for slot, v in slots.items():
            key = f"{index_to_name[i]}/{slot}"
            if torch.is_tensor(v):
                tensors[key] = v
            else:
                scalars[key] = v
    groups = []
    for sd_group in sd["param_groups"]:
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sd_group.items() if k != "params"}
        g["param_names"] = [index_to_name[i] for i in sd_group["params"]]
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: Dict[nn.Parameter, str],
                         tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    # Matched by parameter name, group by group: the order in which a model
    # registers its parameters may change without changing the model.
    current = [[names[p] for p in g["params"]] for g in optimizer.param_groups]
    saved = [g["param_names"] for g in meta["param_groups"]]
    if len(current) != len(saved) or any(set(c) != set(s) for c, s in zip(current, saved)):
        raise StateError("the optimizer's parameters differ from the checkpoint's: "
                         f"{sum(map(len, current))} now, {sum(map(len, saved))} saved")
    name_to_index = {n: i for i, n in enumerate(n for group in current for n in group)}
    groups = []
    for g, names_now in zip(meta["param_groups"], current):
        g = {k: v for k, v in g.items() if k != "param_names"}
        g["params"] = [name_to_index[n] for n in names_now]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, slot = key.rsplit("/", 1)
        state.setdefault(name_to_index[name], {})[slot] = v
    optimizer.load_state_dict({"state": state, "param_groups": groups})
