"""LRB-WREL: LTS trained with scarce referring expressions (teacher, reference bank, EMA student).
Design: docs/methods/wrel.md. Its stages (refseg.methods.wrel.train.train_wrel) run the generic trainer;
the registry names them (METHODS["wrel"].train) and imports them on use."""

from refseg.methods.wrel.config import WRELConfig

__all__ = ["WRELConfig"]
