"""RISModel: the interface every refseg model offers the engine, the Predictor and the exporter.

    vis = model.encode_image(images)                   # (B_img, 3, S, S) uint8 -> list of maps
    txt = model.encode_text(texts, trim=False)          # list[str] -> TextFeatures
    out = model.decode(vis, txt, image_index)           # sentence b reads row image_index[b] of vis
    ctx = model.image_context(vis)                      # per-image, language-free part of the head
    out = model.decode_context(ctx, txt, image_index)   # == decode(vis, txt, image_index)
    fast = model.for_inference()                        # the inference form (Predictor), same outputs
    out = model(images, texts)                          # sentence b is about image b

``out`` always holds mask_logits (B, 1, S, S), prior_logits (B, 1, S/16,
S/16) and no_target_logits (B,), raw logits. ``model.image_size`` is S, the
letterbox side, and ``model.config`` the JSON-able dict that
``refseg.methods.build_model`` rebuilds the model from. See docs/DESIGN.md.
"""

from typing import Dict, List, Sequence

import torch
from torch import nn

from refseg.modeling.text import TextFeatures


class RISModel(nn.Module):
    """The interface of a refseg model, with its defaults; every model subclasses it.

    image_size: S, the letterbox side the model reads. config: the JSON-able
    dict ``refseg.methods.build_model`` rebuilds the model from.
    Subclasses define encode_image, encode_text and decode; a head that can
    split off its language-free part overrides image_context / decode_context.
    """

    def __init__(self, image_size: int = 320, config=None):
        super().__init__()
        self.image_size = int(image_size)
        self.config = dict(config or {})

    def encode_image(self, images: torch.Tensor) -> List[torch.Tensor]:
        """(B_img, 3, S, S) uint8 RGB in [0, 255] -> list of per-image maps (B_img first)."""
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str], trim: bool = False) -> TextFeatures:
        """list[str] (B) -> text features (B rows); ``trim``: padded to the longest expression only."""
        raise NotImplementedError

    def decode(self, vis: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor,
               **training_kwargs) -> Dict[str, torch.Tensor]:
        """Maps of B_img images + B sentences -> dict of logits.

        image_index: (B,) int64, the row of ``vis`` each sentence is about.
        training_kwargs: what the method's ``teacher_forcing`` gives in training.
        Returns mask_logits (B, 1, S, S), prior_logits (B, 1, S/16, S/16),
        no_target_logits (B,), and whatever else the head adds.
        """
        raise NotImplementedError

    def image_context(self, vis: List[torch.Tensor]) -> List[torch.Tensor]:
        """Maps of B_img images -> the per-image tensors ``decode_context`` reads (default: the maps)."""
        return vis

    def decode_context(self, ctx: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor
                       ) -> Dict[str, torch.Tensor]:
        """``decode`` from ``image_context(vis)``; same outputs (default: ``decode``)."""
        return self.decode(ctx, txt, image_index)

    def for_inference(self) -> "RISModel":
        """The model's inference form (same outputs up to float rounding; default: the model itself)."""
        return self

    def forward(self, images: torch.Tensor, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """images (B, 3, S, S) uint8 + B expressions (sentence b is about image b)."""
        index = torch.arange(len(texts), device=images.device)
        return self.decode(self.encode_image(images), self.encode_text(texts), index)


class EncoderHeadModel(RISModel):
    """A visual encoder, a text encoder and a trainable head; owns its preprocessing.

    visual: maps float (B, 3, S, S), normalised with its ``pixel_mean`` /
      ``pixel_std`` (0..255 units), to a list of maps at ``visual.strides``.
    text: ``tokenize`` + ``forward(input_ids, attention_mask)`` (modeling/text.py).
    head: ``forward(vis, txt, image_index, **training_kwargs)`` -> the output dict.
    image_size: S, the letterbox side. config: the model's rebuild dict.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, head: nn.Module, image_size: int = 320, config=None):
        super().__init__(image_size, config)
        self.visual = visual
        self.text = text
        self.head = head
        self.register_buffer("pixel_mean", torch.tensor(visual.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(visual.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def head_dtype(self) -> torch.dtype:
        """The head's parameter dtype (cached features may be stored in fp16)."""
        return next(self.head.parameters()).dtype

    def encode_image(self, images: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, S, S) uint8 RGB in [0, 255] -> list of maps (B, C_i, S/s_i, S/s_i), finest first."""
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        return self.visual(x)

    def encode_text(self, texts: Sequence[str], trim: bool = False) -> TextFeatures:
        """list[str] (B) -> TextFeatures(tokens (B, L, D), mask (B, L) bool, sentence (B, D)).

        L is ``text.max_length``; with ``trim`` the longest expression's length
        (inference: the same features of real tokens; feature caches keep L fixed).
        """
        tokens = self.text.tokenize(texts, trim=trim)
        batch = {k: v.to(self.pixel_mean.device) for k, v in tokens.items()}
        tokens, sentence = self.text(batch["input_ids"], batch["attention_mask"])
        return TextFeatures(tokens, batch["attention_mask"].bool(), sentence)

    def decode(self, vis: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor,
               **training_kwargs) -> Dict[str, torch.Tensor]:
        """As RISModel.decode: the maps and text cast to the head's dtype, then the head."""
        dtype = self.head_dtype
        vis = [m.to(dtype) for m in vis]
        return self.head(vis, txt.to(dtype), image_index.to(vis[0].device), **training_kwargs)

    def for_inference(self) -> "EncoderHeadModel":
        """This model with the visual encoder's inference form (``visual.fused()``), sharing the text
        encoder and head; the model itself when the encoder has no other form. For ``Predictor``."""
        fused = self.visual.fused()
        if fused is self.visual:
            return self
        model = type(self)(fused, self.text, self.head, self.image_size, self.config)
        return model.to(self.pixel_mean.device).eval()
