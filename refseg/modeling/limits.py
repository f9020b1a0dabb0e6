"""The bounds of a model config: every field's type and range, checked before any module is built.

A model config (a model card's or checkpoint's ``"config"``, ``refseg train
--model-kwargs``, ``refseg.load(..., options=)``) comes from a file someone
else may have written. ``check_model_config`` refuses a field of the wrong
type (a string, null, true, NaN where an integer belongs), out of range
(0, -1) or so large that building or running the model would allocate
more than a few GB (``image_size`` 1e9, ``depth`` 1e6), naming the field;
``check_encoder_config`` does the same for an encoder given as a
``transformers`` config, and ``check_size`` bounds a module's parameter
count by building it on the meta device first (no memory is allocated).

    check_model_config("lts", {"image_size": 320, "depth": 4})   # passes
    check_model_config("lts", {"image_size": 1e9})               # ModelConfigError: config field 'image_size' ...
"""

import inspect
import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn


class ModelConfigError(ValueError):
    """A model config field of the wrong type or out of range, an unknown field, or encoder weights that
    cannot be loaded safely; the message names the field."""


MAX_HEAD_PARAMETERS = 100_000_000  # 400 MB of float32; the shipped heads have ~1.5 M
MAX_ENCODER_PARAMETERS = 500_000_000  # 2 GB of float32 per encoder (BERT-large, Swin-L, DINOv2-L fit)

# field -> (kind, low, high); kinds: int, float (int or float, finite), ints (a list of ints, each in
# range), bool, str, encoder (a name or a transformers config dict); `OPTIONAL` fields may be null
FIELDS: Dict[str, Tuple[str, Any, Any]] = {
    # the factories (build.py)
    "model": ("str", None, None),
    "visual": ("encoder", None, None),
    "text": ("encoder", None, None),
    "pretrained": ("bool", None, None),
    "freeze_visual": ("bool", None, None),
    "freeze_text": ("bool", None, None),
    "stride2": ("bool", None, None),
    "max_length": ("int", 1, 512),
    "text_tokenizer": ("str", None, None),
    "text_depth": ("int", 1, 64),
    "image_size": ("int", 32, 2048),  # a multiple of 32 (the coarsest encoder stride)
    "levels": ("ints", 2, 32),
    # heads: widths
    "dim": ("int", 1, 2048),
    "heads": ("int", 1, 64),
    "decoder_widths": ("ints", 1, 1024),
    "decoder_hidden": ("int", 1, 4096),
    "fpn_width": ("int", 1, 1024),
    "fine_width": ("int", 1, 1024),
    "mask_channels": ("int", 1, 256),
    "kernel_channels": ("int", 1, 256),
    "fine_rank": ("int", 1, 64),
    "mlp_ratio": ("float", 0.0, 16.0),
    # heads: counts
    "depth": ("int", 1, 64),
    "text_layers": ("int", 0, 64),
    "context_layers": ("int", 0, 64),
    "decoder_depth": ("int", 1, 64),
    "kernel_layers": ("int", 1, 64),
    "num_slots": ("int", 1, 256),
    "iters": ("int", 1, 64),
    "refine_iters": ("int", 1, 64),
    "colour_clusters": ("int", 1, 256),
    "word_negatives": ("int", 0, 64),
    "pretrain_steps": ("int", 0, 10**9),
    # heads: strides
    "grid_strides": ("ints", 2, 32),
    "grid_stride": ("int", 2, 32),
    "mask_stride": ("int", 1, 32),
    "mask_refine": ("int", 0, 32),
    # heads: scalars
    "prior_init": ("float", 0.0, 1.0),  # probabilities: strictly inside (0, 1)
    "heatmap_init": ("float", 0.0, 1.0),
    "mask_init": ("float", 0.0, 1.0),
    "logit_scale_init": ("float", 0.0, 1000.0),
    "hard_negatives": ("float", 0.0, 1000.0),
    "rgb_weight": ("float", 0.0, 1000.0),
    "feature_weight": ("float", 0.0, 1000.0),
    "refine_sigma": ("float", 0.0, 1000.0),
    "relation_tau": ("float", 0.0, 1000.0),
    # heads: switches and modes (the heads check the values)
    "rgb": ("bool", None, None),
    "detach_slots": ("bool", None, None),
    "entity_colour": ("bool", None, None),
    "region_head": ("bool", None, None),
    "slot_init": ("str", None, None),
    "slot_input": ("str", None, None),
    "shatter": ("str", None, None),
    "gather": ("str", None, None),
    "peak_source": ("str", None, None),
}
OPTIONAL = {"stride2", "text_tokenizer", "text_depth", "mask_stride"}
OPEN_LOW = {"mlp_ratio", "prior_init", "heatmap_init", "mask_init", "logit_scale_init", "refine_sigma",
            "relation_tau"}  # low bound excluded
OPEN_HIGH = {"prior_init", "heatmap_init", "mask_init"}  # high bound excluded
MAX_LIST = 8  # entries of an `ints` field

# an encoder's transformers config: numbers must be finite; layer counts and any integer bounded
ENCODER_MAX_INT = 10_000_000
ENCODER_MAX_LAYERS = 128
ENCODER_MAX_NESTING = 8


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(e).split()) or type(e).__name__


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_field(name: str, value: Any) -> None:
    """Raise ModelConfigError unless ``value`` has the type and range ``FIELDS[name]`` allows."""
    kind, low, high = FIELDS[name]
    if value is None and name in OPTIONAL:
        return

    def fail(expected: str) -> None:
        raise ModelConfigError(f"config field {name!r} must be {expected}, got {_describe(value)}")

    if kind == "int":
        if not _is_int(value) or not low <= value <= high:
            fail(f"an integer in {low}..{high}")
        if name == "image_size" and value % 32:
            fail("a multiple of 32")
    elif kind == "float":
        lo, hi = ("(" if name in OPEN_LOW else "["), (")" if name in OPEN_HIGH else "]")
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (low < value if name in OPEN_LOW else low <= value)
              and (value < high if name in OPEN_HIGH else value <= high))
        if not ok:
            fail(f"a number in {lo}{low:g}, {high:g}{hi}")
    elif kind == "ints":
        if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LIST
                or not all(_is_int(v) and low <= v <= high for v in value)):
            fail(f"a list of 1..{MAX_LIST} integers in {low}..{high}")
    elif kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
    elif kind == "str":
        if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
            fail("a non-empty string")
    elif kind == "encoder":
        if isinstance(value, dict):
            check_encoder_config(value, name)
        elif not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
            fail("an encoder name or a transformers config mapping")


def check_model_config(model: str, config: Dict[str, Any], known: Tuple[str, ...] = (),
                       defaults: Optional[Dict[str, Any]] = None) -> None:
    """Raise ModelConfigError unless every field of ``config`` is a known one with an allowed value.

    model: the factory's name ("lts", "sag", "pks"), for the message.
    config: factory arguments (encoders, sizes, head arguments); "model" may be among them.
    known: the field names the factory and its head accept (all of ``FIELDS`` when empty).
    defaults: the values of fields ``config`` leaves out, for the checks that relate two fields.
    """
    if not isinstance(config, dict):
        raise ModelConfigError(f"a model config must be a mapping of fields, got {type(config).__name__}")
    for name, value in config.items():
        if not isinstance(name, str) or name not in FIELDS or (known and name not in known and name != "model"):
            allowed = sorted(known or FIELDS)
            raise ModelConfigError(f"config field {_describe(name)} is not an argument of {model!r} "
                                   f"(known: {', '.join(allowed)})")
        check_field(name, value)
    both = {**(defaults or {}), **config}
    if ("dim" in config or "heads" in config) and "dim" in both and "heads" in both and both["dim"] % both["heads"]:
        raise ModelConfigError(f"config field 'heads' ({both['heads']}) must divide 'dim' ({both['dim']})")


def check_encoder_config(config: Dict[str, Any], field: str, depth: int = 0) -> None:
    """Raise ModelConfigError unless a transformers config mapping (``{"model_type": ..., ...}``, or a
    local folder's config.json) holds only finite numbers, bounded integers and bounded layer counts.

    field: the config field it came from ("visual", "text"), for the message.
    """
    if depth > ENCODER_MAX_NESTING:
        raise ModelConfigError(f"config field {field!r} is nested more than {ENCODER_MAX_NESTING} levels deep")
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        where = f"{field}.{key}"
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, (dict, list, tuple)):
            check_encoder_config(value, where, depth + 1)
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ModelConfigError(f"config field {where!r} must be a finite number, got {value!r}")
        if _is_int(value):
            layers = isinstance(key, str) and ("layer" in key or "depth" in key)
            limit = ENCODER_MAX_LAYERS if layers else ENCODER_MAX_INT
            if not -ENCODER_MAX_INT <= value <= limit:
                raise ModelConfigError(f"config field {where!r} must be at most {limit}, got {_describe(value)}")
        elif not isinstance(value, float):
            raise ModelConfigError(f"config field {where!r} has a value of type {type(value).__name__}")


def check_size(build: Callable[[], nn.Module], what: str, limit: int) -> None:
    """Build ``build()`` on the meta device (no memory allocated) and raise ModelConfigError when its
    parameters and buffers exceed ``limit`` elements, or when it cannot be built at all.

    what: the module and the config it comes from, for the message (e.g. "config field 'text' (hf:/x)").
    """
    try:
        with torch.device("meta"):
            module = build()
    except ModelConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (a config the module cannot be built from: the message says why)
        raise ModelConfigError(f"{what} cannot be built: {one_line(e)}") from None
    count = sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())
    if count > limit:
        raise ModelConfigError(f"{what} would have {count:,} parameters, more than the {limit:,} allowed")


def head_defaults(head: type) -> Dict[str, Any]:
    """The default values of a head class's arguments."""
    return {n: p.default for n, p in inspect.signature(head.__init__).parameters.items() if p.default is not p.empty}


def known_fields(factory: Callable, head: type) -> Tuple[str, ...]:
    """The argument names of a model factory and of its head class (its ``**head_kwargs``)."""
    names = [n for n, p in inspect.signature(factory).parameters.items() if p.kind is not p.VAR_KEYWORD]
    skip = {"self", "visual_channels", "visual_strides", "text_dim"}
    names += [n for n in inspect.signature(head.__init__).parameters if n not in skip]
    return tuple(names)
