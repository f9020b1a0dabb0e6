"""`refseg stats DIR`: a summary of a refer-format data set.

Per split: images, refs, sentences, no-target sentences, weak refs, mean
sentence length (whitespace tokens of the expression), mean objects per
image (annotations in instances.json on the split's images), and how much
the class name alone says: per target ref, the objects of its category on
its image (the referent included; mean over the split's target refs) and
the share of target refs that are the only object of their category there
(where a class name such as "vehicle" already names the referent; this
bounds what a weak, class-name-only expression can say); both None for a
split with no target ref. Then the refs per category and the sentences per
form (`form` of each sentence, or "unknown"), per split.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from refseg.data.refer import ReferData, load_refer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="data set folder holding refs(<split_by>).p and instances.json")
    parser.add_argument("--split-by", default=None, help="which refs(<split_by>).p to read (unc, google, umd); "
                        "needed only when the folder holds several")
    parser.add_argument("--images", default=None, help="images folder (default DIR/images)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON instead of tables")


def look_alikes(data: ReferData) -> dict:
    """{ref_id: objects of the ref's category on its image, the referent included} for every target ref."""
    same = Counter((a["image_id"], a["category_id"]) for a in data.anns.values())
    return {r: same[(ref["image_id"], ref["category_id"])] for r, ref in data.refs_by_id.items() if not ref["no_target"]}


def compute_stats(data: ReferData) -> dict:
    """Summary of a data set as plain JSON-able data.

    Returns {"split_by", "splits": {split: {images, refs, sentences, ...}},
    "categories": {name: {split: refs}}, "forms": {form: {split: sentences}}}.
    """
    anns_per_image = Counter(a["image_id"] for a in data.anns.values())
    alike_of = look_alikes(data)
    splits, categories, forms = {}, {}, {}
    for split in data.splits():
        samples = data.samples(split)
        ref_ids = {s.ref_id for s in samples}
        image_ids = {s.image_id for s in samples}
        alike = [alike_of[r] for r in ref_ids if r in alike_of]
        splits[split] = {
            "images": len(image_ids),
            "refs": len(ref_ids),
            "sentences": len(samples),
            "no_target_sentences": sum(s.no_target for s in samples),
            "weak_refs": sum(data.refs_by_id[r]["weak"] for r in ref_ids),
            "mean_sentence_length": sum(len(s.text.split()) for s in samples) / len(samples),
            "mean_objects_per_image": sum(anns_per_image[i] for i in image_ids) / len(image_ids),
            "mean_same_category_objects": sum(alike) / len(alike) if alike else None,
            "unique_category_refs": sum(n == 1 for n in alike) / len(alike) if alike else None,
        }
        for r in ref_ids:
            name = data.refs_by_id[r]["class_name"]
            categories.setdefault(name, Counter())[split] += 1
        for s in samples:
            forms.setdefault(s.form or "unknown", Counter())[split] += 1
    return {
        "split_by": data.split_by,
        "splits": splits,
        "categories": {k: dict(v) for k, v in sorted(categories.items())},
        "forms": {k: dict(v) for k, v in sorted(forms.items())},
    }


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in [header, *rows]
    )


def format_stats(stats: dict) -> str:
    """Three aligned tables: per split, refs per category, sentences per form."""
    split_names = list(stats["splits"])
    keys = ["images", "refs", "sentences", "no_target_sentences", "weak_refs",
            "mean_sentence_length", "mean_objects_per_image", "mean_same_category_objects", "unique_category_refs"]
    labels = ["images", "refs", "sentences", "no-target", "weak refs", "words/sent", "objects/image",
              "same-class/ref", "class unique"]
    rows = []
    for split, st in stats["splits"].items():
        rows.append([split] + ["-" if st[k] is None else f"{st[k]:.2f}" if isinstance(st[k], float) else str(st[k])
                              for k in keys])
    parts = [f"split_by: {stats['split_by']}", _table(["split", *labels], rows)]
    for title, hist in (("category", stats["categories"]), ("form", stats["forms"])):
        hrows = [[name] + [str(counts.get(s, 0)) for s in split_names] + [str(sum(counts.values()))]
                 for name, counts in hist.items()]
        parts.append(_table([title, *split_names, "total"], hrows))
    return "\n\n".join(parts)


def main(args: argparse.Namespace) -> int:
    data = load_refer(args.dir, split_by=args.split_by, images_dir=args.images)  # bad data: refseg.cli says so, exit 2
    stats = compute_stats(data)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
