"""Argument types shared by every command: argparse ``type=`` functions.

argparse turns a type function's ArgumentTypeError into one line,
``refseg <cmd>: error: argument --flag: <message>``, and exit status 2, before
the command imports a model or reads a file:

    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", type=device, default="auto")
"""

import argparse
import json
import math
import re

MAX_THREADS = 1024  # more CPU threads than any machine has; a larger count is a typo


def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def threads(text: str) -> int:
    """A thread count: 0 (torch's default) up to MAX_THREADS."""
    value = _int(text)
    if not 0 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be 0 (the default) to {MAX_THREADS} threads, got {text!r}")
    return value


def positive_threads(text: str) -> int:
    """A thread count from 1 to MAX_THREADS."""
    value = _int(text)
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_THREADS} threads, got {text!r}")
    return value


def processes(text: str) -> int:
    """A process count from 1 to MAX_THREADS."""
    value = _int(text)
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_THREADS} processes, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def fraction_below_one(text: str) -> float:
    """A number in [0, 1)."""
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def probability_threshold(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 0-65535, got {text!r}")
    return value


_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def check_device(name: str, allow_auto: bool = True) -> str:
    """`name` if it is a device this machine has, else ValueError saying why.

    name: auto (when allow_auto), cpu, cuda, cuda:N or mps.
    """
    if allow_auto and name == "auto":
        return name
    m = _DEVICE.fullmatch(str(name))
    if m is None or (m.group(1) == "mps" and m.group(2) is not None):
        choices = "auto, cpu, cuda, cuda:N or mps" if allow_auto else "cpu, cuda, cuda:N or mps"
        raise ValueError(f"unknown device {name!r}; use {choices}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return name
    import torch

    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {name!r}: MPS is not available on this machine")
        return name
    if not torch.cuda.is_available():
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None and torch.version.hip is None \
            else "no CUDA GPU is visible"
        raise ValueError(f"device {name!r}: CUDA is not available ({why}); use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return name


def device(text: str) -> str:
    """auto, cpu, cuda, cuda:N or mps, refused unless this machine has it (argparse type)."""
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_device(name: str) -> str:
    """auto -> cuda when available, else cpu; any other name as it is."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def config_flags(values: dict) -> list:
    """`refseg train` flags that set TrainConfig fields given by their flat names (bools as --x / --no-x)."""
    argv: list = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, "none" if value is None else str(value)]
    return argv
