"""FuseLocate: LTS's fuse and locate steps on the stride-32 grid, shared by the LTS and PKS heads.

Fuse: each stride-32 cell concatenated with the cells under it of the finer
maps in ``grid_strides`` (space-to-depth), projected to width D; per
sentence ``x = A(g) + B(g * s) + C(coords) + pe``. Locate: ``depth``
LocateLayers (self-attention among grid positions, cross-attention to the
text tokens). Design reasoning: docs/methods/lts.md.
"""

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from refseg.modeling.common import LocateLayer, TextLayer, coord_grid, sine_position_encoding
from refseg.modeling.text import TextFeatures, masked_mean


class FuseLocate(nn.Module):
    """LTS steps 1-2 (fuse, locate), shared by the LTS and PKS heads.

    Subclasses call ``_build_fuse_locate`` in ``__init__`` and
    ``fuse_locate`` in ``forward``; the sub-module names are part of the
    shipped checkpoints' keys, so keep them.
    """

    def _build_fuse_locate(self, channels: dict, text_dim: int, dim: int, depth: int, heads: int,
                           mlp_ratio: float, text_layers: int, grid_strides: Sequence[int] = (32, 16)) -> None:
        self.dim = dim
        self.grid_strides = tuple(int(s) for s in grid_strides)
        if self.grid_strides[0] != 32 or not set(self.grid_strides) <= set(channels) or len(set(self.grid_strides)) != len(self.grid_strides):
            raise ValueError(f"grid_strides must start with 32 and name distinct encoder strides {sorted(channels)}, "
                             f"got {list(grid_strides)}")
        # fuse: each stride-32 cell + the (32/s)^2 cells under it of every finer grid stride s (space-to-depth)
        self.grid_in = nn.Linear(sum(channels[s] * (32 // s) ** 2 for s in self.grid_strides), dim)
        self.grid_norm = nn.LayerNorm(dim)
        self.text_in = nn.Linear(text_dim, dim)
        self.text_layers = nn.ModuleList([TextLayer(dim, heads, mlp_ratio) for _ in range(text_layers)])
        self.sent_in = nn.Linear(text_dim, dim)
        self.sent_norm = nn.LayerNorm(dim)
        self.fuse_vis = nn.Linear(dim, dim)
        self.fuse_mul = nn.Linear(dim, dim, bias=False)
        self.fuse_coord = nn.Linear(2, dim, bias=False)
        # locate
        self.locate = nn.ModuleList([LocateLayer(dim, heads, mlp_ratio) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(dim)

    def fuse_grid(self, maps: Dict[int, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The language-free part of step 1, once per *image*.

        maps: {stride: (B_img, C, H/stride, W/stride)}. Returns the grid
        tokens g (B_img, N, D) on the h x w stride-32 grid (N = h*w) and
        their visual term ``fuse_vis(g)`` (B_img, N, D).
        """
        g = torch.cat([maps[s] if s == 32 else F.pixel_unshuffle(maps[s], 32 // s) for s in self.grid_strides], 1)
        # g: (B_img, sum_s C_s (32/s)^2, h, w)
        g = self.grid_norm(self.grid_in(g.flatten(2).transpose(1, 2)))  # (B_img, N, D), N = h*w
        return g, self.fuse_vis(g)

    def locate_grid(self, g: torch.Tensor, g_vis: torch.Tensor, hw: Tuple[int, int], txt: TextFeatures,
                    idx: torch.Tensor) -> tuple:
        """Steps 1-2 per *sentence*, from ``fuse_grid``'s (g, g_vis) of shape (B_img, N, D) on the h x w
        grid; idx: (B,) image row of each sentence. Returns as ``fuse_locate``."""
        h, w = hw
        t = self.text_in(txt.tokens)  # (B, L, D)
        for layer in self.text_layers:
            t = layer(t, txt.mask)
        s = self.sent_norm(self.sent_in(txt.sentence) + masked_mean(t, txt.mask))  # (B, D)
        pos = sine_position_encoding(h, w, self.dim, g.device, g.dtype)  # (N, D)
        coords = self.fuse_coord(coord_grid(h, w, g.device, g.dtype))  # (N, D)
        x = g_vis[idx] + self.fuse_mul(g[idx] * s[:, None, :]) + coords + pos  # (B, N, D)
        for layer in self.locate:
            x = layer(x, pos, t, txt.mask)
        return self.out_norm(x), t, s, (h, w)

    def fuse_locate(self, maps: Dict[int, torch.Tensor], txt: TextFeatures, idx: torch.Tensor) -> tuple:
        """Located tokens of each sentence.

        maps: {stride: (B_img, C, H/stride, W/stride)}; idx: (B,) image row
        of each sentence. Returns x (B, N, D) located tokens on the h x w
        stride-32 grid (N = h*w), the refined text tokens t (B, L, D), the
        sentence vector s (B, D), and (h, w).
        """
        h, w = maps[32].shape[-2:]
        return self.locate_grid(*self.fuse_grid(maps), (h, w), txt, idx)
