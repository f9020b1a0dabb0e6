"""LTSConfig: the arguments of ``build_lts`` (encoders and LTSHead), one comment per field."""

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from refseg.modeling.build import EncoderConfig


@dataclass
class LTSConfig(EncoderConfig):
    model: ClassVar[str] = "lts"
    stride2: Optional[bool] = None  # feed the stride-2 map to the decoder (None: True for efficientnet-lite0, the only encoder with one)
    dim: int = 128  # width D of the grid tokens
    depth: int = 4  # locate layers (self-attention among grid positions + cross-attention to the text)
    heads: int = 4  # attention heads (must divide dim)
    mlp_ratio: float = 2.0  # MLP hidden width / D
    text_layers: int = 1  # self-attention layers refining the text tokens
    decoder_widths: Tuple[int, ...] = (48, 24, 12)  # decoder channels at strides 16, 8, 4
    fine_rank: int = 4  # K, the per-image stride-2 channels mixed per sentence
    prior_init: float = 0.02  # initial probability of the position prior and the mask ("mostly background")
    grid_strides: Tuple[int, ...] = (32, 16, 8, 4)  # encoder maps folded into each stride-32 grid token (space-to-depth); starts with 32
