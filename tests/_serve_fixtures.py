"""Models and images for the serving, demo and export tests.

`RedModel` is a stand-in with the refseg model interface (encode_image /
encode_text / decode) whose mask is what is strongly red in the image, so a
test knows exactly where the mask must be: `red_square_image()` draws a red
square on grey. An expression containing "nothing" gets the no-target
decision. `tiny_lts_file(tmp)` builds the tiny LTS of the engine tests and
writes it with `export_heads` (encoders included: they are random), to be
loaded by path like any trained checkpoint.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from refseg.modeling.base import RISModel

SQUARE = (20, 30, 60, 70)  # y0, x0, y1, x1 of the red square in red_square_image()


class RedModel(RISModel):
    """mask logit = (R - (G + B) / 2 - 60) / 8 per letterboxed pixel; no-target when the text says "nothing"."""

    def __init__(self, image_size: int = 64):
        super().__init__(image_size)
        self.register_buffer("scale", torch.tensor(8.0))

    def encode_image(self, images: torch.Tensor):
        return [images.float()]  # (B, 3, S, S)

    def encode_text(self, texts, trim=False):
        return torch.tensor([1.0 if "nothing" in t else 0.0 for t in texts])  # (B,)

    def decode(self, vis, txt, image_index):
        x = vis[0][image_index]  # (B, 3, S, S)
        red = x[:, 0] - 0.5 * (x[:, 1] + x[:, 2])  # (B, S, S)
        mask = ((red - 60) / self.scale)[:, None]  # (B, 1, S, S)
        prior = nn.functional.avg_pool2d(mask, 16)  # (B, 1, S/16, S/16)
        return {"mask_logits": mask, "prior_logits": prior, "no_target_logits": txt * 20 - 10}


def red_square_image(h: int = 90, w: int = 120) -> np.ndarray:
    """(h, w, 3) uint8: grey with a red square at SQUARE."""
    img = np.full((h, w, 3), 128, np.uint8)
    y0, x0, y1, x1 = SQUARE
    img[y0:y1, x0:x1] = (230, 30, 30)
    return img


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def tiny_lts(seed: int = 0) -> nn.Module:
    """The tiny LTS with its head's weights perturbed (N(0, 0.2) added, fixed seed).

    A freshly initialised head gives the same mask logit everywhere (its last
    layers start at zero), which would make any comparison of two execution
    paths pass trivially; the perturbed head's logits vary with image and text.
    """
    from _engine_fixtures import tiny_model

    return perturb_head(tiny_model(seed).eval(), seed)


def perturb_head(model: nn.Module, seed: int) -> nn.Module:
    """Add N(0, 0.2) noise (fixed seed) to ``model.head``'s weights, in place; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def tiny_lts_file(folder: Path) -> Path:
    """Write the tiny LTS as ``folder/tiny-lts.safetensors`` + ``.json``; returns the .safetensors path."""
    from refseg.engine.checkpoint import export_heads

    weights, _ = export_heads(tiny_lts(), Path(folder) / "tiny-lts", include_frozen=True)
    return weights
