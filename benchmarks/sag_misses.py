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
"""

import argparse
import collections
import json
from pathlib import Path

import torch


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
    for image_id in dict.fromkeys(s.image_id for s in samples):
        group = [s for s in samples if s.image_id == image_id]
        predictor.set_image(data.load_image(image_id))
        result = predictor.predict([s.text for s in group])
        masks = {aid: data.get_mask(aid).astype(bool) for aid in objects[image_id]}
        for s, (x, y) in zip(group, result.points):
            inside = [aid for aid, m in masks.items() if m[int(y), int(x)]]
            if s.ann_id in inside:
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


if __name__ == "__main__":
    main()
