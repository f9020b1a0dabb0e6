"""LTS: Locate then Segment (Jing et al., CVPR 2021), refseg's fully supervised head.

    model = build_lts()                                # EfficientNet-Lite0 + MiniLM, both frozen
    vis = model.encode_image(images)                   # (B_img, 3, S, S) uint8 -> list of maps
    txt = model.encode_text(texts)                     # list[str] -> TextFeatures
    out = model.decode(vis, txt, image_index)          # sentence b reads vis[...][image_index[b]]
    ctx = model.image_context(vis)                     # the head's language-free part, once per image
    out = model.decode_context(ctx, txt, image_index)  # the rest: == decode(vis, txt, image_index)

Steps: 1-2 fuse and locate on the stride-32 grid (modeling/locate.py), a
2 x 2 sub-cell position prior per token (B, 1, S/16, S/16); 3 a no-target
logit from the located tokens; 4 a thin text-gated decoder over the
stride-16/8/4(/2) laterals to mask_logits (B, 1, S, S). Design reasoning:
docs/methods/lts.md.
"""

import math
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from refseg.modeling.base import EncoderHeadModel
from refseg.modeling.build import build_head, checked, depth_field, model_config
from refseg.modeling.common import MLP, conv, conv_gn
from refseg.modeling.locate import FuseLocate
from refseg.modeling.text import TextFeatures, build_text
from refseg.modeling.visual import build_visual


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


class LTS(EncoderHeadModel):
    """visual encoder + text encoder + LTSHead (modeling/base.py); the head's language-free part runs
    once per image through ``image_context``."""

    def image_context(self, vis: List[torch.Tensor]) -> List[torch.Tensor]:
        """Maps of B_img images -> ``head.image_context``'s per-image tensors."""
        return self.head.image_context([m.to(self.head_dtype) for m in vis])

    def decode_context(self, ctx: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor
                       ) -> Dict[str, torch.Tensor]:
        """``decode`` from ``image_context(vis)``; same outputs up to float rounding."""
        return self.head.decode_context(ctx, txt.to(self.head_dtype), image_index.to(ctx[0].device))


@checked("lts", LTSHead)
def build_lts(
    visual: Union[str, dict] = "efficientnet-lite0",
    text: Union[str, dict] = "minilm",
    *,
    pretrained: bool = True,
    freeze_visual: bool = True,
    freeze_text: bool = True,
    stride2: Optional[bool] = None,
    max_length: int = 24,
    text_tokenizer: Optional[str] = None,
    text_depth: Optional[int] = None,
    image_size: int = 320,
    **head_kwargs,
) -> LTS:
    """LTS on a visual and a text encoder.

    pretrained: load the visual encoder's pretrained weights (False: random,
      for tests; "hf:" encoders always load theirs).
    freeze_visual / freeze_text: keep the encoder fixed (eval mode, no grads)
      so that the engine can cache its features.
    stride2: feed the stride-2 map to the decoder; default True for
      EfficientNet-Lite0, the only encoder with one.
    max_length: text tokens per expression. image_size: S, the letterbox side.
    text_depth: keep only the text encoder's first layers (None: all; a
      truncated MiniLM for a per-expression latency budget).
    head_kwargs: LTSHead arguments (dim, depth, heads, mlp_ratio, text_layers,
      decoder_widths, fine_rank, prior_init).
    """
    if stride2 is None:
        stride2 = visual == "efficientnet-lite0"
    v = build_visual(visual, frozen=freeze_visual, pretrained=pretrained, return_stride2=stride2)
    t = build_text(text, frozen=freeze_text, max_length=max_length, tokenizer=text_tokenizer, depth=text_depth)
    head = build_head(LTSHead, v.channels, v.strides, t.dim, **head_kwargs)
    config = model_config("lts", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, stride2=stride2, max_length=max_length,
                     text_tokenizer=text_tokenizer, image_size=image_size, **depth_field(text_depth))
    return LTS(v, t, head, image_size=image_size, config=config)
