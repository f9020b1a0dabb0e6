"""One factory per named model, gathered in ``MODELS``; ``build_model(config)`` rebuilds any of them.

    model = MODELS["lts"]()                       # EfficientNet-Lite0 + MiniLM, both frozen
    model = build_model(model.config)             # the same architecture again
    model = build_lts(visual="hf:/models/swin-tiny", text="hf:/models/bert-base-uncased")

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

import functools
import inspect
from typing import Optional, Union

from torch import nn

from refseg.modeling.limits import (MAX_HEAD_PARAMETERS, ModelConfigError, check_model_config, check_size, head_defaults,
                                   known_fields)
from refseg.modeling.lts import LTS, LTSHead
from refseg.modeling.pks import PKS, PKSHead
from refseg.modeling.sag import SaG, SaGHead
from refseg.modeling.text import build_text
from refseg.modeling.visual import build_visual


def _checked(model: str, head: type):
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


def _head(head: type, *args, **kwargs) -> nn.Module:
    """``head(*args, **kwargs)``, after checking on the meta device that it stays within MAX_HEAD_PARAMETERS."""
    check_size(lambda: head(*args, **kwargs), f"the {head.__name__} of this config", MAX_HEAD_PARAMETERS)
    return head(*args, **kwargs)



def _config(model: str, head_kwargs: dict, **fields) -> dict:
    """The JSON-able ``model.config``: factory name, factory arguments, head arguments (tuples as lists)."""
    return {"model": model, **fields, **{k: list(v) if isinstance(v, tuple) else v for k, v in head_kwargs.items()}}


def _depth(text_depth: Optional[int]) -> dict:
    """The config field of a truncated text encoder; absent when it is whole, so older configs stay the same."""
    return {} if text_depth is None else {"text_depth": int(text_depth)}


@_checked("lts", LTSHead)
def build_lts(
    visual: Union[str, dict] = "efficientnet-lite0",
    text: Union[str, dict] = "minilm",
    *,
    pretrained: bool = True,
    freeze_visual: bool = True,
    freeze_text: bool = True,
    stride2: Optional[bool] = None,
    max_length: int = 24,
    text_tokenizer: Optional[str] = None,
    text_depth: Optional[int] = None,
    image_size: int = 320,
    **head_kwargs,
) -> LTS:
    """LTS on a visual and a text encoder.

    pretrained: load the visual encoder's pretrained weights (False: random,
      for tests; "hf:" encoders always load theirs).
    freeze_visual / freeze_text: keep the encoder fixed (eval mode, no grads)
      so that the engine can cache its features.
    stride2: feed the stride-2 map to the decoder; default True for
      EfficientNet-Lite0, the only encoder with one.
    max_length: text tokens per expression. image_size: S, the letterbox side.
    text_depth: keep only the text encoder's first layers (None: all; a
      truncated MiniLM for a per-expression latency budget).
    head_kwargs: LTSHead arguments (dim, depth, heads, mlp_ratio, text_layers,
      decoder_widths, fine_rank, prior_init).
    """
    if stride2 is None:
        stride2 = visual == "efficientnet-lite0"
    v = build_visual(visual, frozen=freeze_visual, pretrained=pretrained, return_stride2=stride2)
    t = build_text(text, frozen=freeze_text, max_length=max_length, tokenizer=text_tokenizer, depth=text_depth)
    head = _head(LTSHead, v.channels, v.strides, t.dim, **head_kwargs)
    config = _config("lts", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, stride2=stride2, max_length=max_length,
                     text_tokenizer=text_tokenizer, image_size=image_size, **_depth(text_depth))
    return LTS(v, t, head, image_size=image_size, config=config)


@_checked("sag", SaGHead)
def build_sag(
    visual: Union[str, dict] = "efficientnet-lite0",
    text: Union[str, dict] = "minilm",
    *,
    pretrained: bool = True,
    freeze_visual: bool = True,
    freeze_text: bool = True,
    max_length: int = 24,
    text_tokenizer: Optional[str] = None,
    text_depth: Optional[int] = None,
    image_size: int = 320,
    levels: tuple[int, ...] = (16, 32),
    **head_kwargs,
) -> SaG:
    """SaG (trained from text alone) on a visual and a text encoder.

    Arguments as build_lts (no stride2). levels: the encoder strides whose
    maps, resampled to the stride-16 grid and concatenated, SaG groups into
    slots and reconstructs (16 required; any of 4, 8, 32 besides); only
    these maps are kept by encode_image and the feature cache.
    head_kwargs: SaGHead arguments (dim, num_slots, iters, heads,
    mlp_ratio, text_layers, context_layers, decoder_hidden, decoder_depth,
    logit_scale_init, hard_negatives, slot_init, rgb, rgb_weight,
    feature_weight, detach_slots, pretrain_steps, slot_input, shatter,
    colour_clusters, grid_stride, entity_colour).
    """
    v = build_visual(visual, frozen=freeze_visual, pretrained=pretrained)
    t = build_text(text, frozen=freeze_text, max_length=max_length, tokenizer=text_tokenizer, depth=text_depth)
    channels = dict(zip(v.strides, v.channels))
    levels = tuple(sorted(int(s) for s in levels))
    if 16 not in levels or not set(levels) <= set(channels):
        raise ModelConfigError(f"config field 'levels' must include 16 and name only the visual encoder's strides "
                               f"{sorted(channels)}, got {list(levels)}")
    head = _head(SaGHead, [channels[s] for s in levels], levels, t.dim, **head_kwargs)
    config = _config("sag", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, max_length=max_length, text_tokenizer=text_tokenizer,
                     image_size=image_size, levels=list(levels), **_depth(text_depth))
    return SaG(v, t, head, image_size=image_size, config=config)


@_checked("pks", PKSHead)
def build_pks(
    visual: Union[str, dict] = "efficientnet-lite0",
    text: Union[str, dict] = "minilm",
    *,
    pretrained: bool = True,
    freeze_visual: bool = True,
    freeze_text: bool = True,
    stride2: Optional[bool] = None,
    max_length: int = 24,
    text_tokenizer: Optional[str] = None,
    text_depth: Optional[int] = None,
    image_size: int = 320,
    **head_kwargs,
) -> PKS:
    """PKS (full masks or clicks) on a visual and a text encoder.

    Arguments as build_lts; stride2 (default True for EfficientNet-Lite0)
    feeds the stride-2 map to the language-free mask branch, whose
    ``mask_stride`` then defaults to 2. head_kwargs: PKSHead arguments (dim,
    depth, heads, mlp_ratio, text_layers, fpn_width, fine_width,
    mask_channels, kernel_channels, kernel_layers, mask_stride,
    heatmap_init, mask_init).
    """
    if stride2 is None:
        stride2 = visual == "efficientnet-lite0"
    v = build_visual(visual, frozen=freeze_visual, pretrained=pretrained, return_stride2=stride2)
    t = build_text(text, frozen=freeze_text, max_length=max_length, tokenizer=text_tokenizer, depth=text_depth)
    head = _head(PKSHead, v.channels, v.strides, t.dim, **head_kwargs)
    config = _config("pks", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, stride2=stride2, max_length=max_length,
                     text_tokenizer=text_tokenizer, image_size=image_size, **_depth(text_depth))
    return PKS(v, t, head, image_size=image_size, config=config)


MODELS = {"lts": build_lts, "sag": build_sag, "pks": build_pks}


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from its ``model.config`` (weights are not loaded); ModelConfigError names a bad field."""
    if not isinstance(config, dict):
        raise ModelConfigError(f"a model config must be a mapping of fields, got {type(config).__name__}")
    kwargs = dict(config)
    name = kwargs.pop("model", None)
    if not isinstance(name, str) or name not in MODELS:
        raise ModelConfigError(f"config field 'model' must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)
