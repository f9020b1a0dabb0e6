"""SaG: Shatter and Gather (Kim, Kim, Lan, Kwak, ICCV 2023), refseg's text-only head.

    model = build_sag()
    vis = model.encode_image(images)          # (B_img, 3, S, S) uint8 -> the maps at ``levels`` (+ colour maps)
    txt = model.encode_text(texts)            # list[str] -> TextFeatures
    out = model.decode(vis, txt, image_index) # sentence b is about vis[...][image_index[b]]

Trained from (image, expression) pairs alone (supervision "text"; loss:
refseg/methods/sag/loss.py). Steps: 1 shatter, once per image: slot
attention over the stride-16 grid (or fixed colour regions), reconstructed
by a spatial-broadcast decoder (``recon_mse``); 2 self-attention among the
slots; 3 gather: the sentence queries the slots of every image of the batch
(``gathered`` (B, B_img, D)); 4 mask: the relevance-weighted slot attention
of the own image, min-max normalised, as logits (optionally refined on a
finer colour map, ``mask_refine``); 5 a calibrated no-target score.
Design reasoning, options and negatives: docs/methods/sag.md.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from refseg.modeling.base import EncoderHeadModel
from refseg.modeling.build import build_head, checked, depth_field, model_config
from refseg.modeling.common import MLP, TextLayer, coord_grid, sine_position_encoding
from refseg.modeling.limits import ModelConfigError
from refseg.modeling.text import TextFeatures, build_text, masked_mean
from refseg.modeling.visual import build_visual

RGB_CHANNELS = 3  # the optional colour map (``rgb``): mean RGB per cell
RGB_SCALE = 0.25  # (colour - 0.5) / RGB_SCALE: about unit scale, like the layer-normalised features
LOGIT_EPS = 1e-4  # the normalised map is clamped to [eps, 1 - eps] before logit: logits in about [-9.2, 9.2]


SHATTERS = ("slots", "colour")
GATHERS = ("single", "relational")
RELATION_FEATURES = 16  # per (sentence, image, entity): see relation_features
RELATION_HIDDEN, RELATION_DIM = 64, 32  # hidden and output width of the MLP that embeds them
REFINE_TIE = 1e-3  # weight of the coarse map in the refined one: it only breaks ties


def _min_max(m: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) -> the same maps scaled per row to min 0, max 1 (a constant map -> 0)."""
    lo = m.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = m.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (m - lo) / (hi - lo).clamp(min=1e-6)


def refine_entities(attn: torch.Tensor, image: torch.Tensor, sigma: float = 0.1, iters: int = 2) -> torch.Tensor:
    """Entity maps on the grid -> each entity's share of every pixel of a finer colour map.

    attn (B, K, h, w): entity weights per grid cell (summing to 1 over K where any
    entity is; padding entities all 0); image (B, 3, H, W) in [0, 1], H = r h,
    W = r w for an integer r. An entity may claim a pixel only if it holds
    weight in the pixel's cell or one of its 8 neighbours (``support``, the 3 x 3
    max of its weights); among those, the pixel goes to the entities whose mean
    colour is nearest: posterior over K proportional to
    support x exp(-|colour - mean_k|^2 / (2 sigma^2)). The means start as
    each entity's mean colour over its own cells and are re-estimated from the
    posterior ``iters`` - 1 times (a local, colour-only k-means). Reads the
    image alone: no annotation. Returns (B, K, H, W), summing to 1 over K.
    """
    B, K, h, w = attn.shape
    H, W = image.shape[-2:]
    support = F.interpolate(F.max_pool2d(attn, 3, stride=1, padding=1), size=(H, W), mode="nearest")
    weights = F.interpolate(attn, size=(H, W), mode="nearest")  # (B, K, H, W): the grid's own assignment
    allowed = support > 0
    allowed = allowed | ~allowed.any(1, keepdim=True)  # a cell no entity holds (none in practice): all may claim it
    log_support = torch.log(support.clamp(min=1e-6))
    for _ in range(iters):
        mean = torch.einsum("bkhw,bchw->bkc", weights, image) / weights.sum((2, 3))[..., None].clamp(min=1e-6)
        d2 = (image[:, None] - mean[..., None, None]).pow(2).sum(2)  # (B, K, H, W)
        logits = (log_support - d2 / (2 * sigma**2)).masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(logits, dim=1)  # (B, K, H, W)
    return weights


@torch.no_grad()
def colour_segments(colour: torch.Tensor, clusters: int = 16, iters: int = 10):
    """Entities without learning: colour k-means per image, each cluster split into 4-connected regions.

    colour (B, 3, h, w) in [0, 1] -> (seg (B, h*w) int64 entity id per cell, count (B,) entities per
    image; ids 0 .. count - 1, numbered in raster order of their first cell). K-means: Lloyd's
    algorithm from farthest-point seeds (the first the cell nearest the image's mean colour), so
    the result is deterministic; clusters left empty stay empty. Connected regions: labels
    propagated as the minimum over same-cluster 4-neighbours until nothing changes.
    """
    B, _, h, w = colour.shape
    N = h * w
    x = colour.float().flatten(2).transpose(1, 2)  # (B, N, 3)
    k = min(int(clusters), N)
    first = (x - x.mean(1, keepdim=True)).norm(dim=-1).argmin(1)  # (B,)
    centres = [x[torch.arange(B), first]]  # k x (B, 3)
    dist = (x - centres[0][:, None]).norm(dim=-1)  # (B, N) distance to the nearest seed
    for _ in range(k - 1):
        nxt = x[torch.arange(B), dist.argmax(1)]  # (B, 3)
        centres.append(nxt)
        dist = torch.minimum(dist, (x - nxt[:, None]).norm(dim=-1))
    c = torch.stack(centres, 1)  # (B, k, 3)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(-1)  # (B, N)
        onehot = F.one_hot(assign, k).to(x.dtype)  # (B, N, k)
        n = onehot.sum(1)[..., None]  # (B, k, 1)
        c = torch.where(n > 0, onehot.transpose(1, 2) @ x / n.clamp(min=1), c)
    cluster = torch.cdist(x, c).argmin(-1).view(B, h, w)  # (B, h, w)
    lab = torch.arange(N, device=colour.device).view(1, h, w).expand(B, h, w).clone()  # (B, h, w)
    big = N  # larger than any label
    while True:
        new = lab.clone()
        for dim_, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
            nb_lab = torch.roll(lab, step, dim_)
            nb_cl = torch.roll(cluster, step, dim_)
            edge = [slice(None)] * 3  # roll wraps around: the wrapped row / column is not a neighbour
            edge[dim_] = 0 if step == 1 else -1
            nb_lab[tuple(edge)] = big
            new = torch.where(nb_cl == cluster, torch.minimum(new, nb_lab), new)
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab.flatten(1)  # (B, N), each region labelled by its first cell in raster order
    seg = torch.empty_like(lab)
    count = torch.empty(B, dtype=torch.long, device=colour.device)
    for b in range(B):
        ids, seg[b] = torch.unique(lab[b], return_inverse=True)  # sorted: raster order of first cells
        count[b] = len(ids)
    return seg, count


def relation_features(member: torch.Tensor, anchor: torch.Tensor, centre: torch.Tensor, logsize: torch.Tensor,
                      valid: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Geometric features of every entity for the relational gather (``SaGHead.relational_logits``).

    member (B, B_img, K) in [0, 1]: how much each entity is of the kind sentence b names; anchor
    (B, B_img, K): sentence b's anchor distribution; centre (B_img, K, 2) x, y in [0, 1]; logsize
    (B_img, K); valid (B_img, K): real entities (False for padding). Returns (B, B_img, K, 16):
    x, y, log size; exp(-n) for the soft count n of *other* members left of, right of, above,
    below, larger than, smaller than the entity (1 for the extreme one of its kind); the anchor's
    share right of, left of, below, above the entity; the anchor's expected offset to it in x, y
    and distance (the entity itself left out of the anchor). "k left of i" is
    sigmoid((x_i - x_k) / tau), likewise for y and log size.
    """
    B, B_img, K = member.shape
    dt = centre.dtype
    dx = centre[:, :, None, 0] - centre[:, None, :, 0]  # (B_img, K_i, K_k): > 0 when k is left of i
    dy = centre[:, :, None, 1] - centre[:, None, :, 1]  # > 0 when k is above i
    ds = logsize[:, :, None] - logsize[:, None, :]  # > 0 when k is smaller than i
    other = (valid[:, None, :] & ~torch.eye(K, dtype=torch.bool, device=centre.device)[None]).to(dt)
    pairs = torch.stack([torch.sigmoid(dx / tau), torch.sigmoid(-dx / tau), torch.sigmoid(dy / tau),
                         torch.sigmoid(-dy / tau), torch.sigmoid(-ds / tau), torch.sigmoid(ds / tau),
                         dx, dy, (dx.pow(2) + dy.pow(2) + 1e-8).sqrt()], -1)
    pairs = pairs * other[..., None]  # (B_img, K_i, K_k, 9): k left of / right of / above / below / larger /
    # smaller than i, then i's offset from k in x, y, distance; 0 for k = i and for padding k
    counts = torch.einsum("bjk,jikf->bjif", member * valid[None].to(dt), pairs[..., :6])  # (B, B_img, K, 6)
    from_anchor = torch.einsum("bjk,jikf->bjif", anchor, pairs[..., [1, 0, 3, 2, 6, 7, 8]])  # (B, B_img, K, 7)
    absolute = torch.cat([centre, logsize[..., None]], -1)[None].expand(B, -1, -1, -1)  # (B, B_img, K, 3)
    return torch.cat([absolute, torch.exp(-counts), from_anchor], -1)


class SlotAttention(nn.Module):
    """Iterative slot attention with learned initial slots.

    inputs (B, N, D) -> (slots (B, K, D), attn (B, K, N)); ``attn`` is the
    last round's attention, a softmax over the K slots (``attn.sum(1) == 1``
    at every position), values in [0, 1].
    """

    def __init__(self, dim: int, num_slots: int, iters: int = 3, mlp_ratio: float = 2.0, eps: float = 1e-8,
                 init: str = "learned", eval_seed: int = 0):
        super().__init__()
        if init not in ("learned", "gaussian"):
            raise ValueError(f"slot init must be 'learned' or 'gaussian', got {init!r}")
        self.num_slots, self.iters, self.eps, self.init, self.eval_seed = num_slots, iters, eps, init, int(eval_seed)
        self.scale = dim**-0.5
        if init == "learned":
            self.slots_init = nn.Parameter(torch.randn(1, num_slots, dim) * dim**-0.5)
        else:  # original slot attention: slots ~ N(mu, sigma^2), i.i.d. over slots (permutation-symmetric)
            self.slots_mu = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
            self.slots_log_sigma = nn.Parameter(torch.full((1, 1, dim), math.log(dim**-0.5)))
        self.norm_in = nn.LayerNorm(dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.norm_slots = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor):
        B, N, D = x.shape
        x = self.norm_in(x)
        k, v = self.k(x), self.v(x)  # (B, N, D) each
        slots = self.initial_slots(B, x)  # (B, K, D)
        attn = x.new_zeros(B, self.num_slots, N)
        for _ in range(self.iters):
            q = self.q(self.norm_slots(slots))  # (B, K, D)
            attn = torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=1)  # (B, K, N), softmax over slots
            weights = attn + self.eps
            weights = weights / weights.sum(-1, keepdim=True)  # (B, K, N), a weighted mean over positions
            updates = weights @ v  # (B, K, D)
            slots = self.gru(updates.reshape(-1, D), slots.reshape(-1, D)).view(B, self.num_slots, D)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn

    def initial_slots(self, B: int, x: torch.Tensor) -> torch.Tensor:
        """(B, K, D) starting slots: the learned vectors, or mu + sigma * noise; the
        noise is fresh in training and, in eval mode, drawn from a generator seeded
        with ``eval_seed`` (the same K draws for every image: deterministic, and
        independent of the batch an image comes in)."""
        if self.init == "learned":
            return self.slots_init.expand(B, -1, -1)
        D = self.slots_mu.shape[-1]
        if self.training:
            noise = torch.randn(B, self.num_slots, D, device=x.device, dtype=x.dtype)
        else:
            g = torch.Generator().manual_seed(self.eval_seed)
            noise = torch.randn(1, self.num_slots, D, generator=g).to(device=x.device, dtype=x.dtype).expand(B, -1, -1)
        return self.slots_mu + self.slots_log_sigma.exp() * noise


class SlotDecoder(nn.Module):
    """Spatial-broadcast MLP decoder (DINOSAUR): slots (B, K, D) + position codes (N, D)
    -> (reconstruction (B, N, C), alpha (B, K, N) softmax over slots).

    Per slot and cell: ``depth`` hidden layers of width ``hidden`` (the first
    split into a slot term and a position term, added: one layer on
    [slot, position] without forming that input; ReLU), then a linear layer to C
    features and one alpha logit. The reconstruction is the alpha-weighted
    sum of the features; as the feature layer is linear, the hidden vectors
    are mixed first and projected once: sum_k a_k (W h_k + b) = W (sum_k a_k
    h_k) + b, which never forms the (B, K, N, C) tensor.
    """

    def __init__(self, dim: int, out_dim: int, hidden: int = 128, depth: int = 2):
        super().__init__()
        self.slot_in = nn.Linear(dim, hidden)
        self.pos_in = nn.Linear(dim, hidden, bias=False)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.alpha = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, slots: torch.Tensor, pos: torch.Tensor):
        h = self.slot_in(slots)[:, :, None, :] + self.pos_in(pos)[None, None]  # (B, K, N, H)
        for layer in self.hidden:
            h = layer(F.relu(h))
        h = F.relu(h)  # ReLU (as DINOSAUR): GELU's backward cost 4x more here, the largest tensor of the head
        alpha = torch.softmax(self.alpha(h).squeeze(-1), dim=1)  # (B, K, N)
        mixed = torch.einsum("bkn,bknh->bnh", alpha, h)  # (B, N, H)
        return self.out(mixed), alpha  # (B, N, C), (B, K, N)


class SaGHead(nn.Module):
    """The trainable part of SaG.

    visual_channels / visual_strides: the maps ``decode`` receives, finest
      first (stride 16 required, any of 4, 8, 32 besides; default 16, 32).
    text_dim: the text encoder's width.
    dim: width D of tokens, slots and embeddings; num_slots: K; iters: slot
      attention rounds; heads: heads of the text and slot-context layers;
      mlp_ratio: MLP hidden width / D; text_layers: refinement layers over
      the text tokens; context_layers: self-attention layers among slots;
      decoder_hidden / decoder_depth: the slot decoder's MLP;
      logit_scale_init: initial InfoNCE inverse temperature (learned,
      clamped to at most 100); hard_negatives: weight of the same-image
      hard-negative contrast in sag_text_loss (default 0 = off: it is a
      shortcut, see docs/methods/sag.md); shatter: "slots" (slot attention)
      or "colour" (fixed colour regions, a diagnostic; needs rgb);
      colour_clusters: k-means clusters of the colour shatter; grid_stride:
      the grid the shatter works on, 16 (default) or 8 (needs 8 in levels;
      slot_attn and the mask's map are then S/8, prior_logits is their
      2 x 2 max, S/16, as for every model); entity_colour: with the colour
      shatter, add a linear term of each entity's mean colour to its slot;
      slot_init: "learned" (default, K learned vectors) or "gaussian";
      rgb: also group and reconstruct the mean cell colour (encode_image then
      returns one more map); rgb_weight / feature_weight: the weights of the
      colour and feature reconstruction errors in recon_mse; detach_slots:
      no contrastive gradient into the shatter stage; pretrain_steps:
      training steps of reconstruction alone before the contrastive terms;
      mask_refine: 0 (off), 8, 4 or 2: build the mask on that finer colour map
      (refine_sigma: colour scale of the entity shares, refine_iters: their
      rounds; docs/methods/sag.md); gather: "single" (the paper's) or
      "relational" (docs/methods/sag.md); relation_tau: the scale, in image
      widths, of "left of" in the relational features; word_negatives: in
      training, this many one-word swaps of each expression
      (refseg.data.word_negatives) are embedded as its text-side hard
      negatives (SaG.teacher_forcing; the ``word`` term of sag_text_loss;
      0 = off; no parameter, no effect on prediction).
      The defaults are the first version's except hard_negatives (1.0
      before; only the loss reads it, so an older checkpoint predicts the
      same, and resuming one without the key in its config trains without
      the term).
    """

    def __init__(
        self,
        visual_channels: Sequence[int],
        visual_strides: Sequence[int],
        text_dim: int,
        dim: int = 128,
        num_slots: int = 16,
        iters: int = 3,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        text_layers: int = 1,
        context_layers: int = 1,
        decoder_hidden: int = 128,
        decoder_depth: int = 2,
        logit_scale_init: float = 10.0,
        hard_negatives: float = 0.0,
        slot_init: str = "learned",
        rgb: bool = False,
        rgb_weight: float = 1.0,
        feature_weight: float = 1.0,
        detach_slots: bool = False,
        pretrain_steps: int = 0,
        slot_input: str = "features",
        shatter: str = "slots",
        colour_clusters: int = 16,
        grid_stride: int = 16,
        entity_colour: bool = False,
        mask_refine: int = 0,
        refine_sigma: float = 0.1,
        refine_iters: int = 2,
        gather: str = "single",
        relation_tau: float = 0.05,
        word_negatives: int = 0,
    ):
        super().__init__()
        if int(word_negatives) < 0:
            raise ValueError(f"word_negatives must be >= 0, got {word_negatives}")
        self.word_negatives = int(word_negatives)
        self.strides = tuple(int(s) for s in visual_strides)
        if 16 not in self.strides or not set(self.strides) <= {4, 8, 16, 32} or list(self.strides) != sorted(self.strides):
            raise ValueError(f"SaGHead needs the stride-16 map (plus any of 4, 8, 32), finest first; got {self.strides}")
        self.dim, self.num_slots = dim, num_slots
        if grid_stride not in (8, 16) or grid_stride not in self.strides:
            raise ValueError(f"grid_stride must be 16 or 8 and one of the maps' strides {self.strides}, "
                             f"got {grid_stride}")
        self.grid_stride = int(grid_stride)
        self.channels = [int(c) for c in visual_channels]
        self.feat_dim = sum(self.channels)
        self.hard_negatives = float(hard_negatives)
        self.rgb, self.rgb_weight, self.feature_weight = bool(rgb), float(rgb_weight), float(feature_weight)
        self.detach_slots, self.pretrain_steps = bool(detach_slots), int(pretrain_steps)
        if self.pretrain_steps > 0:  # training steps seen (persistent: a resumed run keeps its phase)
            self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        in_dim = self.feat_dim + (RGB_CHANNELS if self.rgb else 0)
        if slot_input not in ("features", "rgb") or (slot_input == "rgb" and not self.rgb):
            raise ValueError(f"slot_input must be 'features' or 'rgb' (the latter with rgb=True), got {slot_input!r}"
                             f" with rgb={self.rgb}")
        self.slot_input = slot_input
        if shatter not in SHATTERS or (shatter == "colour" and not self.rgb):
            raise ValueError(f"shatter must be one of {SHATTERS} ('colour' needs rgb=True), got {shatter!r} "
                             f"with rgb={self.rgb}")
        if int(colour_clusters) < 1:
            raise ValueError(f"colour_clusters must be >= 1, got {colour_clusters}")
        self.shatter_mode, self.colour_clusters = shatter, int(colour_clusters)
        if entity_colour and shatter != "colour":
            raise ValueError("entity_colour needs shatter='colour'")
        if mask_refine not in (0, 2, 4, 8) or (mask_refine and mask_refine >= self.grid_stride):
            raise ValueError(f"mask_refine must be 0 (off) or 2, 4 or 8 and finer than grid_stride "
                             f"{self.grid_stride}, got {mask_refine}")
        if refine_sigma <= 0 or refine_iters < 1:
            raise ValueError(f"refine_sigma must be > 0 and refine_iters >= 1, got {refine_sigma}, {refine_iters}")
        self.mask_refine, self.refine_sigma, self.refine_iters = int(mask_refine), float(refine_sigma), int(refine_iters)
        if gather not in GATHERS:
            raise ValueError(f"gather must be one of {GATHERS}, got {gather!r}")
        if relation_tau <= 0:
            raise ValueError(f"relation_tau must be > 0, got {relation_tau}")
        self.gather_mode, self.relation_tau = gather, float(relation_tau)

        # 1. shatter
        self.feat_in = MLP(RGB_CHANNELS if slot_input == "rgb" else in_dim, 2 * dim, dim)
        self.pos_in = nn.Linear(dim, dim, bias=False)
        self.slot_attention = SlotAttention(dim, num_slots, iters, mlp_ratio, init=slot_init)
        self.decoder = SlotDecoder(dim, in_dim, decoder_hidden, decoder_depth)
        self.size_in = nn.Linear(1, dim, bias=False) if shatter == "colour" else None  # log cell count of an entity
        self.colour_in = nn.Linear(RGB_CHANNELS, dim, bias=False) if entity_colour else None  # its mean colour
        # 2. slot context
        self.context = nn.ModuleList([TextLayer(dim, heads, mlp_ratio) for _ in range(context_layers)])
        self.context_norm = nn.LayerNorm(dim)
        # 3. gather
        self.text_in = nn.Linear(text_dim, dim)
        self.text_layers = nn.ModuleList([TextLayer(dim, heads, mlp_ratio) for _ in range(text_layers)])
        self.sent_in = nn.Linear(text_dim, dim)
        self.sent_norm = nn.LayerNorm(dim)
        self.gather_q = nn.Linear(dim, dim)
        self.gather_k = nn.Linear(dim, dim)
        self.gather_v = nn.Linear(dim, dim)
        self.gather_out = nn.Linear(dim, dim)
        self.text_embed = nn.Linear(dim, dim)
        if gather == "relational":  # see relational_logits
            self.member_log_scale = nn.Parameter(torch.zeros(()))  # membership = exp(a (logit - best logit))
            self.anchor_pool = nn.Linear(dim, 1)  # the anchor phrase: attention pooling over the text tokens
            self.anchor_q = nn.Linear(dim, dim)
            self.anchor_k = nn.Linear(dim, dim)
            self.relation_in = MLP(RELATION_FEATURES, RELATION_HIDDEN, RELATION_DIM)
            self.relation_q = nn.Linear(dim, RELATION_DIM)
            self.relation_v = nn.Linear(RELATION_DIM, dim, bias=False)
            nn.init.zeros_(self.relation_q.weight)  # starts as the single gather
            nn.init.zeros_(self.relation_q.bias)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        # 5. no target: exp(a) * (b - cos), a = log 10, b = -1.5 -> logits in [-25, -5] at the start
        self.nt_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.nt_bias = nn.Parameter(torch.tensor(-1.5))

    def shatter(self, vis: List[torch.Tensor]):
        """Maps at ``self.strides`` [(B_img, C_i, S/s_i, S/s_i)] ->
        (slots (B_img, K, D), attn (B_img, K, N), recon_mse (B_img,), (h, w)), N = h*w on the stride-16 grid."""
        got = [int(m.shape[1]) for m in vis]
        want = self.channels + ([RGB_CHANNELS] if self.rgb else []) + ([RGB_CHANNELS] if self.mask_refine else [])
        if got != want:
            raise ValueError(f"SaGHead expects maps with {want} channels at strides {self.strides}"
                             f"{' + the RGB map' if self.rgb else ''}"
                             f"{f' + the stride-{self.mask_refine} colour map' if self.mask_refine else ''}, got {got} "
                             "(features cached for other `levels`, `rgb` or `mask_refine`?)")
        maps = dict(zip(self.strides, vis[: len(self.strides)]))
        B_img, _, h, w = maps[self.grid_stride].shape
        grid = []
        for stride, m in maps.items():
            if stride < self.grid_stride:
                m = F.adaptive_avg_pool2d(m, (h, w))  # (B_img, C, h, w), the mean over each grid cell
            elif stride > self.grid_stride:
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)  # (B_img, C, h, w)
            grid.append(m)
        feats = torch.cat(grid, 1).flatten(2).transpose(1, 2)  # (B_img, N, C)
        target = F.layer_norm(feats, (self.feat_dim,)).detach()  # (B_img, N, C), the reconstruction target
        if self.rgb:
            cell_rgb = vis[len(self.strides)].to(feats.dtype)  # (B_img, 3, h', w'), mean RGB in [0, 1]
            if cell_rgb.shape[-2:] != (h, w):
                cell_rgb = F.adaptive_avg_pool2d(cell_rgb, (h, w))
            colour = ((cell_rgb - 0.5) / RGB_SCALE).flatten(2).transpose(1, 2)  # (B_img, N, 3), about unit scale
            target = torch.cat([target, colour.detach()], -1)  # (B_img, N, C + 3)
        pe = sine_position_encoding(h, w, self.dim, feats.device, feats.dtype)  # (N, D)
        tokens = target[..., self.feat_dim:] if self.slot_input == "rgb" else target  # what the slots compete for
        x = self.feat_in(tokens) + self.pos_in(pe)  # (B_img, N, D)
        if self.shatter_mode == "colour":  # fixed entities: colour clusters split into connected regions
            seg, count = colour_segments(cell_rgb.float(), self.colour_clusters)
            attn = F.one_hot(seg, int(count.amax())).transpose(1, 2).to(x.dtype)  # (B_img, K, N), K = most entities
            size = attn.sum(-1, keepdim=True).clamp(min=1)  # (B_img, K, 1) cells per entity (padding: 1)
            slots = (attn @ x) / size + self.size_in(torch.log(size))  # (B_img, K, D)
            if self.colour_in is not None:  # the entity's mean colour, straight into its slot
                slots = slots + self.colour_in((attn @ colour) / size)
            return slots, attn, x.new_zeros(B_img), (h, w)
        slots, attn = self.slot_attention(x)  # (B_img, K, D), (B_img, K, N)
        recon, _ = self.decoder(slots, pe)  # (B_img, N, C (+ 3))
        err = (recon - target).pow(2)  # (B_img, N, C (+ 3))
        recon_mse = self.feature_weight * err[..., : self.feat_dim].mean((1, 2))  # (B_img,)
        if self.rgb:
            recon_mse = recon_mse + self.rgb_weight * err[..., self.feat_dim:].mean((1, 2))
        return slots, attn, recon_mse, (h, w)

    def encode_sentence(self, txt: TextFeatures) -> Tuple[torch.Tensor, torch.Tensor]:
        """TextFeatures (B rows) -> (s (B, D), the gather query's source; the refined tokens (B, L, D))."""
        t = self.text_in(txt.tokens)  # (B, L, D)
        for layer in self.text_layers:
            t = layer(t, txt.mask)
        s = self.sent_norm(self.sent_in(txt.sentence) + masked_mean(t, txt.mask))  # (B, D)
        return s, t

    def relational_logits(self, s: torch.Tensor, t: torch.Tensor, tmask: torch.Tensor, ctx: torch.Tensor,
                          valid: torch.Tensor, attn: torch.Tensor, hw) -> Tuple[torch.Tensor, torch.Tensor]:
        """The relational gather's logits (B, B_img, K) and the relation embeddings (B, B_img, K, R).

        Round 1 scores every entity as the single gather does (``base``) and turns it into a soft
        membership m = exp(a (base - max base)) in [0, 1] ("is of the kind the sentence names", 1 for
        the best match, a learned); a second query, from the sentence vector plus an attention-pooled
        phrase of its tokens, picks an anchor distribution (softmax over entities). From the
        entities' centroids and sizes (their cells on the grid) ``relation_features`` gives each
        entity 16 geometric features per (sentence, image) pair: where it is, whether it is the
        extreme one of its kind in each direction and in size ("the leftmost hexagon", "the large
        circle"), and where the anchor is from it ("left of the blue circle"). An MLP embeds them
        (width R = 32: there are B x B_img x K of them); the logits are base + q(s) . embedding /
        sqrt(R) (q starts at zero, so training starts from the single gather), and the gathered
        value adds a linear map of the relevance-weighted embedding to the single gather's, so the
        contrastive loss sees the relation the gather chose.
        """
        B_img, K, _ = ctx.shape
        h, w = hw
        cells = (coord_grid(h, w, ctx.device, ctx.dtype) + 1) / 2  # (N, 2) x, y of the cell centres in [0, 1]
        size = attn.sum(-1)  # (B_img, K) cells per entity
        centre = (attn @ cells) / size[..., None].clamp(min=1e-6)  # (B_img, K, 2)
        logsize = torch.log(size.clamp(min=1e-3) / (h * w))  # (B_img, K)
        # round 1: kind membership (the single gather's logits) and the anchor
        base = torch.einsum("bd,jkd->bjk", self.gather_q(s), self.gather_k(ctx)) / math.sqrt(self.dim)
        best = base.masked_fill(~valid[None], float("-inf")).amax(-1, keepdim=True)  # (B, B_img, 1)
        member = torch.exp(self.member_log_scale.exp() * (base - best).clamp(max=0))  # (B, B_img, K), 1 for the best
        pool = self.anchor_pool(t).squeeze(-1).masked_fill(~tmask.bool(), float("-inf"))  # (B, L)
        phrase = torch.einsum("bl,bld->bd", torch.softmax(pool, -1), t)  # (B, D)
        anchor_logits = torch.einsum("bd,jkd->bjk", self.anchor_q(s + phrase), self.anchor_k(ctx)) / math.sqrt(self.dim)
        anchor = torch.softmax(anchor_logits.masked_fill(~valid[None], float("-inf")), -1)  # (B, B_img, K)
        geo = relation_features(member, anchor, centre, logsize, valid, self.relation_tau)  # (B, B_img, K, 16)
        rel = self.relation_in(geo)  # (B, B_img, K, R), R = RELATION_DIM: small, as there are B x B_img x K
        logits = base + torch.einsum("br,bjkr->bjk", self.relation_q(s), rel) / math.sqrt(rel.shape[-1])
        return logits, rel

    def forward(self, vis: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor,
                word_negatives: Optional[TextFeatures] = None, word_negative_of: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """word_negatives (M rows) / word_negative_of (M,) long: training only, the text-side negatives
        and the sentence row each belongs to; their embeddings come back as word_negative_embedding."""
        idx = image_index
        S = vis[0].shape[-1] * self.strides[0]

        # 1-2. shatter (once per image), slot context
        slots, attn, recon_mse, (h, w) = self.shatter(vis)
        ctx = slots.detach() if self.detach_slots else slots  # detached: the slots learn from reconstruction alone
        valid = attn.amax(-1) > 0  # (B_img, K): False for the padding entities of the colour shatter
        for layer in self.context:
            ctx = layer(ctx, valid)
        ctx = self.context_norm(ctx)  # (B_img, K, D)

        # 3. gather, every sentence from every image
        s, t = self.encode_sentence(txt)  # (B, D), (B, L, D)
        if self.gather_mode == "relational":
            logits, rel = self.relational_logits(s, t, txt.mask, ctx, valid, attn, (h, w))  # (B, B_img, K), (.., R)
        else:
            logits = torch.einsum("bd,jkd->bjk", self.gather_q(s), self.gather_k(ctx)) / math.sqrt(self.dim)
        relevance = torch.softmax(logits.masked_fill(~valid[None], float("-inf")), dim=-1)  # (B, B_img, K)
        mixed = torch.einsum("bjk,jkd->bjd", relevance, self.gather_v(ctx))  # (B, B_img, D)
        if self.gather_mode == "relational":  # plus the chosen entities' relation embeddings
            mixed = mixed + self.relation_v(torch.einsum("bjk,bjkr->bjr", relevance, rel))
        gathered = self.gather_out(mixed)  # (B, B_img, D)
        gathered = F.normalize(gathered, dim=-1)
        text_embedding = F.normalize(self.text_embed(s), dim=-1)  # (B, D)
        B = s.shape[0]
        rows = torch.arange(B, device=s.device)
        own_relevance = relevance[rows, idx]  # (B, K)

        # 4. mask: relevance-weighted slot attention of the own image, min-max normalised
        m = _min_max((own_relevance[:, :, None] * attn[idx]).sum(1).view(B, 1, h, w))  # (B, 1, h, w), min 0, max 1
        prior = torch.logit(m if self.grid_stride == 16 else F.max_pool2d(m, 2), eps=LOGIT_EPS)  # (B, 1, S/16, S/16)
        if self.mask_refine:  # each entity's share of every fine pixel, from its colour (see refine_entities)
            post = refine_entities(attn.view(attn.shape[0], attn.shape[1], h, w).float(), vis[-1].float(),
                                   self.refine_sigma, self.refine_iters)  # (B_img, K, H, W)
            fine = _min_max(torch.einsum("bk,bkhw->bhw", own_relevance.float(), post[idx])[:, None])  # (B, 1, H, W)
            # ties inside the chosen entity go to the coarse map's peak, so the argmax stays in its interior
            coarse = F.interpolate(m.float(), size=fine.shape[-2:], mode="bilinear", align_corners=False)
            fine = ((1 - REFINE_TIE) * fine + REFINE_TIE * coarse).to(m.dtype)
            up = F.interpolate(fine, size=(S, S), mode="bilinear", align_corners=False)  # (B, 1, S, S)
        else:
            up = F.interpolate(m, size=(S, S), mode="bilinear", align_corners=False)  # (B, 1, S, S)
        mask = torch.logit(up, eps=LOGIT_EPS)  # (B, 1, S, S)

        # 5. no target: calibrated, detached own-image similarity
        own_sim = (text_embedding * gathered[rows, idx]).sum(-1).detach()  # (B,)
        no_target = self.nt_log_scale.exp() * (self.nt_bias - own_sim)  # (B,)

        # shatter pre-training: the contrastive terms are off for the first pretrain_steps training steps
        contrast_weight = torch.ones((), device=s.device)
        if self.pretrain_steps > 0:
            contrast_weight = (self.steps_seen >= self.pretrain_steps).to(contrast_weight.dtype)
            if self.training and torch.is_grad_enabled():
                self.steps_seen += 1

        extra = {}
        if word_negatives is not None:  # embedded like the sentences: the text side of the contrast
            s_neg, _ = self.encode_sentence(word_negatives.to(s.dtype))  # (M, D)
            extra = {"word_negative_embedding": F.normalize(self.text_embed(s_neg), dim=-1),
                     "word_negative_of": word_negative_of.to(s.device).long()}

        return {
            **extra,
            "mask_logits": mask,
            "prior_logits": prior,
            "no_target_logits": no_target,
            "text_embedding": text_embedding,
            "gathered": gathered,
            "logit_scale": self.log_logit_scale.clamp(max=math.log(100.0)).exp(),
            "relevance": own_relevance,
            "slot_attn": attn.view(attn.shape[0], attn.shape[1], h, w),
            "recon_mse": recon_mse,
            "hard_negative_weight": torch.tensor(self.hard_negatives, device=s.device),
            "contrast_weight": contrast_weight,
        }


class SaG(EncoderHeadModel):
    """visual encoder + text encoder + SaGHead.

    The preprocessing, ``encode_text``, ``decode`` and ``forward`` are
    EncoderHeadModel's; ``encode_image`` keeps only the maps the head
    reads (``head.strides``, by default stride 16 and 32), so a feature
    cache holds nothing else.

    ``decode`` returns mask_logits (B, 1, S, S), prior_logits (B, 1, S/16,
    S/16), no_target_logits (B,) (the model contract), and for the loss and
    analysis: text_embedding (B, D) unit; gathered (B, B_img, D) unit, sentence
    b's embedding gathered from image j; logit_scale (); relevance (B, K)
    over the slots of the own image; slot_attn (B_img, K, S/16, S/16);
    recon_mse (B_img,); hard_negative_weight ().
    """

    def encode_image(self, images: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, S, S) uint8 RGB in [0, 255] -> the maps at ``head.strides`` (default stride 16
        (B, C16, S/16, S/16) and stride 32 (B, C32, S/32, S/32)), finest first; with
        ``head.rgb`` then the mean colour per grid cell (B, 3, S/g, S/g) in [0, 1], g = ``head.grid_stride``;
        with ``head.mask_refine`` r last the mean colour per r x r block (B, 3, S/r, S/r) in [0, 1]."""
        maps = dict(zip(self.visual.strides, super().encode_image(images)))
        out = [maps[s] for s in self.head.strides]
        cells, r = self.head.rgb, self.head.mask_refine
        rgb = images.to(maps[16].dtype) / 255.0 if cells or r else None  # (B, 3, S, S) in [0, 1]
        if cells:  # mean colour of each grid cell (cached with the maps)
            out.append(F.adaptive_avg_pool2d(rgb, maps[self.head.grid_stride].shape[-2:]))
        if r:  # the colour map the mask is refined on (mean RGB per r x r block)
            out.append(F.adaptive_avg_pool2d(rgb, (rgb.shape[-2] // r, rgb.shape[-1] // r)))
        return out


@checked("sag", SaGHead)
def build_sag(
    visual: Union[str, dict] = "efficientnet-lite0",
    text: Union[str, dict] = "minilm",
    *,
    pretrained: bool = True,
    freeze_visual: bool = True,
    freeze_text: bool = True,
    max_length: int = 24,
    text_tokenizer: Optional[str] = None,
    text_depth: Optional[int] = None,
    image_size: int = 320,
    levels: tuple[int, ...] = (16, 32),
    **head_kwargs,
) -> SaG:
    """SaG (trained from text alone) on a visual and a text encoder.

    Arguments as build_lts (no stride2). levels: the encoder strides whose
    maps, resampled to the stride-16 grid and concatenated, SaG groups into
    slots and reconstructs (16 required; any of 4, 8, 32 besides); only
    these maps are kept by encode_image and the feature cache.
    head_kwargs: SaGHead arguments (dim, num_slots, iters, heads,
    mlp_ratio, text_layers, context_layers, decoder_hidden, decoder_depth,
    logit_scale_init, hard_negatives, slot_init, rgb, rgb_weight,
    feature_weight, detach_slots, pretrain_steps, slot_input, shatter,
    colour_clusters, grid_stride, entity_colour).
    """
    v = build_visual(visual, frozen=freeze_visual, pretrained=pretrained)
    t = build_text(text, frozen=freeze_text, max_length=max_length, tokenizer=text_tokenizer, depth=text_depth)
    channels = dict(zip(v.strides, v.channels))
    levels = tuple(sorted(int(s) for s in levels))
    if 16 not in levels or not set(levels) <= set(channels):
        raise ModelConfigError(f"config field 'levels' must include 16 and name only the visual encoder's strides "
                               f"{sorted(channels)}, got {list(levels)}")
    head = build_head(SaGHead, [channels[s] for s in levels], levels, t.dim, **head_kwargs)
    config = model_config("sag", head_kwargs, visual=visual, text=text, pretrained=pretrained, freeze_visual=freeze_visual,
                     freeze_text=freeze_text, max_length=max_length, text_tokenizer=text_tokenizer,
                     image_size=image_size, levels=list(levels), **depth_field(text_depth))
    return SaG(v, t, head, image_size=image_size, config=config)
