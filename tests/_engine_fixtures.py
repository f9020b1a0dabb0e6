"""Tiny data and models for the engine tests (tests/test_engine.py, test_checkpoint.py, test_ddp.py).

`make_shapes_refer(root)` writes a small refer-format folder: 64 x 64 images,
each with a red and a blue square on a noisy background, one ref per square
("the red square" / "the blue square", plus a location sentence); masks as
COCO RLE. A head overfits it within a few dozen steps.

`TINY_LTS` are model kwargs for `refseg.methods.MODELS["lts"]` that build a
small LTS on randomly initialised encoders (no pretrained weights read).
"""

from __future__ import annotations

import copy
import functools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

SIZE = 64

# the tiny LTS of tests/test_modeling.py (random ConvNeXt + BERT encoders, small head)
TINY_VISUAL = {"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}
TINY_TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64}
TINY_HEAD = {"dim": 32, "depth": 1, "heads": 2, "decoder_widths": [16, 8, 8]}
TINY_LTS = {"visual": TINY_VISUAL, "text": TINY_TEXT, "max_length": 12, **TINY_HEAD}


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def make_shapes_refer(root, n_train: int = 6, n_val: int = 3, seed: int = 0, size: int = SIZE) -> Path:
    """Write the folder; returns it. Images are `size` x `size`."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations, refs = [], [], []
    colours = {"red": (220, 40, 40), "blue": (40, 80, 220)}
    sent_id = 0
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        image_id = i + 1
        img = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
        side = size // 4
        # two non-overlapping squares: one in the left half, one in the right half (order random)
        left_x = int(rng.integers(2, size // 2 - side - 1))
        right_x = int(rng.integers(size // 2 + 1, size - side - 2))
        names = ["red", "blue"] if rng.random() < 0.5 else ["blue", "red"]
        for k, (name, x0) in enumerate(zip(names, (left_x, right_x))):
            y0 = int(rng.integers(2, size - side - 2))
            mask = np.zeros((size, size), np.uint8)
            mask[y0:y0 + side, x0:x0 + side] = 1
            img[mask.astype(bool)] = colours[name]
            ann_id = image_id * 10 + k
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "area": float(mask.sum()), "bbox": [x0, y0, side, side], "segmentation": [_rle(mask)]})
            where = "on the left" if k == 0 else "on the right"
            sentences = []
            for form, raw in (("attribute", f"the {name} square"), ("location", f"the square {where}")):
                sentences.append({"sent_id": sent_id, "raw": raw, "sent": raw, "tokens": raw.split(), "form": form})
                sent_id += 1
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                         "class_name": "square"})
        name = f"{image_id:04d}.png"
        Image.fromarray(img).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (root / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 1, "name": "square", "supercategory": "shape"}]}))
    return root


def tiny_config(data, out, **overrides):
    """A TrainConfig for a few fast CPU steps of the tiny LTS on `data`."""
    from refseg.engine.config import TrainConfig

    base = dict(model="lts", model_kwargs=dict(TINY_LTS), data=str(data), size=SIZE, batch_size=4,
                images_per_batch=2, max_steps=6, lr=3e-3, warmup_steps=2, val_every=0, val_max_samples=0,
                log_every=1, progress=False, threads=1, out=str(out), save_frozen=True, seed=0)
    base.update(overrides)
    return TrainConfig.from_dict(base)


def tiny_model(seed: int = 0):
    """A fresh copy of the tiny LTS built with `seed` set (its random encoders are reproducible).

    Building one costs seconds (transformers), so each seed is built once per session and copied.
    """
    return copy.deepcopy(_tiny_model(seed))


@functools.lru_cache(maxsize=None)
def _tiny_model(seed: int):
    import torch

    from refseg.methods import MODELS

    torch.manual_seed(seed)
    return MODELS["lts"](image_size=SIZE, **TINY_LTS)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones; restore afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
