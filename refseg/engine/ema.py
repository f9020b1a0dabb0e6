"""An exponential moving average (EMA) of a model's trainable part, kept beside it in training.

    ema = ema_copy(model)                       # shares the frozen encoders, eval mode
    ema_update(ema, model, momentum)            # after each optimiser step
    tensors = own_state(ema)                    # what a checkpoint keeps of it
"""

import copy
from typing import Dict

import torch
from torch import nn

from refseg.engine.checkpoint import frozen_prefixes


def ema_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that shares its frozen encoders (same objects), in eval mode.

    Its head parameters keep requires_grad (no optimiser holds them; they
    only change in ema_update), so that checkpoints store them as the
    model's trainable part, exactly as for the model itself.
    """
    shared = [model.get_submodule(name) for name in frozen_prefixes(model)]
    return copy.deepcopy(model, memo={id(m): m for m in shared}).eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """ema = momentum * ema + (1 - momentum) * model, parameter by parameter
    (parameters shared by both are left alone; buffers are copied)."""
    params = dict(model.named_parameters())
    for name, t in ema.named_parameters():
        s = params[name]
        if t is not s:
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    buffers = dict(model.named_buffers())
    for name, t in ema.named_buffers():
        if t is not buffers[name]:
            t.copy_(buffers[name])


def own_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State-dict entries outside the frozen (shared) encoders."""
    frozen = frozen_prefixes(model)
    return {k: v for k, v in model.state_dict().items() if not any(k.startswith(p + ".") for p in frozen)}
