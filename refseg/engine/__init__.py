"""Training and evaluation engine behind `refseg train` and `refseg eval` (docs/DESIGN.md, refseg.engine).

Training itself is `refseg.engine.train.train(cfg)` (not re-exported here:
the name is also the submodule's).
"""

from refseg.engine.checkpoint import export_heads, load_model
from refseg.engine.config import TrainConfig
from refseg.engine.evaluate_core import evaluate_model

__all__ = ["TrainConfig", "evaluate_model", "export_heads", "load_model"]
