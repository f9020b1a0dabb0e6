"""Accuracy split by how much the class name alone says: referents alone in their category vs with look-alikes.

Reproduces the look-alike table of "LRB-WREL on SynthRef aerial" in docs/RESULTS.md.

    refseg eval --checkpoint lts-aerial --data data/aerial-small-s0 --split test --per-sample --out upper.json
    python benchmarks/by_class_ambiguity.py --data data/aerial-small-s0 --split test upper.json naive.json wrel.json

A weak (class-name-only) expression such as "vehicle" names its referent
exactly when the referent is the only object of its category on the image;
with look-alikes only an accurate expression (or what LRB-WREL's reference
bank stores in its place) tells them apart. This script reads the per-sentence
records of `refseg eval --per-sample` and prints, per evaluation, oIoU, mIoU
and PointM (%) over the target sentences whose referent has 1, 2 or >= 3
objects of its category on its image (the referent included; `refseg stats`
gives the shares per split), and over all of them. oIoU per bucket comes from
each record's IoU and pixel counts (intersection = IoU (P + G) / (1 + IoU)).
"""

import argparse
import json
import sys
from pathlib import Path

BUCKETS = ("1", "2", ">=3", "all")


def bucket(n: int) -> str:
    return "1" if n == 1 else "2" if n == 2 else ">=3"


def summarise(records, alike) -> dict:
    """records: refseg eval per-sample dicts; alike: {ref_id: same-category objects} -> {bucket: figures}."""
    acc = {b: {"n": 0, "inter": 0.0, "union": 0.0, "iou": 0.0, "hits": 0} for b in BUCKETS}
    for r in records:
        if r["point_in_mask"] is None:  # a no-target sentence: no referent, no bucket
            continue
        if r["ref_id"] not in alike:
            raise SystemExit(f"error: record of sentence {r['sent_id']} names ref {r['ref_id']}, which the data "
                             "set has not in this split: evaluated on another data set or split?")
        iou, p, g = r["iou"], r["pred_pixels"], r["gt_pixels"]
        inter = iou * (p + g) / (1 + iou)
        for b in (bucket(alike[r["ref_id"]]), "all"):
            a = acc[b]
            a["n"] += 1
            a["inter"] += inter
            a["union"] += p + g - inter
            a["iou"] += iou
            a["hits"] += bool(r["point_in_mask"])
    out = {}
    for b, a in acc.items():
        if a["n"]:
            out[b] = {"n": a["n"], "oIoU": 100 * a["inter"] / max(a["union"], 1e-9), "mIoU": 100 * a["iou"] / a["n"],
                      "PointM": 100 * a["hits"] / a["n"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evals", nargs="+", help="JSON files written by refseg eval --per-sample --out")
    ap.add_argument("--data", required=True, help="the refer-format folder they were evaluated on")
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    from refseg.data import load_refer
    from refseg.data.stats import look_alikes

    data = load_refer(args.data)
    in_split = {s.ref_id for s in data.samples(args.split)}
    alike = {r: n for r, n in look_alikes(data).items() if r in in_split}
    results = {}
    for path in args.evals:
        doc = json.loads(Path(path).read_text())
        if "samples" not in doc:
            print(f"error: {path} has no per-sentence records ('samples'); run refseg eval with --per-sample",
                  file=sys.stderr)
            return 1
        results[path] = summarise(doc["samples"], alike)
    first = next(iter(results.values()))
    print(f"{args.data} {args.split}: target sentences per bucket (objects of the referent's category on its image): "
          + ", ".join(f"{b}: {first[b]['n']}" for b in BUCKETS if b in first))
    print(f"{'evaluation':40s} " + " ".join(f"{'oIoU ' + b:>10s} {'mIoU ' + b:>10s} {'PointM ' + b:>11s}"
                                            for b in BUCKETS))
    for path, res in results.items():
        cells = " ".join(f"{res[b]['oIoU']:10.2f} {res[b]['mIoU']:10.2f} {res[b]['PointM']:11.2f}" if b in res
                         else f"{'-':>10s} {'-':>10s} {'-':>11s}" for b in BUCKETS)
        print(f"{Path(path).stem:40s} {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": args.data, "split": args.split, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
