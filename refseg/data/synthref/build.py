"""From scenes to the refer format: one image's record, then the whole data set's files.

`build_image` runs in a worker: `draw_image` draws one image from its own
seeded generator (SeedSequence([seed, domain, split, index])), so any
image can be redrawn alone; `build_image` writes its PNG and returns
everything else as plain data. `assemble` runs once, in order,
and gives ids, adds the no-target refs and builds `refs(unc).p`'s list
and `instances.json`'s dict. So the output does not depend on how many
workers drew the images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.data.refer import clicks_from_mask
from refseg.data.synthref.describe import absent_sentence, describe_scene
from refseg.data.synthref.scene import make_scene
from refseg.data.synthref.vocab import IMAGE_SIZE, SPLITS, VOCABS

DOMAIN_CODES = {"natural": 0, "aerial": 1}  # enters every image's seed
NO_TARGET_STREAM = 1_000_003  # seed word of a split's no-target generator, beyond any image index
SCENE_ATTEMPTS = 20  # scenes tried per image until one has referents (and, on focus images, a repeated shape)
PNG_COMPRESS_LEVEL = 1  # zlib level of the PNG files: 3-6x faster than PIL's default 6, 5-25 % larger


@dataclass(frozen=True)
class ImageTask:
    """Which image to draw, and where its PNG goes."""

    domain: str
    seed: int
    split: str
    index: int  # position within the split
    image_id: int
    images_dir: str

    @property
    def file_name(self) -> str:
        return f"{self.split}_{self.index:05d}.png"


@dataclass(frozen=True)
class RefRecord:
    """A referent of an image before ids are given: its object index, sentences and clicks (pixels)."""

    object_index: int
    sentences: list
    click_center: list  # [x, y]
    click_corners: list  # [[x0, y0], [x1, y1]], inclusive


@dataclass(frozen=True)
class ImageRecord:
    """Everything about one drawn image except its pixels (already on disk)."""

    task: ImageTask
    annotations: list  # per object in drawing order: category_id, segmentation, area, bbox, attributes
    facts: list  # ObjectFacts per object
    refs: list  # RefRecord per referent, by object index
    repeats_referent_shape: bool  # some referent shares its class with another object


def image_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """The generator that alone decides one image."""
    return np.random.default_rng(np.random.SeedSequence([seed, DOMAIN_CODES[domain], SPLITS.index(split), index]))


def _repeats_shape(facts: list, referents) -> bool:
    counts = np.bincount([f.category_id for f in facts])
    return any(counts[facts[t].category_id] >= 2 for t in referents)


def _annotation(mask: np.ndarray, spec) -> dict:
    """COCO fields of one object's visible mask ((H, W) uint8): a list holding one RLE, area, bbox."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {
        "category_id": spec.category_id,
        "segmentation": [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}],
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "attributes": {"colour": spec.colour, "size": spec.size},
    }


def _clicks(mask: np.ndarray, layer) -> tuple:
    """SynthRef clicks of a visible mask, computed on the object's patch (the same result, faster)."""
    h, w = layer.coverage.shape
    center, corners = clicks_from_mask(mask[layer.y0 : layer.y0 + h, layer.x0 : layer.x0 + w])
    dx, dy = layer.x0, layer.y0
    return [center[0] + dx, center[1] + dy], [[x + dx, y + dy] for x, y in corners]


def draw_image(task: ImageTask) -> tuple:
    """(Scene, {object index: [Sentence, ...]}) of one image, recomputed from its seed alone.

    Focus images (natural, even index) are redrawn until a referent's shape repeats.
    """
    vocab = VOCABS[task.domain]
    rng = image_rng(task.seed, task.domain, task.split, task.index)
    focus = task.domain == "natural" and task.index % 2 == 0
    for _ in range(SCENE_ATTEMPTS):
        scene = make_scene(task.domain, rng, focus)
        referents = [k for k, f in enumerate(scene.facts) if f.area >= vocab.min_referent_pixels]
        described = describe_scene(scene.facts, referents, vocab, rng)
        if described and (not focus or _repeats_shape(scene.facts, described)):
            break
    return scene, described


def build_image(task: ImageTask) -> ImageRecord:
    """Draw and describe one image, save its PNG and return the rest as plain data."""
    scene, described = draw_image(task)
    Image.fromarray(scene.image).save(Path(task.images_dir) / task.file_name, compress_level=PNG_COMPRESS_LEVEL)
    masks = [scene.mask(k) for k in range(len(scene.objects))]
    refs = []
    for t, sentences in sorted(described.items()):
        center, corners = _clicks(masks[t], scene.objects[t].layer)
        refs.append(RefRecord(t, sentences, center, corners))
    return ImageRecord(
        task=task,
        annotations=[_annotation(m, spec) for m, spec in zip(masks, scene.objects)],
        facts=scene.facts,
        refs=refs,
        repeats_referent_shape=_repeats_shape(scene.facts, described),
    )


def no_target_counts(target_sentences: int, images: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """How many no-target sentences each image of a split gets, so they are `fraction` of all its sentences.

    N = round(f * S / (1 - f)) for S target sentences; every image gets N // images,
    a seeded choice of N % images images one more.
    """
    total = int(round(fraction * target_sentences / (1.0 - fraction)))
    counts = np.full(images, total // images, dtype=np.int64)
    counts[rng.choice(images, size=total % images, replace=False)] += 1
    return counts


@dataclass
class _Ids:
    """Running ids, all starting at 1."""

    ann: int = 1
    ref: int = 1
    sent: int = 1


def _ref_dict(ids: _Ids, task: ImageTask, ann_id: int, category_id: int, class_name: str, sentences: list,
              click_center: Optional[list], click_corners: Optional[list]) -> dict:
    sents = []
    for s in sentences:
        sents.append({"tokens": s.text.lower().split(), "raw": s.text, "sent": s.text, "sent_id": ids.sent,
                      "form": s.form})
        ids.sent += 1
    ref = {
        "ref_id": ids.ref, "ann_id": ann_id, "image_id": task.image_id, "category_id": category_id,
        "split": task.split, "sent_ids": [s["sent_id"] for s in sents], "sentences": sents,
        "file_name": task.file_name, "click_center": click_center, "click_corners": click_corners,
        "class_name": class_name, "no_target": ann_id == -1,
    }
    ids.ref += 1
    return ref


def assemble(records: list, domain: str, seed: int, no_target_fraction: float) -> tuple:
    """(refs list, instances dict, per-split summary) from image records in split/index order."""
    vocab = VOCABS[domain]
    ids = _Ids()
    refs, images, annotations, summary = [], [], [], {}
    for split in SPLITS:
        recs = [r for r in records if r.task.split == split]
        rng = image_rng(seed, domain, split, NO_TARGET_STREAM)
        target_sentences = sum(len(ref.sentences) for r in recs for ref in r.refs)
        absent = no_target_counts(target_sentences, len(recs), no_target_fraction, rng) if recs else []
        forms, no_target = {}, 0
        for rec, n_absent in zip(recs, absent):
            task = rec.task
            images.append({"id": task.image_id, "file_name": task.file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
            first_ann = ids.ann
            for ann in rec.annotations:
                annotations.append({"id": ids.ann, "image_id": task.image_id, **ann, "iscrowd": 0})
                ids.ann += 1
            for ref in rec.refs:
                cid = rec.facts[ref.object_index].category_id
                refs.append(_ref_dict(ids, task, first_ann + ref.object_index, cid, vocab.categories[cid],
                                      ref.sentences, ref.click_center, ref.click_corners))
                for s in ref.sentences:
                    forms[s.form] = forms.get(s.form, 0) + 1
            taken = {s.text for ref in rec.refs for s in ref.sentences}
            for _ in range(int(n_absent)):
                made = absent_sentence(rec.facts, vocab, rng, taken)
                if made is not None:
                    sentence, cid = made
                    taken.add(sentence.text)
                    refs.append(_ref_dict(ids, task, -1, cid, vocab.categories[cid], [sentence], None, None))
                    no_target += 1
        summary[split] = {
            "images": len(recs),
            "objects": sum(len(r.annotations) for r in recs),
            "refs": sum(len(r.refs) for r in recs),
            "sentences": target_sentences,
            "no_target_sentences": no_target,
            "forms": dict(sorted(forms.items())),
            "images_repeating_a_referent_shape": sum(r.repeats_referent_shape for r in recs),
        }
    categories = [{"id": cid, "name": name, "supercategory": vocab.supercategory}
                  for cid, name in vocab.categories.items()]
    instances = {
        "info": {"description": f"SynthRef {domain}", "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return canonical(refs), instances, summary


def canonical(obj):
    """A copy of JSON-able data whose object sharing depends only on its values.

    pickle memoises strings by identity, so equal data built along different
    paths (one process or several) could pickle to different bytes; a JSON
    round trip makes every value a fresh object and the bytes reproducible.
    """
    return json.loads(json.dumps(obj))

