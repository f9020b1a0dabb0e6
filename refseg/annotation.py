"""What a training set costs to annotate, in annotator seconds, under each supervision budget.

The benchmark (`refseg bench`) puts every method on one axis: how much
human time its training labels would take. Each kind of label gets one
stated cost, taken from the study that measured it (or, for referring
expressions, derived as `EXPRESSION` says); they are assumptions, and the
report prints them with their sources.

What each supervision reads from a training ref (a referent), and so pays for:

    full   one mask per ref + its labelled text
    click  one centre click + one box (the two corner clicks) per ref + its labelled text
    text   its labelled text only

"Labelled text" is one referring expression per sentence, except on a weak
ref (`refseg weaken`: its sentences were replaced by the class name), which
costs one class label. So LRB-WREL at p = 0.1 and its naive baseline, which
read the same weakened data, cost the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class LabelCost:
    """The cost of one label, with where the figure comes from."""

    seconds: float  # annotator seconds per label
    unit: str  # what one label is
    source: str  # the study that measured it
    note: str  # how the figure is read from the source


MASK = LabelCost(
    79.2, "polygon mask of one object",
    "Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014",
    "COCO's instance segmentation took 22 worker hours per 1,000 objects: 22 x 3600 / 1000 = 79.2 s.")
POINT = LabelCost(
    2.4, "one click on an object",
    "Bearman et al., What's the Point: Semantic Segmentation with Point Supervision, ECCV 2016",
    "measured time of point-level annotation, 2.4 s per object instance.")
BOX = LabelCost(
    7.0, "a box from clicks (extreme / corner clicking)",
    "Papadopoulos et al., Extreme clicking for efficient object annotation, ICCV 2017",
    "7.0 s per box by extreme clicking (34.5 s by drawing); refseg's two corner clicks give the same box.")
CLASS_LABEL = LabelCost(
    1.0, "a class name for one object",
    "Bearman et al., What's the Point, ECCV 2016",
    "an image-level class label takes about 1 s per class.")
EXPRESSION = LabelCost(
    10.0, "one referring expression",
    "derived: Kazemzadeh et al., ReferItGame, EMNLP 2014 (collection game); Yu et al., ECCV 2016 (lengths); "
    "Dhakal et al., CHI 2018 (typing speed)",
    "no cited study times the writing of one expression. RefCOCO, collected with the ReferItGame interface, "
    "averages 3.6 words per expression (Yu et al. 2016); typing that at 52 words per minute, the mean over "
    "168,000 typists (Dhakal et al. 2018), takes 4.2 s; we add about 6 s to look at the scene and choose what "
    "tells the object apart from the others (our assumption) and round to 10 s.")

COSTS: Dict[str, LabelCost] = {"mask": MASK, "point": POINT, "box": BOX, "class": CLASS_LABEL,
                               "expression": EXPRESSION}

# supervision -> per-ref labels besides the text
GEOMETRY = {"full": ("mask",), "click": ("point", "box"), "text": ()}


def count_labels(data, split: str, supervision: str) -> Dict[str, int]:
    """How many labels of each kind (keys of COSTS) the split's refs carry under a supervision.

    data: a ReferData. No-target refs have no object to outline or click,
    so they pay for their expressions only.
    """
    if supervision not in GEOMETRY:
        raise ValueError(f"supervision must be one of {sorted(GEOMETRY)}, got {supervision!r}")
    counts = {k: 0 for k in COSTS}
    for ref in data.refs_by_id.values():
        if ref["split"] != split:
            continue
        if not ref["no_target"]:
            for kind in GEOMETRY[supervision]:
                counts[kind] += 1
        if ref["weak"]:
            counts["class"] += 1
        else:
            counts["expression"] += len(ref["sentences"])
    return counts


def annotation_cost(data, split: str, supervision: str) -> Dict[str, object]:
    """{"seconds", "hours", "refs", "seconds_per_ref", "labels": {kind: count}} of a split under a supervision."""
    counts = count_labels(data, split, supervision)
    seconds = sum(COSTS[k].seconds * n for k, n in counts.items())
    refs = sum(1 for r in data.refs_by_id.values() if r["split"] == split)
    return {"seconds": seconds, "hours": seconds / 3600.0, "refs": refs,
            "seconds_per_ref": seconds / refs if refs else float("nan"), "labels": counts}
