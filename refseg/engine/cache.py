"""Feature cache for frozen encoders: encode every image and sentence once.

When both encoders are frozen, a training step only needs
`model.decode(vis, txt, image_index)`; the encoders' outputs are computed
once per unique image and once per sentence of the split, before training,
and kept in fp16:

    vis[k]       (M, C_k, h_k, w_k) fp16    one row per unique image, each scale k
    txt[field]   (N, ...)                   TextFeatures fields, one row per sentence
                                            (float fields fp16, the rest as encoded)
    sup[key]     (N, ...)                   the data set item's tensors (no_target,
                                            orig_hw, letterbox, clicks ...), per sentence
    masks        (U, ceil(S*S/8)) uint8     distinct letterboxed masks, bit-packed;
    mask_row     (N,) int64                 sentence -> row of `masks`
    image_row    (N,) int64                 sentence -> row of vis
    ids[key]     (N,) int64                 image_id, ref_id, sent_id, ann_id

Sentence rows follow the data set's order (RefSegDataset index i = row i).
The arrays live in memory, or memory-mapped under `cache_dir/<key>/`, where
`key` hashes the data files, split, letterbox size, supervision and the
frozen encoder weights themselves, so a second run with the same encoders
reuses the folder (and a changed encoder or data set never does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1
ID_KEYS = ("image_id", "ref_id", "sent_id", "ann_id")
SKIP_KEYS = ("image", "text", "orig_mask", "mask")


# ---- when to cache, and under which key ----------------------------------------


def encoders_frozen(model: nn.Module) -> bool:
    """True when neither encode_image nor encode_text produce outputs that
    need gradients, checked by running both on a dummy input."""
    device = next(model.parameters()).device
    size = model.image_size
    with torch.enable_grad():
        vis = model.encode_image(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
        txt = model.encode_text(["a"])
    tensors = list(vis) + [t for t in txt if torch.is_tensor(t)]
    return not any(t.requires_grad for t in tensors)


def data_fingerprint(data) -> Dict[str, Any]:
    """Identity of a refer data set: the SHA-256 of its annotation files and where its images are.

    By content, not by folder: two copies of the same annotations (e.g. the
    weak split that every `refseg train --accurate-fraction p --weak-seed s`
    run writes into its own RUN/data, images linked to one folder) share one
    cache, and an annotation file edited in place is noticed even when its
    size and mtime are unchanged. Images are identified by their resolved
    folder (hashing thousands of images would cost more than caching them).
    """
    from refseg.engine.checkpoint import sha256_of

    files = {}
    for path in (Path(data.refs_file), Path(data.ann_dir) / "instances.json", Path(data.ann_dir) / "synthref.json"):
        if path.exists():
            files[path.name] = sha256_of(path)
    return {"images_dir": str(Path(data.images_dir).resolve()), "split_by": data.split_by, "files": files}


def encoder_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every frozen parameter and buffer (the encoders' weights), plus the model class."""
    from refseg.engine.checkpoint import frozen_prefixes

    prefixes = frozen_prefixes(model)
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        if any(name.startswith(p + ".") for p in prefixes):
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    config = model.config
    encoder_keys = ("visual", "text", "pretrained", "stride2", "levels", "max_length", "text_tokenizer", "image_size")
    h.update(json.dumps({k: config.get(k) for k in encoder_keys}, sort_keys=True, default=str).encode())
    if config.get("rgb"):  # SaG's colour map is part of what encode_image returns (hashed only when on: old keys hold)
        h.update(b"rgb=1")
        if config.get("grid_stride", 16) != 16:  # ... at the grid's resolution
            h.update(f"grid_stride={config['grid_stride']}".encode())
    if config.get("mask_refine"):  # SaG's fine colour map for the mask refinement
        h.update(f"mask_refine={config['mask_refine']}".encode())
    h.update(f"max_length={model.text.max_length}".encode())  # tokenisation length: the text features' shape
    return h.hexdigest()


def cache_key(dataset, model: nn.Module, dtype: torch.dtype) -> str:
    """Hash of the data files, the split's sentences, letterbox size, supervision, encoder weights, dtype
    and flip view."""
    sentences = hashlib.sha256(np.asarray([s.sent_id for s in dataset.samples], dtype=np.int64).tobytes())
    fields = {"version": FORMAT_VERSION, "data": data_fingerprint(dataset.data), "split": dataset.split,
              "sentences": sentences.hexdigest(), "size": dataset.letterbox.size,
              "supervision": dataset.supervision, "encoders": encoder_fingerprint(model), "dtype": str(dtype)}
    view = getattr(dataset, "view", "none")
    if view != "none":  # a flipped view of the split (data/augment.py); unflipped keys stay as they were
        fields["view"] = view
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ---- the cache ------------------------------------------------------------------------


class FeatureCache:
    """Cached encoder outputs and supervision of one split (see the module docstring)."""

    def __init__(self, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]):
        self.arrays = arrays
        self.meta = meta
        self.n_vis = meta["n_vis"]
        self.txt_fields: List[str] = meta["txt_fields"]
        self.sup_keys: List[str] = meta["sup_keys"]
        self.size: int = meta["size"]
        self.image_row = arrays["image_row"]

    def __len__(self) -> int:
        return len(self.image_row)

    def ids(self, key: str) -> np.ndarray:
        return self.arrays[f"id.{key}"]

    def batch(self, rows: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
        """Everything a training step needs for these sentence rows.

        Returns {"vis": list of (M, C, h, w), "txt": TextFeatures (B rows),
        "image_index": (B,) long into vis, "mask": (B, 1, S, S) float (when cached),
        the other supervision tensors (B, ...), and the ids (B,) long}.
        Floats are cast to `dtype` on `device`.
        """
        rows = np.asarray(rows, dtype=np.int64)
        images, image_index = np.unique(self.image_row[rows], return_inverse=True)
        out: Dict[str, Any] = {
            "vis": [_tensor(self.arrays[f"vis.{k}"][images], device, dtype) for k in range(self.n_vis)],
            "txt": self.text(rows, device, dtype),
            "image_index": torch.from_numpy(image_index.reshape(-1)).to(device),
        }
        if "masks" in self.arrays:
            packed = self.arrays["masks"][self.arrays["mask_row"][rows]]  # (B, ceil(S*S/8))
            bits = np.unpackbits(packed, axis=1, count=self.size * self.size)
            out["mask"] = torch.from_numpy(bits.reshape(-1, 1, self.size, self.size)).to(device, dtype)
        for key in self.sup_keys:
            out[key] = _tensor(self.arrays[f"sup.{key}"][rows], device, dtype)
        for key in ID_KEYS:
            out[key] = torch.from_numpy(np.asarray(self.arrays[f"id.{key}"][rows]))
        return out

    def text(self, rows: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32):
        """TextFeatures of these sentence rows (float fields cast to `dtype`), without the visual maps."""
        from refseg.modeling.text import TextFeatures

        rows = np.asarray(rows, dtype=np.int64)
        return TextFeatures(**{f: _tensor(self.arrays[f"txt.{f}"][rows], device, dtype) for f in self.txt_fields})

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


def merge_batches(parts: Sequence[Dict[str, Any]], order: np.ndarray) -> Dict[str, Any]:
    """One batch from FeatureCache.batch parts (e.g. of different flip views of a split), its rows put
    in `order`: row i of the result is row order[i] of the parts' rows concatenated. Each part's
    images stay separate rows of vis (a view's maps differ from another's)."""
    from refseg.modeling.text import TextFeatures

    if len(parts) == 1 and np.array_equal(order, np.arange(len(order))):
        return parts[0]
    idx = torch.from_numpy(np.asarray(order, dtype=np.int64))
    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += p["vis"][0].shape[0]
    out: Dict[str, Any] = {
        "vis": [torch.cat([p["vis"][k] for p in parts]) for k in range(len(parts[0]["vis"]))],
        "image_index": torch.cat([p["image_index"] + o for p, o in zip(parts, offsets)])[idx.to(parts[0]["image_index"].device)],
    }
    txt = [p["txt"] for p in parts]
    out["txt"] = TextFeatures(*[torch.cat([t[f] for t in txt])[idx.to(txt[0][f].device)] for f in range(len(txt[0]))])
    for key, value in parts[0].items():
        if key in out:
            continue
        if torch.is_tensor(value):
            cat = torch.cat([p[key] for p in parts])
            out[key] = cat[idx.to(cat.device)]
        elif isinstance(value, list):
            cat = [x for p in parts for x in p[key]]
            out[key] = [cat[i] for i in order]
    return out


def _tensor(a: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def _store_dtype(t: torch.Tensor, dtype: torch.dtype) -> np.dtype:
    if t.is_floating_point():
        return torch.empty((), dtype=dtype).numpy().dtype
    return t.detach().cpu().numpy().dtype


class _Storage:
    """Arrays allocated on first sight of their shape, in memory or as .npy memmaps."""

    def __init__(self, folder: Optional[Path]):
        self.folder = folder
        self.arrays: Dict[str, np.ndarray] = {}

    def alloc(self, name: str, shape, dtype) -> np.ndarray:
        if self.folder is None:
            a = np.zeros(shape, dtype=dtype)
        else:
            a = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape))
        self.arrays[name] = a
        return a

    def put(self, name: str, start: int, values: np.ndarray, total: int) -> None:
        if name not in self.arrays:
            self.alloc(name, (total,) + values.shape[1:], values.dtype)
        self.arrays[name][start:start + len(values)] = values


def _samples_in_image_order(dataset) -> np.ndarray:
    """Dataset indices ordered by image (first appearance), sentences in data set order within each image."""
    image_ids = np.array([s.image_id for s in dataset.samples], dtype=np.int64)
    _, first = np.unique(image_ids, return_index=True)
    rank = {image_ids[i]: r for r, i in enumerate(sorted(first))}
    return np.array(sorted(range(len(image_ids)), key=lambda i: (rank[image_ids[i]], i)), dtype=np.int64)


@torch.no_grad()
def build_cache(model: nn.Module, dataset, device: torch.device, dtype: torch.dtype = torch.float16,
                image_batch: Optional[int] = None, text_batch: int = 64, workers: int = 0,
                folder: Optional[Path] = None, progress: bool = True, desc: str = "cache") -> FeatureCache:
    """Encode every unique image and every distinct expression text of `dataset` (a RefSegDataset) once.

    Sentences repeating an earlier text get a copy of its features.

    folder: write memory-mapped arrays there (it must not exist yet); None keeps them in memory.
    image_batch: images per encode_image call (default 1 on CPU, 32 on cuda).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from refseg.data.dataset import collate

    n = len(dataset)
    if n == 0:
        raise ValueError(f"split {dataset.split!r} has no sentences to cache")
    image_batch = image_batch or (32 if device.type == "cuda" else 1)
    order = _samples_in_image_order(dataset)
    image_ids = np.array([s.image_id for s in dataset.samples], dtype=np.int64)
    unique_images = list(dict.fromkeys(image_ids[order].tolist()))
    image_row_of = {im: r for r, im in enumerate(unique_images)}
    if folder is not None:
        folder.mkdir(parents=True)
    store = _Storage(folder)
    image_row = store.alloc("image_row", (n,), np.int64)
    image_row[:] = [image_row_of[i] for i in image_ids]

    was_training = model.training
    model.eval()
    masks: List[np.ndarray] = []
    mask_row_of: Dict[bytes, int] = {}
    mask_row = np.full(n, -1, dtype=np.int64)
    pending_images: List[torch.Tensor] = []
    next_image = 0
    pending_text: List[tuple] = []  # (row, text) of texts not encoded yet
    first_row_of_text: Dict[str, int] = {}  # text -> the row that encodes it
    repeats: List[tuple] = []  # (row, first row of the same text): copied, not encoded again
    sup_keys: List[str] = []
    txt_fields: List[str] = []
    n_vis = 0
    # sentences in image order, a batch = all sentences of a few images
    loader = DataLoader(dataset, batch_size=max(8, image_batch * 8), sampler=order.tolist(), num_workers=workers,
                        collate_fn=collate, generator=torch.Generator())
    seen_images = set()

    def flush_images(final: bool = False) -> None:
        nonlocal next_image, n_vis
        while pending_images and (final or len(pending_images) >= image_batch):
            chunk, pending_images[:] = pending_images[:image_batch], pending_images[image_batch:]
            images = torch.stack(chunk).to(device)  # (b, 3, S, S) uint8
            vis = model.encode_image(images)
            n_vis = len(vis)
            for k, v in enumerate(vis):
                store.put(f"vis.{k}", next_image, v.float().cpu().numpy().astype(_store_dtype(v, dtype)),
                          len(unique_images))
            next_image += len(chunk)

    def flush_text(final: bool = False) -> None:
        nonlocal txt_fields
        while pending_text and (final or len(pending_text) >= text_batch):
            chunk, pending_text[:] = pending_text[:text_batch], pending_text[text_batch:]
            rows = np.array([r for r, _ in chunk])
            txt = model.encode_text([t for _, t in chunk])
            txt_fields = list(txt._fields)
            for f, t in zip(txt._fields, txt):
                a = t.float().cpu().numpy().astype(_store_dtype(t, dtype)) if t.is_floating_point() else t.cpu().numpy()
                if f"txt.{f}" not in store.arrays:
                    store.alloc(f"txt.{f}", (n,) + a.shape[1:], a.dtype)
                store.arrays[f"txt.{f}"][rows] = a

    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="sent", disable=not progress, leave=False)
    for batch in loader:
        b = len(batch["text"])
        rows = np.array([index_of for index_of in _rows_of(batch, dataset)], dtype=np.int64)
        for j in range(b):
            im = int(batch["image_id"][j])
            if im not in seen_images:
                seen_images.add(im)
                pending_images.append(batch["image"][j])
        flush_images()
        for r, text in zip(rows.tolist(), batch["text"]):
            if text in first_row_of_text:  # data sets repeat expressions ("the red star"): encode each once
                repeats.append((r, first_row_of_text[text]))
            else:
                first_row_of_text[text] = r
                pending_text.append((r, text))
        flush_text()
        if "mask" in batch:
            packed = np.packbits(batch["mask"].numpy().reshape(b, -1).astype(np.uint8), axis=1)
            for j in range(b):
                key = packed[j].tobytes()
                if key not in mask_row_of:
                    mask_row_of[key] = len(masks)
                    masks.append(packed[j])
                mask_row[rows[j]] = mask_row_of[key]
        for key, value in batch.items():
            if key in SKIP_KEYS or not torch.is_tensor(value):
                continue
            if key in ID_KEYS:
                name = f"id.{key}"
                if name not in store.arrays:
                    store.alloc(name, (n,), np.int64)
                store.arrays[name][rows] = value.numpy()
                continue
            name = f"sup.{key}"
            if name not in store.arrays:
                store.alloc(name, (n,) + tuple(value.shape[1:]), value.numpy().dtype)
                sup_keys.append(key)
            store.arrays[name][rows] = value.numpy()
        bar.update(b)
    flush_images(final=True)
    flush_text(final=True)
    if repeats:
        dst, src = (np.array(c, dtype=np.int64) for c in zip(*repeats))
        for f in txt_fields:
            store.arrays[f"txt.{f}"][dst] = store.arrays[f"txt.{f}"][src]
    bar.close()
    if masks:
        store.put("masks", 0, np.stack(masks), len(masks))
        store.put("mask_row", 0, mask_row, n)
    model.train(was_training)
    meta = {"version": FORMAT_VERSION, "n": n, "n_images": len(unique_images), "n_vis": n_vis,
            "txt_fields": txt_fields, "sup_keys": sup_keys, "size": int(dataset.letterbox.size),
            "split": dataset.split, "supervision": dataset.supervision, "dtype": str(dtype),
            "distinct_texts": len(first_row_of_text),
            "seconds": round(time.perf_counter() - t0, 2)}
    if folder is not None:
        for a in store.arrays.values():
            if isinstance(a, np.memmap):
                a.flush()
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return FeatureCache(store.arrays, meta)


def _rows_of(batch, dataset) -> List[int]:
    """Dataset indices of a collated batch, found by sentence id."""
    index = getattr(dataset, "_engine_row_of_sent", None)
    if index is None:
        index = {s.sent_id: i for i, s in enumerate(dataset.samples)}
        dataset._engine_row_of_sent = index
    return [index[int(s)] for s in batch["sent_id"]]


def open_cache(folder: Path) -> FeatureCache:
    """A cache folder written by build_cache, memory-mapped read-only."""
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}
    return FeatureCache(arrays, meta)


def get_cache(model: nn.Module, dataset, device: torch.device, cache_dir: Optional[str] = None,
              dtype: torch.dtype = torch.float16, workers: int = 0, progress: bool = True,
              build: bool = True) -> FeatureCache:
    """The cache of `dataset`'s split: in memory (cache_dir None), or opened
    from / built into `cache_dir/<key>/` (built into a temporary folder and
    renamed, so a concurrent or interrupted build never leaves a partial one).
    With build=False, waits for nothing and raises if it does not exist."""
    desc = f"caching {dataset.split} features"
    if cache_dir is None:
        return build_cache(model, dataset, device, dtype=dtype, workers=workers, progress=progress, desc=desc)
    key = cache_key(dataset, model, dtype)
    final = Path(cache_dir) / key
    if (final / "meta.json").exists():
        return open_cache(final)
    if not build:
        raise FileNotFoundError(f"no feature cache at {final}")
    tmp = Path(cache_dir) / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        build_cache(model, dataset, device, dtype=dtype, workers=workers, folder=tmp, progress=progress, desc=desc)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first
            if not (final / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(final)
