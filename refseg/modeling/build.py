"""What every model factory shares: argument checks, a bounded head, the JSON-able ``model.config``.

The factories live with their methods (refseg/methods/<name>/model.py) and
are gathered in ``refseg.methods.METHODS``:

    model = build_lts(visual="hf:/models/swin-tiny", text="hf:/models/bert-base-uncased")
    model = refseg.methods.build_model(model.config)    # the same architecture again

Encoder names: visual "efficientnet-lite0" | "hf:<local AutoBackbone folder>"
| a config dict ``{"model_type": ..., ...}`` (random weights); text "minilm"
| "hf:<local AutoModel folder>" | a config dict (random weights, tokenizer
"minilm" unless ``text_tokenizer`` says otherwise). An "hf:" folder holds
config.json and ``*.safetensors`` weights; nothing is downloaded and no
pickle is read (refseg.modeling.hf). ``model.config`` is JSON-able and holds
every argument, so a checkpoint needs only it and the trainable weights.

Every factory checks its arguments against refseg.modeling.limits before
building anything (type and range of each field, a bounded head size):
a config from an untrusted file cannot allocate without bound.
"""

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Union

from torch import nn

from refseg.modeling.limits import (MAX_HEAD_PARAMETERS, ModelConfigError, check_model_config, check_size, head_defaults,
                                   known_fields)


def checked(model: str, head: type):
    """Decorate a factory: its arguments pass check_model_config (known fields, types, ranges) first."""

    def wrap(factory):
        known, defaults = known_fields(factory, head), head_defaults(head)
        signature = inspect.signature(factory)

        @functools.wraps(factory)
        def build(*args, **kwargs):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError as e:
                raise ModelConfigError(f"{model!r}: {e}") from None
            fields = {k: v for k, v in bound.items() if k != "head_kwargs"}
            check_model_config(model, {**fields, **bound.get("head_kwargs", {})}, known, defaults)
            return factory(*args, **kwargs)

        return build

    return wrap


def build_head(head: type, *args, **kwargs) -> nn.Module:
    """``head(*args, **kwargs)``, after checking on the meta device that it stays within MAX_HEAD_PARAMETERS."""
    check_size(lambda: head(*args, **kwargs), f"the {head.__name__} of this config", MAX_HEAD_PARAMETERS)
    return head(*args, **kwargs)


def model_config(model: str, head_kwargs: dict, **fields) -> dict:
    """The JSON-able ``model.config``: factory name, factory arguments, head arguments (tuples as lists)."""
    return {"model": model, **fields, **{k: list(v) if isinstance(v, tuple) else v for k, v in head_kwargs.items()}}


def depth_field(text_depth: Optional[int]) -> dict:
    """The config field of a truncated text encoder; absent when it is whole, so older configs stay the same."""
    return {} if text_depth is None else {"text_depth": int(text_depth)}


@dataclass
class EncoderConfig:
    """The factory arguments every method's model shares; each method's config class adds its own.

    A method's config class lists exactly the arguments of its factory and
    head; ``validate()`` checks them against refseg.modeling.limits.
    """

    model: ClassVar[str] = ""  # the factory's name in refseg.methods.METHODS
    visual: Union[str, dict] = "efficientnet-lite0"  # visual encoder: "efficientnet-lite0", "hf:<local folder>" or a transformers config dict (random weights)
    text: Union[str, dict] = "minilm"  # text encoder: "minilm", "hf:<local folder>" or a transformers config dict (random weights)
    pretrained: bool = True  # load the visual encoder's pretrained weights (False: random, for tests; "hf:" encoders always load theirs)
    freeze_visual: bool = True  # keep the visual encoder fixed (eval mode, no gradients), so its features can be cached
    freeze_text: bool = True  # keep the text encoder fixed, so its features can be cached
    max_length: int = 24  # text tokens per expression
    text_tokenizer: Optional[str] = None  # tokenizer of a config-dict text encoder (None: minilm's)
    text_depth: Optional[int] = None  # keep only the text encoder's first k layers (None: all)
    image_size: int = 320  # S, the letterbox side, a multiple of 32

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "EncoderConfig":
        """A checked config from a mapping of fields (a "model" key, when present, must name this method)."""
        if not isinstance(config, dict):
            raise ModelConfigError(f"a model config must be a mapping of fields, got {type(config).__name__}")
        fields = dict(config)
        name = fields.pop("model", cls.model)
        if name != cls.model:
            raise ModelConfigError(f"config field 'model' is {name!r}, expected {cls.model!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in fields if k not in known)
        if unknown:
            raise ModelConfigError(f"config field {unknown[0]!r} is not an argument of {cls.model!r} "
                                   f"(known: {', '.join(sorted(known))})")
        return cls(**fields).validate()

    def to_kwargs(self) -> Dict[str, Any]:
        """The factory's keyword arguments."""
        return dataclasses.asdict(self)

    def validate(self) -> "EncoderConfig":
        """Raise ModelConfigError naming the first field of the wrong type or out of range; return self."""
        kwargs = self.to_kwargs()
        check_model_config(self.model, kwargs, tuple(kwargs), kwargs)
        return self

