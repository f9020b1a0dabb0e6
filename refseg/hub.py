"""Named models shipped inside the package (``refseg/weights/``).

Each shipped model is a pair ``<name>.safetensors`` (head weights only; the
frozen encoders come from their own pip packages) and ``<name>.json`` (the
model config, the SHA-256 of the weights file, the command that trained it
and its measured scores). Nothing is ever downloaded. This module reads
checkpoints through refseg.engine.checkpoint, which never imports it.
"""

import json
from pathlib import Path
from typing import List, Optional, Union

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def available_models() -> List[str]:
    """Names accepted by ``load``, e.g. ``["lts-synthref"]``."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json") if p.with_suffix(".safetensors").exists())


def model_card(name: str) -> dict:
    """The JSON metadata of a shipped model."""
    if name not in available_models():  # never a path: "../x" cannot reach outside WEIGHTS_DIR
        raise KeyError(f"unknown model {name!r}; available: {available_models()}")
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def weights_path(name_or_path: Union[str, Path]) -> Path:
    """The weights file of a shipped model name; any other string as a path (checkpoint, run folder, file)."""
    name = str(name_or_path)
    return WEIGHTS_DIR / f"{name}.safetensors" if name in available_models() else Path(name)


def load(name_or_path: Union[str, Path], device: str = "cpu", options: Optional[dict] = None
         ) -> "torch.nn.Module":  # noqa: F821
    """Load a shipped model by name, or a checkpoint / run folder by path.

    options: inference options merged into the model's config before its
    weights are loaded, e.g. ``{"mask_refine": 2}`` for SaG (finer masks,
    see SaGHead). Only options that leave the weights as they are: one
    that adds, drops or reshapes a tensor is refused (CheckpointError).

    A name is looked up only among ``available_models()`` (files directly in
    ``WEIGHTS_DIR``), so no name reaches a file elsewhere; anything else is
    taken as a path the caller chose (the server never passes one from a
    request: it serves only the models it was started with). The shipped weights are checked against the SHA-256 in their JSON card
    before use. Returns the model in eval mode on ``device``.
    """
    from refseg.engine.checkpoint import CheckpointError, load_model, sha256_of

    name = str(name_or_path)
    if name in available_models():
        card = model_card(name)
        weights = WEIGHTS_DIR / f"{name}.safetensors"
        digest = sha256_of(weights)
        if card.get("sha256") and digest != card["sha256"]:
            raise CheckpointError(
                f"{weights}: SHA-256 {digest} does not match {card['sha256']} in {weights.with_suffix('.json')}; "
                "the file is corrupt or was changed."
            )
        model = load_model(weights)
    elif Path(name).exists():
        model = load_model(Path(name))
    else:
        raise FileNotFoundError(
            f"{name!r} is neither a shipped model ({', '.join(available_models()) or 'none'}) nor an existing path"
        )
    if options:
        from refseg.engine.checkpoint import with_options

        if not isinstance(options, dict):
            raise ValueError(f"options must be a dict of config fields, got {options!r}")
        model = with_options(model, options)
    return model.to(device).eval()
