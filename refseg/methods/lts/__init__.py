"""LTS: Locate then Segment (Jing et al., CVPR 2021), trained on full masks. Design: docs/methods/lts.md."""

from refseg.methods.lts.config import LTSConfig
from refseg.methods.lts.loss import lts_loss
from refseg.methods.lts.model import LTS, LTSHead, build_lts

__all__ = ["LTS", "LTSHead", "LTSConfig", "build_lts", "lts_loss"]
