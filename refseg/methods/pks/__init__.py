"""PKS: parallel Position-Kernel-Segmentation, trained on full masks or clicks. Design: docs/methods/pks.md."""

from refseg.methods.pks.config import PKSConfig
from refseg.methods.pks.loss import pks_click_loss, pks_full_loss
from refseg.methods.pks.model import PKS, PKSHead, build_pks
from refseg.methods.pks.train import teacher_forcing

__all__ = ["PKS", "PKSHead", "PKSConfig", "build_pks", "pks_full_loss", "pks_click_loss", "teacher_forcing"]
