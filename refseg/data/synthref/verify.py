"""Re-check a written SynthRef data set from its files alone.

Each object's facts are recomputed from what is on disk: the class from
the annotation, the centroid and area from the decoded RLE mask, the
colour and size words from the annotation's `attributes`. Every sentence
is then parsed and evaluated again (`grammar.resolve`): a target sentence
must name its ref's object alone, a no-target sentence must name nothing.
None of the generator's own measurements or choices are reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from refseg.data.refer import load_refs_file
from refseg.data.synthref.grammar import GrammarError, ObjectFacts, resolve
from refseg.data.synthref.vocab import VOCABS


def decode_annotation(ann: dict) -> np.ndarray:
    """(H, W) uint8 {0, 1} mask of an annotation whose segmentation is a list holding one RLE."""
    (rle,) = ann["segmentation"]
    return mask_utils.decode(dict(rle, counts=rle["counts"].encode("ascii")))


def facts_from_annotations(annotations: list) -> list:
    """ObjectFacts of an image's objects (in the given order) from their stored masks and attributes."""
    facts = []
    for ann in annotations:
        rows, cols = np.nonzero(decode_annotation(ann))
        attrs = ann["attributes"]
        facts.append(ObjectFacts(ann["category_id"], attrs["colour"], attrs["size"],
                                 float(cols.mean()), float(rows.mean()), int(rows.size)))
    return facts


def check_dataset(ann_dir) -> list:
    """Problems found in the SynthRef data set at `ann_dir` (an empty list when every sentence holds)."""
    ann_dir = Path(ann_dir)
    meta = json.loads((ann_dir / "synthref.json").read_text())
    vocab = VOCABS[meta["domain"]]
    instances = json.loads((ann_dir / "instances.json").read_text())
    by_image = {}
    for ann in sorted(instances["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    facts = {image_id: facts_from_annotations(anns) for image_id, anns in by_image.items()}
    problems = []
    for ref in load_refs_file(ann_dir / meta["refs_file"]):
        anns = by_image[ref["image_id"]]
        for s in ref["sentences"]:
            where = f"ref {ref['ref_id']} sentence {s['sent_id']} {s['raw']!r}"
            try:
                match = resolve(s["raw"], facts[ref["image_id"]], vocab)
            except GrammarError as e:
                problems.append(f"{where}: not in the grammar: {e}")
                continue
            if ref["no_target"]:
                if not match.empty:
                    named = sorted(match.definite | match.uncertain)
                    problems.append(f"{where}: no-target sentence names objects {named}")
            elif match.unique is None or anns[match.unique]["id"] != ref["ann_id"]:
                problems.append(f"{where}: names {sorted(match.definite)} (undecided {sorted(match.uncertain)}), "
                                f"not annotation {ref['ann_id']} alone")
    return problems
