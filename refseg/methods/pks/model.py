"""PKS: parallel Position-Kernel-Segmentation (Li, Sun, Xiao, Lim, Zhao), trainable on masks or clicks.

    model = build_pks()
    vis = model.encode_image(images)                       # encoder maps + the pooled image
    txt = model.encode_text(texts)
    out = model.decode(vis, txt, image_index)              # inference: kernel read at the heatmap peak
    out = model.decode(vis, txt, image_index, centers=c)   # training (teacher_forcing): at the target centre

Branches: 1 position (LTS's FuseLocate -> centre heatmap on the stride-16
grid), 2 kernel (sub-cell kernel features sampled at the peak -> controller
-> a CondInst dynamic mask head), 3 language-free mask features (FPN, once
per image), 4 no-target logit, 5 optional referent-region map. ``vis`` is
the encoder maps (finest first) + [the image average-pooled to
``mask_stride``, (B, 3, S/r, S/r) in 0..255], which the click loss reads.

``out``: mask_logits (B, 1, S, S); prior_logits = heatmap_logits (B, 1,
S/16, S/16); no_target_logits (B,); mask_logits_low (B, 1, S/r, S/r);
image_lab (B, 3, S/r, S/r); kernel (B, n_params); peak (B, 2) letterboxed
(x, y) pixels; region_logits (B, 1, S/16, S/16) with ``region_head``.
Design reasoning: docs/methods/pks.md.
"""

import math
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from refseg.modeling.base import EncoderHeadModel
from refseg.modeling.build import build_head, checked, depth_field, model_config
from refseg.modeling.common import MLP, conv_gn
from refseg.modeling.locate import FuseLocate
from refseg.modeling.text import TextFeatures, build_text
from refseg.modeling.visual import build_visual

HEATMAP_STRIDE = 16
PEAK_SOURCES = ("heatmap", "joint")


class MaskBranch(nn.Module):
    """Language-free mask features: FPN over strides 32/16/8/4 (+2) -> (B_img, mask_channels, S/r, S/r).

    maps: {stride: (B_img, C_s, S/s, S/s)}; only visual maps go in.
    """

    def __init__(self, channels: Dict[int, int], width: int, fine_width: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.lat = nn.ModuleDict({str(s): conv_gn(channels[s], width, k=1) for s in (32, 16, 8, 4)})
        self.smooth4 = conv_gn(width, width)
        if stride == 2:
            self.red2 = conv_gn(width, fine_width, k=1)
            self.lat2 = conv_gn(channels[2], fine_width, k=1)
            self.smooth2 = conv_gn(fine_width, fine_width)
        self.out = nn.Conv2d(fine_width if stride == 2 else width, out_channels, 1)

    def forward(self, maps: Dict[int, torch.Tensor]) -> torch.Tensor:
        p = self.lat["32"](maps[32])  # (B_img, W, S/32, S/32)
        for s in (16, 8, 4):
            lateral = self.lat[str(s)](maps[s])  # (B_img, W, S/s, S/s)
            p = lateral + F.interpolate(p, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        p = self.smooth4(p)  # (B_img, W, S/4, S/4)
        if self.stride == 2:
            lateral = self.lat2(maps[2])  # (B_img, W2, S/2, S/2)
            p = self.red2(F.interpolate(p, size=lateral.shape[-2:], mode="bilinear", align_corners=False))
            p = self.smooth2(p + lateral)  # (B_img, W2, S/2, S/2)
        return self.out(p)  # (B_img, mask_channels, S/r, S/r)


class PKSHead(FuseLocate):
    """The trainable part of PKS.

    visual_channels / visual_strides: the visual encoder's ``channels`` and
      ``strides`` (finest first; must hold 4, 8, 16, 32, optionally 2).
    text_dim: the text encoder's width.
    dim, depth, heads, mlp_ratio, text_layers: the position branch (as LTS).
    fpn_width: FPN channels; fine_width: channels of the stride-2 stage;
      mask_channels: language-free mask feature channels (CondInst: 8).
    kernel_channels / kernel_layers: the dynamic mask head (CondInst: 8 / 3).
    mask_stride: 4, or 2 (needs the stride-2 map); None = the finest available.
    heatmap_init / mask_init: initial probabilities (biases) of the heatmap and mask.
    grid_strides: encoder maps folded into each grid token (LTS's FuseLocate).
    region_head: add the referent-region map (docs/methods/pks.md): a dense
      training signal for the located tokens; off in the first shipped models.
    peak_source: "heatmap" (the heatmap alone picks the peak) or "joint" (the
      product of the heatmap's and the region map's probabilities; needs
      ``region_head``). Read at every forward, so it can be switched on a
      loaded model.
    """

    def __init__(
        self,
        visual_channels: Sequence[int],
        visual_strides: Sequence[int],
        text_dim: int,
        dim: int = 128,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        text_layers: int = 1,
        fpn_width: int = 32,
        fine_width: int = 16,
        mask_channels: int = 8,
        kernel_channels: int = 8,
        kernel_layers: int = 3,
        mask_stride: Optional[int] = None,
        heatmap_init: float = 0.01,
        mask_init: float = 0.02,
        grid_strides: Sequence[int] = (32, 16, 8, 4),
        region_head: bool = False,
        peak_source: str = "heatmap",
    ):
        super().__init__()
        self.strides = tuple(int(s) for s in visual_strides)
        if peak_source not in PEAK_SOURCES:
            raise ValueError(f"peak_source must be one of {PEAK_SOURCES}, got {peak_source!r}")
        if peak_source == "joint" and not region_head:
            raise ValueError("peak_source 'joint' needs region_head=True")
        self.peak_source = peak_source
        if not {4, 8, 16, 32} <= set(self.strides) or not set(self.strides) <= {2, 4, 8, 16, 32}:
            raise ValueError(f"PKSHead needs strides 4, 8, 16, 32 (and optionally 2), got {self.strides}")
        if mask_stride is None:
            mask_stride = min(self.strides)
        if mask_stride not in (2, 4) or mask_stride not in self.strides:
            raise ValueError(f"mask_stride must be 4, or 2 with a stride-2 map; got {mask_stride} for {self.strides}")
        if kernel_layers < 1:
            raise ValueError("kernel_layers must be >= 1")
        ch = dict(zip(self.strides, visual_channels))
        self.mask_stride = int(mask_stride)

        # 1. position branch: LTS fusion + locate layers -> centre heatmap on the stride-16 grid
        self._build_fuse_locate(ch, text_dim, dim, depth, heads, mlp_ratio, text_layers, grid_strides)
        self.heatmap = nn.Linear(dim, 4)  # 2x2 sub-cells per token
        self.region = nn.Linear(dim, 4) if region_head else None  # 2x2 sub-cells: the referent-region map

        # 2. kernel branch: sub-cell kernel features -> controller -> dynamic conv weights
        widths = [mask_channels + 2] + [kernel_channels] * (kernel_layers - 1) + [1]
        self.kernel_shapes = list(zip(widths[1:], widths[:-1]))  # (out, in) per dynamic layer
        self.n_params = sum(o * i + o for o, i in self.kernel_shapes)
        self.kernel_feat = nn.Linear(dim, 4 * dim)
        self.controller = MLP(2 * dim, dim, self.n_params)

        # 3. segmentation branch (language-free)
        self.mask_branch = MaskBranch(ch, fpn_width, fine_width, mask_channels, self.mask_stride)

        # 4. no-target
        self.nt_query = nn.Linear(dim, dim)
        self.nt_mlp = MLP(2 * dim + 1, dim, 1)

        nn.init.constant_(self.heatmap.bias, -math.log((1 - heatmap_init) / heatmap_init))
        if self.region is not None:
            nn.init.constant_(self.region.bias, -math.log((1 - mask_init) / mask_init))
        last_bias = self.n_params - 1  # the final dynamic layer's bias: start predicting "mostly background"
        with torch.no_grad():
            self.controller.fc2.weight[last_bias].zero_()
            self.controller.fc2.bias[last_bias] = -math.log((1 - mask_init) / mask_init)

    def forward(
        self, vis: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor, centers: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """vis: encoder maps (finest first) + [pooled image (B_img, 3, S/r, S/r) 0..255];
        centers: (B, 2) letterboxed (x, y) pixels or None; NaN rows use the predicted peak."""
        maps = dict(zip(self.strides, vis[:-1]))
        pooled_image = vis[-1]
        idx = image_index
        S = maps[4].shape[-1] * 4

        # 1. position branch
        x, t, s, (h, w) = self.fuse_locate(maps, txt, idx)  # x: (B, N, D)
        B = x.shape[0]
        heat = self.heatmap(x).transpose(1, 2).reshape(B, 4, h, w)  # (B, 4, h, w)
        heat = F.pixel_shuffle(heat, 2)  # (B, 1, 2h, 2w)
        region = None
        if self.region is not None:
            region = F.pixel_shuffle(self.region(x).transpose(1, 2).reshape(B, 4, h, w), 2)  # (B, 1, 2h, 2w)

        # 2. kernel branch: kernel features at the peak -> dynamic conv parameters
        joint = region.detach() if self.peak_source == "joint" else None
        peak = heatmap_peak(heat.detach(), HEATMAP_STRIDE, joint)  # (B, 2) pixels
        if centers is not None:
            centers = centers.to(peak.device, peak.dtype)
            peak = torch.where(torch.isfinite(centers).all(1, keepdim=True), centers, peak)
        kf = self.kernel_feat(x).transpose(1, 2).reshape(B, 4 * self.dim, h, w)  # (B, 4D, h, w)
        kf = F.pixel_shuffle(kf, 2)  # (B, D, 2h, 2w)
        kf = sample_at(kf, peak, HEATMAP_STRIDE)  # (B, D)
        kernel = self.controller(torch.cat([kf, s], -1))  # (B, n_params)

        # 3. segmentation branch: language-free features (once per image) + coordinates relative to the peak
        feats = self.mask_branch(maps)[idx]  # (B, C, Hm, Wm)
        Hm, Wm = feats.shape[-2:]
        r = self.mask_stride
        ys = torch.arange(Hm, device=feats.device, dtype=peak.dtype) * r + (r - 1) / 2  # cell centres, pixels
        xs = torch.arange(Wm, device=feats.device, dtype=peak.dtype) * r + (r - 1) / 2
        unit = S / 4
        rel_x = ((xs[None, :] - peak[:, :1]) / unit)[:, None, None, :].expand(B, 1, Hm, Wm)  # (B, 1, Hm, Wm)
        rel_y = ((ys[None, :] - peak[:, 1:]) / unit)[:, None, :, None].expand(B, 1, Hm, Wm)  # (B, 1, Hm, Wm)
        y = torch.cat([feats, rel_x.to(feats.dtype), rel_y.to(feats.dtype)], 1).flatten(2)  # (B, C+2, Hm*Wm)
        y = dynamic_mask_head(y, kernel, self.kernel_shapes)  # (B, 1, Hm*Wm)
        low = y.view(B, 1, Hm, Wm)  # (B, 1, S/r, S/r)
        mask = F.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)  # (B, 1, S, S)

        # 4. no-target (as LTS)
        q = self.nt_query(s)  # (B, D)
        attn = torch.softmax((x @ q[:, :, None]).squeeze(-1) / math.sqrt(self.dim), dim=-1)  # (B, N)
        pooled = (attn[:, :, None] * x).sum(1)  # (B, D)
        top = heat.flatten(1).amax(1, keepdim=True)  # (B, 1)
        no_target = self.nt_mlp(torch.cat([pooled, s, top], -1)).squeeze(-1)  # (B,)

        lab = rgb_to_lab(pooled_image.float() / 255).to(mask.dtype)[idx]  # (B, 3, S/r, S/r)
        extra = {} if region is None else {"region_logits": region}
        return {
            **extra,
            "mask_logits": mask,
            "prior_logits": heat,
            "heatmap_logits": heat,
            "no_target_logits": no_target,
            "mask_logits_low": low,
            "image_lab": lab,
            "kernel": kernel,
            "peak": peak,
        }


def dynamic_mask_head(x: torch.Tensor, params: torch.Tensor, shapes: Sequence) -> torch.Tensor:
    """Per-sample 1 x 1 convolutions: x (B, C_in, P) -> (B, 1, P).

    params: (B, n_params), layer by layer [weight (out, in) row-major, bias (out)];
    shapes: [(out, in)] per layer. ReLU between layers, none after the last.
    """
    B = x.shape[0]
    offset = 0
    for i, (o, c) in enumerate(shapes):
        weight = params[:, offset:offset + o * c].reshape(B, o, c)  # (B, out, in)
        offset += o * c
        bias = params[:, offset:offset + o]  # (B, out)
        offset += o
        x = torch.bmm(weight, x) + bias[:, :, None]  # (B, out, P)
        if i < len(shapes) - 1:
            x = F.relu(x)
    return x


def heatmap_peak(logits: torch.Tensor, stride: int, weight_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, 1, h, w) heatmap logits -> (B, 2) peak (x, y) in pixels (pixel centres at integers).

    The argmax cell, refined by the centroid of sigmoid probabilities over its
    3 x 3 neighbourhood (cells outside the map weigh 0). weight_logits
    (B, 1, h, w), optional: the probabilities are multiplied by their sigmoid
    first (PKSHead's ``peak_source="joint"``).
    """
    B, _, h, w = logits.shape
    p = torch.sigmoid(logits.float())  # (B, 1, h, w)
    if weight_logits is not None:
        p = p * torch.sigmoid(weight_logits.float())
    ys = torch.arange(h, device=p.device, dtype=p.dtype)[:, None].expand(h, w)
    xs = torch.arange(w, device=p.device, dtype=p.dtype)[None, :].expand(h, w)
    den = F.avg_pool2d(p, 3, 1, 1)  # (B, 1, h, w); the common 1/9 cancels
    cx = F.avg_pool2d(p * xs, 3, 1, 1) / den.clamp(min=1e-12)
    cy = F.avg_pool2d(p * ys, 3, 1, 1) / den.clamp(min=1e-12)
    best = p.flatten(1).argmax(1)  # (B,)
    cell = torch.stack([cx.flatten(1).gather(1, best[:, None]), cy.flatten(1).gather(1, best[:, None])], -1)[:, 0]
    return (cell + 0.5) * stride - 0.5  # (B, 2)


def sample_at(features: torch.Tensor, points: torch.Tensor, stride: int) -> torch.Tensor:
    """Bilinear sample of (B, C, h, w) stride-``stride`` features at (B, 2) pixel points -> (B, C)."""
    h, w = features.shape[-2:]
    grid = torch.stack([(points[:, 0] + 0.5) / (stride * w), (points[:, 1] + 0.5) / (stride * h)], -1) * 2 - 1
    grid = grid.to(features.dtype)[:, None, None, :]  # (B, 1, 1, 2)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0, 0]


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIE LAB (D65): L in [0, 100], a/b about [-128, 127]."""
    linear = torch.where(rgb > 0.04045, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423],
                      [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)  # (B, 3, H, W)
    white = torch.tensor([0.950456, 1.0, 1.088754], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp(min=1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    L = torch.where(t[:, 1:2] > 0.008856, 116 * f[:, 1:2] - 16, 903.3 * t[:, 1:2])
    a = 500 * (f[:, 0:1] - f[:, 1:2])
    b = 200 * (f[:, 1:2] - f[:, 2:3])
    return torch.cat([L, a, b], 1)


class PKS(EncoderHeadModel):
    """visual encoder + text encoder + PKSHead (modeling/base.py), with the pooled image appended to
    the visual maps; ``decode(..., centers=)`` in training (the method's teacher_forcing)."""

    def encode_image(self, images: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, S, S) uint8 RGB -> encoder maps (finest first) + [image avg-pooled to the mask
        stride, (B, 3, S/r, S/r) float in 0..255]."""
        maps = super().encode_image(images)
        r = self.head.mask_stride
        return list(maps) + [F.avg_pool2d(images.to(self.pixel_mean.dtype), r)]


@checked("pks", PKSHead)
def build_pks(
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
) -> PKS:
    """PKS (full masks or clicks) on a visual and a text encoder.

    Arguments as build_lts; stride2 (default True for EfficientNet-Lite0)
    feeds the stride-2 map to the language-free mask branch, whose
    ``mask_stride`` then defaults to 2. head_kwargs: PKSHead arguments (dim,
    depth, heads, mlp_ratio, text_layers, fpn_width, fine_width,
    mask_channels, kernel_channels, kernel_layers, mask_stride,
    heatmap_init, mask_init).
    """
    if stride2 is None:
        stride2 = visual == "efficientnet-lite0"
    v = build_visual(visual, frozen=freeze_visual, pretrained=pretrained, return_stride2=stride2)
    t = build_text(text, frozen=freeze_text, max_length=max_length, tokenizer=text_tokenizer, depth=text_depth)
    head = build_head(PKSHead, v.channels, v.strides, t.dim, **head_kwargs)
    config = model_config("pks", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, stride2=stride2, max_length=max_length,
                     text_tokenizer=text_tokenizer, image_size=image_size, **depth_field(text_depth))
    return PKS(v, t, head, image_size=image_size, config=config)
