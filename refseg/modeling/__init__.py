"""Encoders, heads and the model factories (see docs/DESIGN.md, refseg.modeling)."""

from refseg.modeling.build import MODELS, build_lts, build_model
from refseg.modeling.limits import ModelConfigError
from refseg.modeling.lts import LTS, LTSHead
from refseg.modeling.text import HFTextEncoder, MiniLMEncoder, TextFeatures, build_text
from refseg.modeling.visual import EfficientNetLite0Encoder, HFBackboneEncoder, build_visual

__all__ = [
    "MODELS",
    "build_model",
    "build_lts",
    "ModelConfigError",
    "LTS",
    "LTSHead",
    "TextFeatures",
    "MiniLMEncoder",
    "HFTextEncoder",
    "build_text",
    "EfficientNetLite0Encoder",
    "HFBackboneEncoder",
    "build_visual",
]
