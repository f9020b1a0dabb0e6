"""Training state without pickle: RNG states as JSON, optimizer state as
tensors (safetensors) + JSON, keyed by parameter name rather than position."""

from __future__ import annotations

import base64
import random
from typing import Any, Dict, Tuple

import numpy as np
import torch
from torch import nn


class StateError(ValueError):
    """Saved optimizer state that does not fit the live optimizer."""


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


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
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
