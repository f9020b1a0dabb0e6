"""PKS: does a PointM miss come from the choice of object (the heatmap peak) or from the mask's argmax?

    python benchmarks/pks_peak_vs_point.py --model pks-click-synthref --split val

PointM scores the argmax of the mask logits (refseg/metrics.py). PKS reads
its dynamic kernel at the position branch's peak (``out["peak"]``), so a miss
has two possible causes: the peak sits on another object (localisation), or
it sits on the referent and the mask's strongest logit lies elsewhere. This
evaluates the model as `refseg eval` does and, per target sentence, also
maps the peak back to the original image; it prints PointM, the share of
peaks inside the ground-truth mask, and the four hit/miss combinations.
"""

import json
import sys

from eval_with_options import parse_model_args  # benchmarks/, the script's own folder


def main() -> int:
    args, model = parse_model_args(__doc__.splitlines()[0], "a PKS model: shipped name, run or checkpoint folder")

    import refseg.engine.evaluate_core as core
    from refseg.data import load_refer

    peaks = []  # per evaluated sentence, in evaluation order: the peak in original-image pixels
    predict = core.predict_masks

    def with_peaks(out, orig_hw, letterbox):
        if "peak" not in out:
            raise SystemExit(f"error: {args.model} returns no 'peak': not a PKS model")
        for i in range(len(orig_hw)):
            h, w = (int(v) for v in orig_hw[i])
            p = letterbox.params(h, w)  # letterboxed pixel centres at integers -> original pixels
            px, py = out["peak"][i].tolist()
            x = min(max(round((px + 0.5) * w / p.new_w - 0.5), 0), w - 1)
            y = min(max(round((py + 0.5) * h / p.new_h - 0.5), 0), h - 1)
            peaks.append((x, y))
        return predict(out, orig_hw, letterbox)

    core.predict_masks = with_peaks
    records = []
    try:
        result = core.evaluate_model(model, args.data, args.split, progress=False, per_sample=records)
    finally:
        core.predict_masks = predict
    data = load_refer(args.data)
    samples = {s.sent_id: s for s in data.samples(args.split)}
    counts = {"both": 0, "mask argmax only": 0, "peak only": 0, "neither": 0}
    for rec, (x, y) in zip(records, peaks):
        if rec["point_in_mask"] is None:  # no target
            continue
        s = samples[rec["sent_id"]]
        in_peak = bool(data.get_mask(s.ann_id, image_id=s.image_id)[y, x])
        key = ("both" if in_peak else "mask argmax only") if rec["point_in_mask"] else ("peak only" if in_peak
                                                                                         else "neither")
        counts[key] += 1
    n = sum(counts.values())
    print(json.dumps({"model": args.model, "options": args.options, "split": args.split, "n": n,
                      "PointM (mask argmax)": round(100 * result["PointM"], 2),
                      "peak inside the mask": round(100 * (counts["both"] + counts["peak only"]) / n, 2),
                      **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
