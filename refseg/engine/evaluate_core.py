"""Evaluate a model on a refer-format split: the loop behind `refseg eval`
and the periodic validation of `refseg train`.

Per sentence, the decoder outputs go through `refseg.postprocess.postprocess`
(the post-processing `Predictor` serves): the mask and the response-map point
at the image's original (H, W) go into `RISMetrics` with the original-resolution
ground truth. Sentences are visited image by image, so each image is encoded
once per batch.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from refseg.data.transforms import Letterbox
from refseg.engine.distributed import DistInfo, gather_objects
from refseg.metrics import RISMetrics
from refseg.postprocess import postprocess


def image_ordered(samples: Sequence) -> List[int]:
    """Sample indices grouped by image (first appearance), data set order within an image."""
    first: Dict[int, int] = {}
    for i, s in enumerate(samples):
        first.setdefault(s.image_id, i)
    return sorted(range(len(samples)), key=lambda i: (first[samples[i].image_id], i))


def eval_batches(samples: Sequence, batch_size: int, rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """Batches of sample indices in image order; whole batches are dealt out to ranks round-robin."""
    order = image_ordered(samples)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[rank::world_size]


@torch.no_grad()
def predict_masks(out: Dict[str, torch.Tensor], orig_hw: torch.Tensor, letterbox: Letterbox):
    """Model outputs of B sentences -> [(pred (H, W) bool ndarray, point (x, y), logits (H, W) float32 ndarray)].

    orig_hw: (B, 2) original height, width of each sentence's image.
    Runs of sentences with one image size go through `refseg.postprocess.postprocess`
    together, the post-processing `Predictor` serves (threshold 0.5).
    """
    sizes = [(int(h), int(w)) for h, w in orig_hw.tolist()]
    results = []
    start = 0
    while start < len(sizes):
        stop = start + 1
        while stop < len(sizes) and sizes[stop] == sizes[start]:
            stop += 1
        post = postprocess(out["mask_logits"][start:stop], out["no_target_logits"][start:stop], sizes[start], letterbox)
        for mask, (x, y), logits in zip(post.masks, post.points.tolist(), post.logits):
            results.append((mask, (x, y), logits))
        start = stop
    return results


def _resolve_dataset(dataset_or_data, split: str, size: int):
    """(RefSegDataset with eval supervision, its ReferData) from a dataset, a ReferData or a folder."""
    from refseg.data.dataset import RefSegDataset
    from refseg.data.refer import load_refer

    if isinstance(dataset_or_data, RefSegDataset):  # a copy: the caller's data set is left as it is
        ds = RefSegDataset(dataset_or_data.data, dataset_or_data.split, dataset_or_data.letterbox.size, "eval")
        ds.samples = list(dataset_or_data.samples)
        return ds, ds.data
    data = load_refer(dataset_or_data) if isinstance(dataset_or_data, (str, Path)) else dataset_or_data
    return RefSegDataset(data, split, size, "eval"), data


def _count(name: str, value, minimum: int) -> int:
    """`value` as an int >= minimum, else ValueError naming the argument."""
    try:
        n = operator.index(value)
    except TypeError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return n


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset_or_data, split: str = "val", batch_size: int = 32,
                   device: Optional[Union[str, torch.device]] = None, max_samples: Optional[int] = None,
                   progress: bool = True, save_vis: Optional[Union[str, Path]] = None, *, cache=None,
                   per_sample: Optional[List[Dict[str, Any]]] = None,
                   dist: Optional[DistInfo] = None, amp_dtype: Optional[torch.dtype] = None,
                   outputs=None) -> Dict[str, Any]:
    """RIS metrics of `model` on a split.

    dataset_or_data: a RefSegDataset (its split and size are used), a
      ReferData, or a refer folder (then `split` is read, letterboxed to
      `model.image_size`, default 320).
    batch_size: sentences per forward pass, >= 1.
    max_samples: evaluate the first this many sentences (data set order);
      None or 0: all of them.
    save_vis: a folder to write `<sent_id>.png` overlays (prediction in red,
      ground truth in blue, the point as a cross) for every sentence evaluated.
    outputs: a refseg.outputs.OutputSet the overlays are written into (renamed
      into place when the caller commits it); None: each written at once.
    cache: a FeatureCache of exactly these samples (used by training).
    dist: rank / world size; each rank evaluates its share and the metrics
      are merged, so every rank returns the totals.
    per_sample: a list to append one record per sentence evaluated (this
      rank's share): {"sent_id", "ref_id", "image_id", "iou", "pred_pixels",
      "gt_pixels", "point_in_mask"} (point_in_mask: the response-map argmax
      lies in the ground truth; None for no-target sentences).

    Returns RISMetrics.compute() (oIoU, mIoU, P@0.5..0.9, PointM, n, and
    N-acc / T-acc when no-target sentences exist) plus "by_form": {form:
    the same dict} for the sentences that carry a form.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from refseg.data.dataset import collate

    batch_size = _count("batch_size", batch_size, 1)
    max_samples = None if max_samples is None else _count("max_samples", max_samples, 0)
    dist = dist or DistInfo()
    device = torch.device(device) if device is not None else _device_of(model)
    dataset, data = _resolve_dataset(dataset_or_data, split, model.image_size)
    if max_samples:
        dataset.samples = dataset.samples[:max_samples]
    samples = dataset.samples
    letterbox = dataset.letterbox
    if cache is not None and len(cache) != len(samples):
        raise ValueError(f"the feature cache holds {len(cache)} sentences, the split {len(samples)}")
    batches = eval_batches(samples, batch_size, dist.rank, dist.world_size)
    vis_dir = Path(save_vis) if save_vis else None
    if vis_dir is not None and outputs is None:
        vis_dir.mkdir(parents=True, exist_ok=True)

    was_training = model.training
    model.eval()
    overall, by_form = RISMetrics(), {}
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else _null()
    bar = tqdm(total=sum(map(len, batches)), desc=f"eval {dataset.split}", unit="sent",
               disable=not progress or not dist.is_main, leave=False)
    loader = None
    if cache is None:
        # own generator: evaluating leaves the global RNG (and so training's dropout) untouched
        loader = iter(DataLoader(dataset, batch_sampler=batches, collate_fn=collate, generator=torch.Generator()))
    for rows in batches:
        if cache is None:
            batch = next(loader)
            images, image_index = unique_images(batch)
            with autocast:
                vis = model.encode_image(images.to(device))
                txt = model.encode_text(batch["text"])
                out = model.decode(vis, txt, image_index.to(device))
            gts = [m.numpy() for m in batch["orig_mask"]]
            orig_hw = batch["orig_hw"]
        else:
            batch = cache.batch(rows, device)
            with autocast:
                out = model.decode(batch["vis"], batch["txt"], batch["image_index"])
            gts = [data.get_mask(samples[r].ann_id, image_id=samples[r].image_id) for r in rows]
            orig_hw = batch["orig_hw"]
        for r, gt, (pred, point, logits) in zip(rows, gts, predict_masks(out, orig_hw, letterbox)):
            s = samples[r]
            iou = overall.update(pred, gt, point=point, no_target=s.no_target)
            if per_sample is not None:
                per_sample.append(_record(s, iou, pred, gt, point))
            if s.form is not None:
                by_form.setdefault(s.form, RISMetrics()).update(pred, gt, point=point, no_target=s.no_target)
            if vis_dir is not None:
                _save_overlay(vis_dir, data, s, pred, gt, point, outputs)
        bar.update(len(rows))
    bar.close()
    model.train(was_training)

    if dist.enabled:
        parts = gather_objects((overall.state_dict(), {k: m.state_dict() for k, m in by_form.items()}), dist)
        overall, by_form = RISMetrics(), {}
        for o, forms in parts:
            overall.merge(RISMetrics.from_state(o))
            for k, st in forms.items():
                by_form.setdefault(k, RISMetrics()).merge(RISMetrics.from_state(st))
    result = overall.compute()
    result["by_form"] = {k: by_form[k].compute() for k in sorted(by_form)}
    return result


def _record(sample, iou: float, pred: np.ndarray, gt: np.ndarray, point) -> Dict[str, Any]:
    """One sentence's figures for `per_sample`."""
    x, y = point
    hit = None if sample.no_target else bool(gt[y, x])
    return {"sent_id": sample.sent_id, "ref_id": sample.ref_id, "image_id": sample.image_id, "iou": float(iou),
            "pred_pixels": int(np.count_nonzero(pred)), "gt_pixels": int(np.count_nonzero(gt)), "point_in_mask": hit}


def unique_images(batch: Dict[str, Any]):
    """(unique images (M, 3, S, S) uint8, image_index (B,) long) from a collated batch."""
    ids = batch["image_id"]
    uniq, first, index = [], {}, []
    for j, im in enumerate(ids.tolist()):
        if im not in first:
            first[im] = len(uniq)
            uniq.append(j)
        index.append(first[im])
    return batch["image"][uniq], torch.tensor(index, dtype=torch.long)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _save_overlay(folder: Path, data, sample, pred: np.ndarray, gt: np.ndarray, point, outputs=None) -> None:
    from refseg.vis import overlay, save_image_atomic

    inter, union = np.count_nonzero(pred & (gt > 0)), np.count_nonzero(pred | (gt > 0))
    iou = 1.0 if union == 0 else inter / union
    img = overlay(data.load_image(sample.image_id), [pred, gt > 0],
                  captions=[f"{sample.text}  (IoU {iou:.2f})", "ground truth"],
                  colors=[(255, 64, 64), (64, 160, 255)], point=[point])
    path = folder / f"{sample.sent_id}.png"
    save_image_atomic(img, path) if outputs is None else outputs.save_image(path, img)
