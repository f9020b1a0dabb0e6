"""LRB-WREL's Learnable Reference Bank: learnable prompt vectors that complete a class-name expression.

A weak ref's expression is only its class name ("vehicle"). The bank keeps,
for each weak training ref, P learnable vectors in the text encoder's
word-embedding space. They are written into the P padding slots right after
the tokenised class name, and the attention mask is switched on there:

    tokens:  [CLS] vehicle [SEP] p_1 ... p_P [PAD] ...
    mask:      1      1      1    1  ...  1    0   ...

The frozen text encoder then reads the whole sequence (its position and
type embeddings are added to the prompts as to any word), so the prompts can
say what the class name leaves out ("the one left of the tank"). The
class-name tokens stay exactly as the tokenizer made them. Optimising the
prompts through a frozen teacher (engine/wrel.py, stage 2) makes the bank
store "what was not said".
"""

from typing import Sequence

import torch
from torch import nn

from refseg.modeling.text import TextFeatures


class ReferenceBank(nn.Module):
    """prompts: (R, P, D) float, P learnable vectors of width D (the text encoder's) for each of R weak refs.

    init_std: the prompts start as N(0, init_std^2) draws from `generator`
    (seeded by the caller, so that a run starts from the same bank).
    """

    def __init__(self, n_refs: int, n_prompts: int, dim: int, init_std: float = 0.02,
                 generator: torch.Generator = None):
        super().__init__()
        if n_refs < 1 or n_prompts < 1:
            raise ValueError(f"a reference bank needs at least one ref and one prompt, got {n_refs} x {n_prompts}")
        self.prompts = nn.Parameter(torch.randn(n_refs, n_prompts, dim, generator=generator) * init_std)
        # what checkpoint.save_checkpoint records in model.json (a bank is not a model refseg.load rebuilds)
        self.config = {"model": "reference-bank", "n_refs": n_refs, "n_prompts": n_prompts, "dim": dim,
                       "init_std": init_std}


def insert_prompts(embeds: torch.Tensor, attention_mask: torch.Tensor, prompts: torch.Tensor) -> tuple:
    """Write prompts into the padding slots right after each expression's tokens.

    embeds: (B, L, D) word embeddings of the tokenised class names;
    attention_mask: (B, L) int, 1 on real tokens ([CLS] ... [SEP]), which
    must come first; prompts: (B, P, D). Returns (embeds (B, L, D), mask
    (B, L) int64) as new tensors: the real tokens' rows unchanged, rows
    n_b .. n_b + P - 1 replaced by the prompts (n_b = real tokens of row b)
    with the mask set there. A row whose n_b + P exceeds L takes its first
    L - n_b prompts only (see `prompt_slots`). Gradients flow to `prompts`
    (and to `embeds` outside those rows).
    """
    B, L, D = embeds.shape
    P = prompts.shape[1]
    slots = attention_mask.sum(1)[:, None] + torch.arange(P, device=embeds.device)[None, :]  # (B, P) after [SEP]
    # scatter into P spare rows past the end, then cut them off: prompts that do not fit fall there
    spare = embeds.new_zeros(B, P, D)
    embeds = torch.cat([embeds, spare], 1).scatter(1, slots[:, :, None].expand(B, P, D), prompts.to(embeds.dtype))
    mask = torch.cat([attention_mask.long(), attention_mask.new_zeros(B, P).long()], 1).scatter(1, slots, 1)
    return embeds[:, :L], mask[:, :L]  # (B, L, D), (B, L)


def prompt_slots(attention_mask: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """(B,) how many of the prompts fit after each expression: min(P, L - n_b)."""
    free = attention_mask.shape[1] - attention_mask.sum(1)
    return free.clamp(max=n_prompts)


def encode_with_prompts(text: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompts: torch.Tensor) -> TextFeatures:
    """The text encoder's features of class names completed by prompts.

    text: an encoder with embed_tokens / forward_embeds (modeling/text.py);
    input_ids, attention_mask: (B, L) from text.tokenize; prompts (B, P, D).
    Returns TextFeatures(tokens (B, L, D), mask (B, L) bool, sentence (B, D)).
    """
    embeds, mask = insert_prompts(text.embed_tokens(input_ids), attention_mask, prompts)
    tokens, sentence = text.forward_embeds(embeds, mask)
    return TextFeatures(tokens, mask.bool(), sentence)


def class_name_tokens(text: nn.Module, names: Sequence[str], device: torch.device) -> tuple:
    """(input_ids, attention_mask) (B, L) of the class names, on `device`."""
    batch = text.tokenize(list(names))
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)
