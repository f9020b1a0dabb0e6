"""LRB-WREL: LTS trained with scarce referring expressions (teacher, reference bank, EMA student).
Design: docs/methods/wrel.md. The stages (train.py) are imported on use: they run the generic trainer."""

from refseg.methods.wrel.config import WRELConfig


def train_wrel(cfg, model=None, data=None):
    """Run (or resume) LRB-WREL's three stages (refseg.methods.wrel.train.train_wrel)."""
    from refseg.methods.wrel.train import train_wrel as run

    return run(cfg, model, data)


__all__ = ["WRELConfig", "train_wrel"]
