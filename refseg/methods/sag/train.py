"""SaG's training-time decode arguments: the text-side word negatives.

    extra = teacher_forcing(model, batch)   # {"word_negatives": TextFeatures, "word_negative_of": (M,)} or {}
    out = model.decode(vis, txt, image_index, **extra)
"""

from typing import Dict

import torch
from torch import nn

from refseg.data.word_negatives import word_negatives


def teacher_forcing(model: nn.Module, batch: Dict) -> Dict:
    """With ``model.head.word_negatives`` n > 0, up to n one-word swaps of each expression of
    ``batch["text"]`` (refseg.data.word_negatives; no-target sentences get none), encoded by the text
    encoder: {"word_negatives": TextFeatures (M rows), "word_negative_of": (M,) long}. {} when off,
    without texts, or when no expression has a word to swap."""
    n = model.head.word_negatives
    if not n or "text" not in batch:
        return {}
    no_target = batch.get("no_target")
    texts, of = [], []
    for i, text in enumerate(batch["text"]):
        if no_target is not None and bool(no_target[i]):
            continue
        negs = word_negatives(text, n)
        texts += negs
        of += [i] * len(negs)
    if not texts:
        return {}
    trainable_text = any(p.requires_grad for p in model.text.parameters())
    with torch.set_grad_enabled(trainable_text and torch.is_grad_enabled()):
        neg = model.encode_text(texts)
    return {"word_negatives": neg, "word_negative_of": torch.tensor(of, dtype=torch.long)}
