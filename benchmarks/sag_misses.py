"""What does a model point at when it misses? Wrong picks split by colour and shape, per sentence form.

    python benchmarks/sag_misses.py --model sag-synthref --data data/natural-small-s0 --split test

Runs the model through refseg.Predictor on every sentence of the split and takes
its point (the response map's argmax, the PointM point). Each sentence is then
one of: hit (the point lies in the referent's mask); background (in no object);
or an object that is not the referent, labelled by whether it has the
referent's colour and shape (SynthRef's ``attributes.colour`` and category in
instances.json). Prints the counts overall and per form. Works for any model
on any SynthRef natural split; written for SaG (issue 5), whose first shipped
model mostly picked the right shape in the wrong colour.

Two more tables read the words:
- hit rate per form and by the optional words the sentence carries (SynthRef
  adds a size or colour word exactly when another object shares the shape, so
  these are the sentences that need the word);
- the colour swap: every sentence with one colour word whose image holds an
  object of the same shape in another colour is also run with its colour word
  replaced by that object's colour; counted by where the two points land
  (referent / that object / elsewhere). A model that reads the colour word
  moves from the referent to the other object.
"""

import argparse
import collections
import json
from pathlib import Path

import torch


COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")  # SynthRef natural
SIZES = ("small", "large")


def where(point, ref_mask, other_mask) -> str:
    x, y = (int(v) for v in point)
    return "referent" if ref_mask[y, x] else ("other object" if other_mask[y, x] else "elsewhere")


def word_key(sample) -> tuple:
    """(form, which optional words the sentence has: "shape only", "size", "colour", "size + colour")."""
    words = sample.text.split()
    kinds = [k for k, vocab in (("size", SIZES), ("colour", COLOURS)) if any(w in vocab for w in words)]
    return sample.form or "-", " + ".join(kinds) or "shape only"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sag-synthref", help="shipped name, run folder or checkpoint")
    ap.add_argument("--data", default="data/natural-small-s0")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import refseg
    from refseg.data import load_refer

    data = load_refer(args.data)
    anns = {a["id"]: a for a in json.loads((Path(args.data) / "instances.json").read_text())["annotations"]}
    objects = collections.defaultdict(list)
    for a in anns.values():
        objects[a["image_id"]].append(a["id"])
    predictor = refseg.Predictor(refseg.load(args.model))
    samples = [s for s in data.samples(args.split) if not s.no_target]
    counts = collections.defaultdict(collections.Counter)  # form -> kind -> sentences
    worded = collections.defaultdict(lambda: [0, 0])  # (form, words) -> [hits, sentences]
    swapped = collections.Counter()  # (where the sentence points, where its colour swap points) -> sentences
    for image_id in dict.fromkeys(s.image_id for s in samples):
        group = [s for s in samples if s.image_id == image_id]
        predictor.set_image(data.load_image(image_id))
        result = predictor.predict([s.text for s in group])
        masks = {aid: data.get_mask(aid).astype(bool) for aid in objects[image_id]}
        swaps = []  # (sentence index in group, the other object, the swapped text)
        for i, s in enumerate(group):
            words = s.text.split()
            named = [w for w in words if w in COLOURS]
            worded[word_key(s)][1] += 1
            ref = anns[s.ann_id]
            others = [aid for aid in objects[image_id] if aid != s.ann_id
                      and anns[aid]["category_id"] == ref["category_id"]
                      and anns[aid]["attributes"].get("colour") not in (None, ref["attributes"].get("colour"))]
            if len(named) == 1 and others:
                new_colour = anns[others[0]]["attributes"]["colour"]
                swaps.append((i, others[0], " ".join(new_colour if w == named[0] else w for w in words)))
        moved = predictor.predict([t for _, _, t in swaps]).points if swaps else []
        for (i, other, _), point in zip(swaps, moved):
            ref_mask, other_mask = masks[group[i].ann_id], masks[other]
            swapped[(where(result.points[i], ref_mask, other_mask), where(point, ref_mask, other_mask))] += 1
        for s, (x, y) in zip(group, result.points):
            inside = [aid for aid, m in masks.items() if m[int(y), int(x)]]
            if s.ann_id in inside:
                worded[word_key(s)][0] += 1
                kind = "hit"
            elif not inside:
                kind = "background"
            else:
                other, ref = anns[inside[0]], anns[s.ann_id]
                colour = "same colour" if other["attributes"].get("colour") == ref["attributes"].get("colour") else "other colour"
                shape = "same shape" if other["category_id"] == ref["category_id"] else "other shape"
                kind = f"object, {colour}, {shape}"
            counts[s.form or "-"][kind] += 1
            counts["all"][kind] += 1
    kinds = sorted(counts["all"], key=lambda k: -counts["all"][k])
    forms = ["all"] + sorted(f for f in counts if f != "all")
    print(f"{args.model} on {args.data} {args.split}: % of sentences (n per form in the last row)")
    print(f"{'':36s}" + "".join(f"{f:>11s}" for f in forms))
    for k in kinds:
        print(f"{k:36s}" + "".join(f"{100 * counts[f][k] / sum(counts[f].values()):11.1f}" for f in forms))
    print(f"{'n':36s}" + "".join(f"{sum(counts[f].values()):11d}" for f in forms))
    print("\nhit rate (%) by the optional words of the sentence")
    for (form, words), (hits, n) in sorted(worded.items()):
        print(f"  {form:10s} {words:16s} {100 * hits / n:6.1f}  (n {n})")
    n_swap = sum(swapped.values())
    print(f"\ncolour swap ({n_swap} sentences with one colour word and a same-shape object of another colour):"
          " sentence -> swapped sentence")
    for (a, b), n in sorted(swapped.items(), key=lambda kv: -kv[1]):
        print(f"  {a:13s} -> {b:13s} {n:5d}  ({100 * n / n_swap:.1f} %)")


if __name__ == "__main__":
    main()
