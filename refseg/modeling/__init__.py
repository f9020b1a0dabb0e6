"""Shared encoders, blocks and the model interface (see docs/DESIGN.md, refseg.modeling).

The models themselves live with their methods: refseg.methods.
"""

from refseg.modeling.base import EncoderHeadModel, RISModel
from refseg.modeling.limits import ModelConfigError
from refseg.modeling.text import HFTextEncoder, MiniLMEncoder, TextFeatures, build_text
from refseg.modeling.visual import EfficientNetLite0Encoder, HFBackboneEncoder, build_visual

__all__ = [
    "RISModel",
    "EncoderHeadModel",
    "ModelConfigError",
    "TextFeatures",
    "MiniLMEncoder",
    "HFTextEncoder",
    "build_text",
    "EfficientNetLite0Encoder",
    "HFBackboneEncoder",
    "build_visual",
]
