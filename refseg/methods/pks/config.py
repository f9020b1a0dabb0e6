"""PKSConfig: the arguments of ``build_pks`` (encoders and PKSHead), one comment per field."""

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from refseg.modeling.build import EncoderConfig


@dataclass
class PKSConfig(EncoderConfig):
    model: ClassVar[str] = "pks"
    stride2: Optional[bool] = None  # feed the stride-2 map to the mask branch (None: True for efficientnet-lite0)
    dim: int = 128  # width D of the position branch's grid tokens
    depth: int = 3  # locate layers of the position branch
    heads: int = 4  # attention heads (must divide dim)
    mlp_ratio: float = 2.0  # MLP hidden width / D
    text_layers: int = 1  # self-attention layers refining the text tokens
    fpn_width: int = 32  # FPN channels of the language-free mask branch
    fine_width: int = 16  # channels of the mask branch's stride-2 stage
    mask_channels: int = 8  # language-free mask feature channels (CondInst: 8)
    kernel_channels: int = 8  # width of the dynamic mask head's layers (CondInst: 8)
    kernel_layers: int = 3  # 1 x 1 convolutions of the dynamic mask head (CondInst: 3)
    mask_stride: Optional[int] = None  # stride of the mask features: 4, or 2 with a stride-2 map (None: the finest available)
    heatmap_init: float = 0.01  # initial probability of the centre heatmap
    mask_init: float = 0.02  # initial probability of the mask (and of the region map)
    grid_strides: Tuple[int, ...] = (32, 16, 8, 4)  # encoder maps folded into each grid token (LTS's FuseLocate)
    region_head: bool = False  # add the referent-region map, a dense training signal for the located tokens
    peak_source: str = "heatmap"  # what picks the kernel's peak: heatmap, or joint (heatmap x region map; needs region_head)
