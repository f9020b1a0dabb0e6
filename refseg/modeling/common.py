"""Building blocks shared by the heads: frozen-encoder behaviour, positional
encodings, pre-norm attention layers, small conv units."""

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class FrozenMixin:
    """``freeze()``: no parameter trains and the module stays in eval mode for good."""

    frozen: bool = False

    def freeze(self) -> None:
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        nn.Module.train(self, False)

    def train(self, mode: bool = True):
        return nn.Module.train(self, mode and not self.frozen)


@contextlib.contextmanager
def quiet_loading():
    """Hide transformers' "Loading weights" progress bar and its load report for one call, then restore them.

    The report lists the layers a truncated text encoder (``text_depth``)
    leaves out on purpose; real load errors still raise.
    """
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if enabled:
            logging.enable_progress_bar()


def coord_grid(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(h*w, 2): x, y of each cell centre in [-1, 1], row-major (CoordConv channels)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    return torch.stack([xx, yy], -1).reshape(h * w, 2).to(dtype)  # (h*w, 2)


def sine_position_encoding(
    h: int, w: int, dim: int, device=None, dtype=None, min_cycles: float = 0.5, max_cycles: float = 4.0
) -> torch.Tensor:
    """(h*w, dim) 2D sine-cosine encoding: dim/2 channels for y, dim/2 for x.

    dim/4 frequencies per axis, geometric from ``min_cycles`` to ``max_cycles``
    periods across the image, so the encoding means the same relative place
    at any grid size (and stays below the Nyquist limit of a 10 x 10 grid).
    """
    if dim % 4:
        raise ValueError(f"sine_position_encoding: dim must be a multiple of 4, got {dim}")
    n = dim // 4
    cycles = min_cycles * (max_cycles / min_cycles) ** (torch.arange(n, device=device) / max(n - 1, 1))  # (n,)
    xy = (coord_grid(h, w, device) + 1) / 2  # (h*w, 2) in [0, 1]
    x = 2 * math.pi * xy[:, 0:1] * cycles  # (h*w, n)
    y = 2 * math.pi * xy[:, 1:2] * cycles  # (h*w, n)
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], -1).to(dtype)  # (h*w, dim)


class Attention(nn.Module):
    """Multi-head attention: queries (B, N, D) over keys/values (B, M, D).

    key_mask: (B, M) bool, True where a key may be attended to.
    Separate q / k / v projections so that k, v can come from another modality.
    """

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        kv_dim = kv_dim or dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, D = q.shape
        M = k.shape[1]
        h = self.heads
        q = self.q(q).view(B, N, h, D // h).transpose(1, 2)  # (B, h, N, D/h)
        k = self.k(k).view(B, M, h, D // h).transpose(1, 2)  # (B, h, M, D/h)
        v = self.v(v).view(B, M, h, D // h).transpose(1, 2)  # (B, h, M, D/h)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TextLayer(nn.Module):
    """Pre-norm transformer encoder layer (self-attention + MLP) over tokens (B, L, D).

    Used for text tokens with their padding mask (B, L) and, mask-free, for
    SaG's slots of one image.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = self.norm1(t)
        t = t + self.attn(n, n, n, mask)
        return t + self.mlp(self.norm2(t))


class LocateLayer(nn.Module):
    """Pre-norm cross-modal layer over the visual grid tokens x (B, N, D).

    1. self-attention among grid positions, the position encoding ``pos``
       (N, D) added to queries and keys (DETR style), so that a position can
       find and compare with other objects (relations, ordinals);
    2. cross-attention from grid positions to the text tokens (B, L, D);
    3. MLP.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, pos, text, text_mask) -> torch.Tensor:
        n = self.norm1(x)
        qk = n + pos
        x = x + self.self_attn(qk, qk, n)
        x = x + self.cross_attn(self.norm2(x), text, text, text_mask)
        return x + self.mlp(self.norm3(x))


def conv_gn(cin: int, cout: int, k: int = 3, group_size: int = 4) -> nn.Sequential:
    """k x k conv (same padding) -> GroupNorm (groups of ``group_size`` channels) -> GELU."""
    groups = max(1, cout // group_size) if cout % group_size == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(groups, cout), nn.GELU())


def conv(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """k x k conv (same padding) -> GELU; no norm (used per sentence, where norms cost more than the conv)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.GELU())
