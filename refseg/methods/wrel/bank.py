"""LRB-WREL's Learnable Reference Bank: learnable prompt vectors that complete a class-name expression.

A weak ref's expression is only its class name ("vehicle"). The bank keeps,
for each weak training ref, P learnable vectors, placed right after the
class name's tokens in the padding slots, with the attention mask switched
on there, so that they can say what the class name leaves out ("the one
left of the tank"). Optimising them through a frozen teacher (refseg/methods/wrel/train.py,
stage 2) makes the bank store "what was not said". Two sites (SITES):

    encoder   the prompts are word embeddings, read by the frozen text
              encoder with the class name (its position and type embeddings
              are added to them as to any word; `encode_with_prompts`):
                  tokens:  [CLS] vehicle [SEP] p_1 ... p_P [PAD] ...
                  mask:      1      1      1    1  ...  1    0   ...
              Every optimisation step runs the text encoder forward and
              backward.
    features  the prompts are extra tokens of the text encoder's *output*
              (`append_prompt_features`): the class name is encoded once (the
              feature cache holds it), the prompts are written into the same
              slots of TextFeatures.tokens with the mask on, and the sentence
              vector becomes what the encoder's masked mean would give over
              class-name tokens + prompts. The head has no notion of token
              order (its text layers carry no position encoding), so it
              reads a prompt exactly as it reads a word token, and a step
              costs the head only.

The class-name tokens stay exactly as the tokenizer (and, at site features,
the encoder) made them.
"""

from typing import Sequence

import torch
from torch import nn

from refseg.modeling.text import TextFeatures

SITES = ("encoder", "features")  # where the prompts enter (module docstring)


class ReferenceBank(nn.Module):
    """prompts: (R, P, D) float, P learnable vectors of width D (the text encoder's) for each of R weak refs
    (what a row means depends on the site: refseg/methods/wrel/train.py).

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

    embeds: (B, L, D) word embeddings of the tokenised class names (site
    encoder) or the encoder's output tokens (site features);
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


def append_prompt_features(txt: TextFeatures, prompts: torch.Tensor) -> TextFeatures:
    """Site features: the text encoder's output for class names, completed by prompts as extra tokens.

    txt: TextFeatures of B class names (tokens (B, L, D), mask (B, L), sentence
    (B, D)), e.g. the feature cache's; prompts: (B, P, D) in the encoder's
    output space. The prompts that fit (`prompt_slots`: k_b of them) are
    written after the n_b real tokens with the mask set (`insert_prompts`);
    the sentence vector is the masked mean over class-name tokens and
    prompts, (n_b * sentence_b + sum of the k_b prompts) / (n_b + k_b): the
    encoder's own sentence vector extended as its masked mean would extend.
    Returns new TextFeatures (tokens (B, L, D), mask (B, L) bool, sentence
    (B, D)); gradients flow to `prompts`, the inputs are not changed.
    """
    mask = txt.mask.long()  # (B, L)
    n = mask.sum(1, keepdim=True).to(prompts.dtype)  # (B, 1) real tokens
    k = prompt_slots(mask, prompts.shape[1])  # (B,)
    fits = torch.arange(prompts.shape[1], device=prompts.device)[None, :] < k[:, None]  # (B, P)
    added = (prompts * fits[:, :, None].to(prompts.dtype)).sum(1)  # (B, D) the prompts that fit
    sentence = (n * txt.sentence.to(prompts.dtype) + added) / (n + k[:, None].to(prompts.dtype))  # (B, D)
    tokens, mask = insert_prompts(txt.tokens.to(prompts.dtype), mask, prompts)
    return TextFeatures(tokens, mask.bool(), sentence)


def class_name_tokens(text: nn.Module, names: Sequence[str], device: torch.device) -> tuple:
    """(input_ids, attention_mask) (B, L) of the class names, on `device`."""
    batch = text.tokenize(list(names))
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)
