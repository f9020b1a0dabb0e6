"""One factory per named model, gathered in ``MODELS``; ``build_model(config)`` rebuilds any of them.

    model = MODELS["lts"]()                       # EfficientNet-Lite0 + MiniLM, both frozen
    model = build_model(model.config)             # the same architecture again
    model = build_lts(visual="hf:microsoft/swin-tiny-patch4-window7-224", text="hf:bert-base-uncased")

Encoder names: visual "efficientnet-lite0" | "hf:<AutoBackbone name or folder>"
| a config dict ``{"model_type": ..., ...}`` (random weights); text "minilm"
| "hf:<AutoModel name or folder>" | a config dict (random weights, tokenizer
"minilm" unless ``text_tokenizer`` says otherwise). ``model.config`` is
JSON-able and holds every argument, so a checkpoint needs only it and the
trainable weights.
"""

from typing import Optional, Union

from torch import nn

from refseg.modeling.lts import LTS, LTSHead
from refseg.modeling.pks import PKS, PKSHead
from refseg.modeling.sag import SaG, SaGHead
from refseg.modeling.text import build_text
from refseg.modeling.visual import build_visual



def _config(model: str, head_kwargs: dict, **fields) -> dict:
    """The JSON-able ``model.config``: factory name, factory arguments, head arguments (tuples as lists)."""
    return {"model": model, **fields, **{k: list(v) if isinstance(v, tuple) else v for k, v in head_kwargs.items()}}


def _depth(text_depth: Optional[int]) -> dict:
    """The config field of a truncated text encoder; absent when it is whole, so older configs stay the same."""
    return {} if text_depth is None else {"text_depth": int(text_depth)}


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
    head = LTSHead(v.channels, v.strides, t.dim, **head_kwargs)
    config = _config("lts", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, stride2=stride2, max_length=max_length,
                     text_tokenizer=text_tokenizer, image_size=image_size, **_depth(text_depth))
    return LTS(v, t, head, image_size=image_size, config=config)


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
    head = SaGHead([channels[s] for s in levels], levels, t.dim, **head_kwargs)
    config = _config("sag", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, max_length=max_length, text_tokenizer=text_tokenizer,
                     image_size=image_size, levels=list(levels), **_depth(text_depth))
    return SaG(v, t, head, image_size=image_size, config=config)


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
    head = PKSHead(v.channels, v.strides, t.dim, **head_kwargs)
    config = _config("pks", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, stride2=stride2, max_length=max_length,
                     text_tokenizer=text_tokenizer, image_size=image_size, **_depth(text_depth))
    return PKS(v, t, head, image_size=image_size, config=config)


MODELS = {"lts": build_lts, "sag": build_sag, "pks": build_pks}


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from its ``model.config`` (weights are not loaded)."""
    kwargs = dict(config)
    name = kwargs.pop("model")
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kwargs)
