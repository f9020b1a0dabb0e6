"""Every ``transformers`` model, config and tokenizer refseg loads, loaded through one door: local folders
only, weights only from safetensors, no remote code.

    folder = local_folder("/models/swin", "visual", weights=True)   # the folder, checked
    config = load_config(folder, "visual")                           # its config.json, bounded
    model = load_pretrained(AutoModel, folder, "text", config)

An "hf:" encoder name must be an existing local folder holding config.json
and ``*.safetensors`` weights. A hub name ("hf:bert-base-uncased") is
refused before any library code runs, so nothing is downloaded or even
looked up; a folder holding only ``pytorch_model.bin`` / ``*.pt`` /
``*.ckpt`` / ``*.pkl`` (pickles, which can run code when loaded) is refused
without reading them. ``from_pretrained`` is called with
``local_files_only=True``, ``use_safetensors=True`` and
``trust_remote_code=False``. Failures raise ModelConfigError naming the
config field and the folder.
"""

from pathlib import Path
from typing import Any

import torch

from refseg.modeling.limits import ModelConfigError, check_encoder_config, one_line

OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")  # pickles, TF, Flax
LOCAL = {"local_files_only": True, "trust_remote_code": False}


def local_folder(name: str, field: str, weights: bool = False) -> Path:
    """The local folder ``name`` names, checked; ModelConfigError otherwise (nothing is looked up remotely).

    name: a folder path (an "hf:" encoder name without its prefix, or a tokenizer folder).
    field: the config field it came from ("visual", "text", "text_tokenizer"), for the message.
    weights: also require config.json and at least one ``*.safetensors`` file.
    """
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelConfigError(
            f"config field {field!r}: {name!r} is not a local folder; refseg loads models only from local folders "
            "(config.json + *.safetensors weights) and never downloads (save one with "
            "save_pretrained(folder, safe_serialization=True) and name that folder)")
    if weights:
        if not (path / "config.json").is_file():
            raise ModelConfigError(f"config field {field!r}: {path} holds no config.json")
        if not any(p.is_file() for p in path.glob("*.safetensors")):
            other = sorted(p.name for p in path.iterdir() if p.suffix in OTHER_WEIGHTS)
            found = f" (only {', '.join(other[:5])}, which refseg never reads: pickles can run code)" if other else ""
            raise ModelConfigError(f"config field {field!r}: {path} holds no *.safetensors weights{found}; "
                                   "convert them with save_pretrained(folder, safe_serialization=True)")
    return path


def load_config(folder: Path, field: str) -> Any:
    """The ``PretrainedConfig`` of a checked local folder, its numbers bounded (check_encoder_config)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), **LOCAL)
    except Exception as e:  # noqa: BLE001  (OSError, ValueError, JSON errors: the folder is not a model)
        raise ModelConfigError(f"config field {field!r}: cannot read {folder / 'config.json'}: {one_line(e)}") from None
    check_encoder_config(config.to_dict(), field)
    return config


def load_pretrained(cls: Any, folder: Path, field: str, config: Any, **kwargs) -> Any:
    """The model class ``cls`` maps ``config`` to, ``from_pretrained(folder, ...)`` offline, from safetensors
    only, without remote code.

    cls: a transformers Auto class (AutoModel, AutoBackbone); its concrete class is looked up here, as
      ``AutoBackbone.from_pretrained`` asks the hub whether the name is a repository even for a folder.
    folder: from ``local_folder(..., weights=True)``. config: from ``load_config`` (possibly changed).
    kwargs: passed on. ModelConfigError names the field and folder on failure.
    """
    try:
        model_class = cls._model_mapping[type(config)]
    except KeyError:
        raise ModelConfigError(f"config field {field!r}: {folder} holds a {config.model_type!r} model, which has no "
                               f"{cls.__name__} class") from None
    if isinstance(model_class, (list, tuple)):
        model_class = model_class[0]
    try:
        model = model_class.from_pretrained(str(folder), config=config, use_safetensors=True, **LOCAL, **kwargs)
    except Exception as e:  # noqa: BLE001  (missing or malformed weights, a config the class cannot use)
        raise ModelConfigError(f"config field {field!r}: cannot load the weights in {folder}: {one_line(e)}") from None
    for name, p in model.named_parameters():  # NaN or inf weights would make every output NaN
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ModelConfigError(f"config field {field!r}: the weights in {folder} hold NaN or infinite values "
                                   f"(tensor {name!r})")
    return model


def load_tokenizer(name: str, field: str) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local folder (its vocabulary files), offline, no remote code."""
    from transformers import AutoTokenizer

    folder = local_folder(name, field)
    try:
        return AutoTokenizer.from_pretrained(str(folder), **LOCAL)
    except Exception as e:  # noqa: BLE001  (no tokenizer files, malformed ones)
        raise ModelConfigError(f"config field {field!r}: cannot load a tokenizer from {folder}: {one_line(e)}") from None


def config_from_dict(mapping: dict, field: str) -> Any:
    """``AutoConfig.for_model(**mapping)`` for an encoder given as ``{"model_type": ..., **fields}`` (random
    weights), its numbers bounded first (check_encoder_config); ModelConfigError names the field."""
    from transformers import AutoConfig

    check_encoder_config(mapping, field)
    fields = dict(mapping)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ModelConfigError(f"config field {field!r} needs a 'model_type' string, got {model_type!r}")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # noqa: BLE001  (an unknown model_type, a value the config class refuses)
        raise ModelConfigError(f"config field {field!r}: not a valid {model_type!r} config: {one_line(e)}") from None
