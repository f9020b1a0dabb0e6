"""The method registry: one ``Method`` per trainable method, each in its own folder.

    method = METHODS["pks"]
    model = method.build(image_size=320)                  # the model factory
    loss = method.losses["click"]                          # loss(out, batch) -> {"loss", parts...}
    extra = method.teacher_forcing(model, batch)           # training-only decode arguments (or None)
    model = build_model(model.config)                      # rebuild any saved model

Adding a method: a folder refseg/methods/<name>/ (model.py with the model and
its factory, loss.py, config.py, train.py for training-time extras or
stages) and one line in METHODS (docs/DESIGN.md has the checklist).
"""

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from torch import nn

from refseg.methods import lts, pks, sag, wrel
from refseg.modeling.limits import ModelConfigError


@dataclass(frozen=True)
class Method:
    """What the trainer (refseg.engine.train) knows of a method; it imports no method itself.

    name: the registry key; build: the model factory (its ``model.config["model"]`` is ``model``);
    config: the factory's config class (checks ``model.kwargs`` of a training config);
    losses: supervision -> loss(out, batch); teacher_forcing: (model, batch) -> the extra
    ``decode`` keyword arguments of a training step, or None;
    train: "module:function" naming the stages of a multi-stage method (``model.method``), a function
    (cfg, model, data) -> summary, or None; named, not imported, because the stages run the generic
    trainer, which reads this registry: ``run_stages`` imports them on use. A stage runs the generic
    loop with ``engine.train.train(cfg, model, data, extras=LoopExtras(...))``;
    options: the dataclass of the method's own config section (``cfg.methods[name]``), or None."""

    name: str
    build: Callable[..., nn.Module]
    config: type
    losses: Dict[str, Callable[..., Dict[str, Any]]] = field(default_factory=dict)
    teacher_forcing: Optional[Callable[[nn.Module, Dict[str, Any]], Dict[str, Any]]] = None
    train: Optional[str] = None
    options: Optional[type] = None

    def run_stages(self, cfg, model: Optional[nn.Module] = None, data=None) -> Dict[str, Any]:
        """Run (or resume) the stages of a multi-stage method; their summary."""
        if self.train is None:
            raise ValueError(f"method {self.name!r} has no stages of its own")
        module, function = self.train.split(":")
        return getattr(importlib.import_module(module), function)(cfg, model, data)

    @property
    def model(self) -> str:
        """The name of the model the factory builds (a multi-stage method may train another's)."""
        return self.config.model


METHODS: Dict[str, Method] = {
    "lts": Method("lts", lts.build_lts, lts.LTSConfig, {"full": lts.lts_loss}),
    "pks": Method("pks", pks.build_pks, pks.PKSConfig, {"full": pks.pks_full_loss, "click": pks.pks_click_loss},
                  pks.teacher_forcing),
    "sag": Method("sag", sag.build_sag, sag.SaGConfig, {"text": sag.sag_text_loss}, sag.teacher_forcing),
    "wrel": Method("wrel", lts.build_lts, lts.LTSConfig, {"full": lts.lts_loss}, train="refseg.methods.wrel.train:train_wrel",
                   options=wrel.WRELConfig),
}

# model name -> factory: the models a saved config may name
MODELS: Dict[str, Callable[..., nn.Module]] = {m.name: m.build for m in METHODS.values() if m.name == m.model}


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from its ``model.config`` (weights are not loaded); ModelConfigError names a bad field."""
    if not isinstance(config, dict):
        raise ModelConfigError(f"a model config must be a mapping of fields, got {type(config).__name__}")
    kwargs = dict(config)
    name = kwargs.pop("model", None)
    if not isinstance(name, str) or name not in MODELS:
        raise ModelConfigError(f"config field 'model' must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)


def teacher_forcing(model: nn.Module) -> Optional[Callable]:
    """The training-time decode arguments of a model's method (None: none)."""
    method = METHODS.get(model.config.get("model"))
    return method.teacher_forcing if method is not None else None


__all__ = ["Method", "METHODS", "MODELS", "build_model", "teacher_forcing"]
