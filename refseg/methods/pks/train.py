"""PKS's training-time decode arguments: where each sentence's kernel is read.

    extra = teacher_forcing(model, batch)          # {"centers": (B, 2)} or {}
    out = model.decode(vis, txt, image_index, **extra)
"""

from typing import Dict

import torch
from torch import nn

from refseg.methods.pks.loss import pks_targets


def teacher_forcing(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``centers`` (B, 2) letterboxed (x, y) pixels from the batch's supervision: click_center (click) or
    the mask's interior point (full); NaN rows for no-target samples. {} when the batch has neither."""
    if "click_center" not in batch and "mask" not in batch:
        return {}
    return {"centers": pks_targets(batch)["center"]}
