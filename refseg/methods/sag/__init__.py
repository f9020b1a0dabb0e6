"""SaG: Shatter and Gather (Kim et al., ICCV 2023), trained on (image, expression) pairs alone.
Design: docs/methods/sag.md."""

from refseg.methods.sag.config import SaGConfig
from refseg.methods.sag.loss import sag_text_loss
from refseg.methods.sag.model import SaG, SaGHead, build_sag
from refseg.methods.sag.train import teacher_forcing

__all__ = ["SaG", "SaGHead", "SaGConfig", "build_sag", "sag_text_loss", "teacher_forcing"]
