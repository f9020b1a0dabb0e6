"""LTS: Locate then Segment (Jing et al., CVPR 2021), refseg's fully supervised head.

    model = LTS(visual, text, LTSHead(visual.channels, visual.strides, text.dim))
    vis = model.encode_image(images)          # (B_img, 3, S, S) uint8 -> list of maps
    txt = model.encode_text(texts)            # list[str] -> TextFeatures
    out = model.decode(vis, txt, image_index) # sentence b reads vis[...][image_index[b]]
    ctx = model.image_context(vis)            # the head's language-free part, once per image
    out = model.decode_context(ctx, txt, image_index)   # the rest: == decode(vis, txt, image_index)

Design (choices beyond the paper, made to reach the SynthRef targets with
frozen cached encoders on a CPU budget; contracts in docs/DESIGN.md):

1. Fuse, on the stride-32 grid (10 x 10 at 320 px). Each token is a
   stride-32 cell concatenated with the cells under it of the finer maps
   in ``grid_strides`` (space-to-depth: 2 x 2 stride-16, 4 x 4 stride-8,
   8 x 8 stride-4 cells, so no detail is lost), projected to width D.
   The fine maps matter for colour: with stride 32 + 16 only (the first
   shipped model) most misses picked an object of the right shape and the
   wrong colour (the deep ImageNet stages are nearly colour-invariant); the
   early stride-8/4 stages still carry colour. It costs one wider linear
   layer per image.
   This grid is language-free and computed once per *image*. Per sentence:
   ``x = A(g) + B(g * s) + C(coords) + pe``: ``s`` is the sentence vector
   projected to D (LTS's element-wise multiplicative fusion), ``coords``
   the CoordConv x/y channels in [-1, 1], ``pe`` a 2D sine encoding.
   Text: tokens are projected to D and refined by ``text_layers`` small
   self-attention layers (task-specific context on top of the frozen
   encoder); ``s`` = projected encoder sentence vector + masked mean of the
   refined tokens.
   Why 10 x 10 and not 20 x 20: the locate layers run once per *sentence*;
   at 400 tokens x batch 32 four layers cost ~4x more than the whole step
   budget (0.5 s on 2 cores), while space-to-depth keeps the 16-px detail.
2. Locate: ``depth`` pre-norm layers of [self-attention among the grid
   positions (position encoding on q/k in every layer) -> cross-attention to
   the text tokens (padding masked) -> MLP]. Self-attention lets a position
   find the relation anchor or the other candidates of an ordinal
   ("left of the blue circle", "the leftmost green square"); the earlier
   cross-attention-only design stalled on exactly those forms
   (shared/MEASURED.md). A linear layer gives 2 x 2 sub-cell logits per
   token: the position prior (B, 1, S/16, S/16).
3. No-target: a sentence-conditioned query attention-pools the located
   tokens; an MLP over [pooled, s, max prior logit] gives one logit.
4. Segment (laterals: 3x3 conv-GN projections of the encoder maps, once per
   image, indexed per sentence; the rest per sentence, no norms, thin
   widths ``decoder_widths`` so that most compute stays on the grid):
   stride 16: sub-pixel (pixel-shuffle) expansion of the located tokens +
   the stride-16 lateral gated by the sentence, concatenated with
   sigmoid(prior) -> 3x3 conv; stride 8: reduce (1x1) -> bilinear x2 +
   the stride-8 lateral gated by the sentence -> 3x3 conv; stride 4: the
   same with the stride-4 lateral -> 1x1 conv to 1 + K channels.
   Stride 2 (when the encoder gives that map, for small-object boundaries):
   the coarse logit upsampled x2 plus a per-sentence mix of K per-image
   stride-2 channels with the K upsampled weights (a full conv stage at
   160 x 160 per sentence would cost more than everything else together).
   Logits are upsampled bilinearly to S. The output layer starts at zero
   weight and a "mostly background" bias (as does the prior).
"""

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from refseg.modeling.common import MLP, LocateLayer, TextLayer, conv, conv_gn, coord_grid, sine_position_encoding
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


class LTSHead(FuseLocate):
    """The trainable part of LTS.

    visual_channels / visual_strides: the visual encoder's ``channels`` and
      ``strides`` (finest first; must hold 4, 8, 16, 32, optionally 2).
    text_dim: the text encoder's width.
    dim: width D of the grid tokens; depth: locate layers; heads: attention
      heads; mlp_ratio: MLP hidden width / D; text_layers: refinement layers
      over the text tokens; decoder_widths: channels at strides 16, 8, 4;
      fine_rank: K, the per-image stride-2 channels mixed per sentence;
      grid_strides: the encoder maps folded into each grid token (see
      FuseLocate).
    """

    def __init__(
        self,
        visual_channels: Sequence[int],
        visual_strides: Sequence[int],
        text_dim: int,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        text_layers: int = 1,
        decoder_widths: Sequence[int] = (48, 24, 12),
        fine_rank: int = 4,
        prior_init: float = 0.02,
        grid_strides: Sequence[int] = (32, 16, 8, 4),
    ):
        super().__init__()
        self.strides = tuple(int(s) for s in visual_strides)
        if not {4, 8, 16, 32} <= set(self.strides) or not set(self.strides) <= {2, 4, 8, 16, 32}:
            raise ValueError(f"LTSHead needs strides 4, 8, 16, 32 (and optionally 2), got {self.strides}")
        ch = dict(zip(self.strides, visual_channels))
        c16, c8, c4 = decoder_widths

        # 1-2. fuse, locate
        self._build_fuse_locate(ch, text_dim, dim, depth, heads, mlp_ratio, text_layers, grid_strides)
        self.prior = nn.Linear(dim, 4)  # 2x2 sub-cells -> prior on the stride-16 grid

        # 3. no-target
        self.nt_query = nn.Linear(dim, dim)
        self.nt_mlp = MLP(2 * dim + 1, dim, 1)

        # 4. segment (laterals: once per image; the rest per sentence)
        self.up16 = nn.Linear(dim, 4 * c16)
        self.lat16, self.gate16 = conv_gn(ch[16], c16), nn.Linear(dim, c16)
        self.dec16 = conv(c16 + 1, c16)
        self.red8, self.lat8, self.dec8 = nn.Conv2d(c16, c8, 1), conv_gn(ch[8], c8), conv(c8, c8)
        self.gate8 = nn.Linear(dim, c8)
        self.red4, self.lat4, self.dec4 = nn.Conv2d(c8, c4, 1), conv_gn(ch[4], c4), conv(c4, c4)
        self.fine = 2 in self.strides
        self.fine_rank = fine_rank if self.fine else 0
        self.mask_out = nn.Conv2d(c4, 1 + self.fine_rank, 1)  # coarse logit (+ K mixing weights)
        if self.fine:
            self.lat2 = nn.Sequential(conv_gn(ch[2], 16), nn.Conv2d(16, fine_rank, 3, padding=1))

        bias = -math.log((1 - prior_init) / prior_init)  # start predicting "mostly background"
        nn.init.constant_(self.prior.bias, bias)
        nn.init.zeros_(self.mask_out.weight)
        nn.init.zeros_(self.mask_out.bias)
        nn.init.constant_(self.mask_out.bias[:1], bias)

    def image_context(self, vis: List[torch.Tensor]) -> List[torch.Tensor]:
        """Everything the head computes from the image alone, once per image.

        vis: the encoder maps, finest first. Returns [g (B_img, N, D) grid
        tokens, fuse_vis(g) (B_img, N, D), lat16 (B_img, c16, 2h, 2w), lat8
        (B_img, c8, 4h, 4w), lat4 (B_img, c4, 8h, 8w)] + [lat2 (B_img, K,
        16h, 16w)] with a stride-2 map; h x w is the stride-32 grid. A
        ``Predictor`` caches it so that each further sentence pays only for
        ``decode_context``.
        """
        maps = dict(zip(self.strides, vis))
        ctx = [*self.fuse_grid(maps), self.lat16(maps[16]), self.lat8(maps[8]), self.lat4(maps[4])]
        return ctx + [self.lat2(maps[2])] if self.fine else ctx

    def decode_context(self, ctx: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor
                       ) -> Dict[str, torch.Tensor]:
        """Per-sentence steps from ``image_context``'s list; image_index: (B,) row of ``ctx`` of each
        sentence. Returns the model's output dict (see ``forward``)."""
        g, g_vis, lat16, lat8, lat4 = ctx[:5]
        idx = image_index
        h, w = lat16.shape[-2] // 2, lat16.shape[-1] // 2
        S = 32 * w

        # 1-2. fuse, locate
        x, t, s, _ = self.locate_grid(g, g_vis, (h, w), txt, idx)  # x: (B, N, D)
        B = x.shape[0]
        prior = self.prior(x).transpose(1, 2).reshape(B, 4, h, w)  # (B, 4, h, w)
        prior = F.pixel_shuffle(prior, 2)  # (B, 1, 2h, 2w)

        # 3. no-target
        q = self.nt_query(s)  # (B, D)
        attn = torch.softmax((x @ q[:, :, None]).squeeze(-1) / math.sqrt(self.dim), dim=-1)  # (B, N)
        pooled = (attn[:, :, None] * x).sum(1)  # (B, D)
        peak = prior.flatten(1).amax(1, keepdim=True)  # (B, 1)
        no_target = self.nt_mlp(torch.cat([pooled, s, peak], -1)).squeeze(-1)  # (B,)

        # 4. segment
        y = self.up16(x).transpose(1, 2).reshape(B, -1, h, w)  # (B, 4 c16, h, w)
        y = F.pixel_shuffle(y, 2)  # (B, c16, 2h, 2w)
        y = y + lat16[idx] * torch.sigmoid(self.gate16(s))[:, :, None, None]
        y = self.dec16(torch.cat([y, prior.sigmoid()], 1))  # (B, c16, 2h, 2w)
        gate = torch.sigmoid(self.gate8(s))[:, :, None, None]  # (B, c8, 1, 1)
        y = self.dec8(_up(self.red8(y)) + lat8[idx] * gate)  # (B, c8, 4h, 4w)
        y = self.dec4(_up(self.red4(y)) + lat4[idx])  # (B, c4, 8h, 8w)
        y = self.mask_out(y)  # (B, 1 + K, 8h, 8w)
        if self.fine:
            # stride 2: bilinear coarse logit + per-sentence mix of K per-image fine channels
            y = _up(y)  # (B, 1 + K, 16h, 16w)
            fine = ctx[5][idx]  # (B, K, 16h, 16w)
            y = y[:, :1] + (y[:, 1:] * fine).sum(1, keepdim=True)  # (B, 1, 16h, 16w)
        mask = F.interpolate(y, size=(S, S), mode="bilinear", align_corners=False)  # (B, 1, S, S)
        return {"mask_logits": mask, "prior_logits": prior, "no_target_logits": no_target}

    def forward(self, vis: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """vis: encoder maps of B_img images; txt: B sentences; image_index: (B,) int64.
        Returns mask_logits (B, 1, S, S), prior_logits (B, 1, S/16, S/16), no_target_logits (B,)."""
        return self.decode_context(self.image_context(vis), txt, image_index)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class LTS(nn.Module):
    """visual encoder + text encoder + LTSHead; owns its preprocessing.

    visual: maps float (B, 3, S, S), normalised with its ``pixel_mean`` /
      ``pixel_std`` (0..255 units), to a list of maps at ``visual.strides``.
    text: ``tokenize`` + ``forward(input_ids, attention_mask)``, see text.py.
    config: the JSON-able dict that ``build.build_model`` rebuilds it from.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, head: nn.Module, image_size: int = 320, config=None):
        super().__init__()
        self.visual = visual
        self.text = text
        self.head = head
        self.image_size = int(image_size)
        self.config = dict(config or {})
        self.register_buffer("pixel_mean", torch.tensor(visual.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(visual.pixel_std).view(1, 3, 1, 1), persistent=False)

    def encode_image(self, images: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, S, S) uint8 RGB in [0, 255] -> list of maps (B, C_i, S/s_i, S/s_i), finest first."""
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        return self.visual(x)

    def encode_text(self, texts: Sequence[str], trim: bool = False) -> TextFeatures:
        """list[str] (B) -> TextFeatures(tokens (B, L, D), mask (B, L) bool, sentence (B, D)).

        L is ``text.max_length``; with ``trim`` it is the longest expression's
        length instead (inference: the features of real tokens are the same,
        and the encoder runs on fewer positions; feature caches keep L fixed).
        """
        tokens = self.text.tokenize(texts, trim=trim)
        batch = {k: v.to(self.pixel_mean.device) for k, v in tokens.items()}
        tokens, sentence = self.text(batch["input_ids"], batch["attention_mask"])
        return TextFeatures(tokens, batch["attention_mask"].bool(), sentence)

    def decode(self, vis: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Maps of B_img images + B sentences -> dict of logits.

        image_index: (B,) int64, the row of ``vis`` each sentence is about.
        Returns mask_logits (B, 1, S, S), prior_logits (B, 1, S/16, S/16),
        no_target_logits (B,); all raw logits (apply sigmoid for probabilities).
        """
        dtype = next(self.head.parameters()).dtype  # cached features may be stored in fp16
        vis = [m.to(dtype) for m in vis]
        txt = txt.to(dtype)
        return self.head(vis, txt, image_index.to(vis[0].device))

    def image_context(self, vis: List[torch.Tensor]) -> List[torch.Tensor]:
        """Maps of B_img images -> the list of per-image tensors that ``decode_context`` reads.

        ``decode(vis, ...) == decode_context(image_context(vis), ...)``; the
        split lets a ``Predictor`` run the language-free part of the head
        (``head.image_context``) once per image. A head without that split
        gets the maps themselves.
        """
        dtype = next(self.head.parameters()).dtype
        vis = [m.to(dtype) for m in vis]
        return self.head.image_context(vis) if hasattr(self.head, "image_context") else vis

    def decode_context(self, ctx: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor
                       ) -> Dict[str, torch.Tensor]:
        """``decode`` from ``image_context(vis)`` instead of the maps; same outputs."""
        if not hasattr(self.head, "decode_context"):
            return self.decode(ctx, txt, image_index)
        dtype = next(self.head.parameters()).dtype
        txt = txt.to(dtype)
        return self.head.decode_context(ctx, txt, image_index.to(ctx[0].device))

    def for_inference(self) -> "LTS":
        """This model with the visual encoder's inference form (``visual.fused()``: BatchNorm folded
        into the convolutions, channels-last), sharing the text encoder and head; the model itself
        when the encoder has none. Same outputs up to float rounding; for ``Predictor``, not training."""
        if not hasattr(self.visual, "fused"):
            return self
        model = type(self)(self.visual.fused(), self.text, self.head, self.image_size, self.config)
        return model.to(self.pixel_mean.device).eval()

    def forward(self, images: torch.Tensor, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """images (B, 3, S, S) uint8 + B expressions (sentence b is about image b)."""
        index = torch.arange(len(texts), device=images.device)
        return self.decode(self.encode_image(images), self.encode_text(texts), index)
