"""`refseg weaken`: the LRB-WREL weak-expression version of a refer data set.

    refseg weaken --data data/synthref-aerial --accurate-fraction 0.1 --seed 0 --out data/aerial-weak10

As LRB-WREL's tool does: per category, a seeded choice of the TRAIN refs
keeps its accurate sentences; every other train ref has each sentence's
`raw`, `sent` and `tokens` replaced by the class name (the category's name
in instances.json, lower-case), its sentences' `form` set to "class", and
`weak: true` set on the ref. Sentence and ref ids stay. val / test refs,
and no-target refs (`no_target` or `ann_id == -1`), are left exactly as they were.

Rounding: a category with n train refs keeps k = floor(p * n + 0.5) of them
(half rounds up), at least 1 when p > 0 and at most n. The choice is
`default_rng(SeedSequence([seed, category_id])).permutation` over the
category's refs in ref_id order, first k kept, so categories are drawn
independently of each other.

OUT is written atomically and holds `refs(<split_by>).p`, a copy of
`instances.json`, `images` (a symlink to the source's images folder, or to
`--images`, by absolute path; absent if neither exists) and `weak.json`
(what was done, counts per category), written last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from refseg.argtypes import fraction, nonneg_int
from refseg.data.refer import ReferFormatError, load_refer, load_refs_file
from refseg.data.atomic import staged_directory
from refseg.outputs import check_folder_output

PICKLE_PROTOCOL = 4
WEAK_FORM = "class"


def accurate_count(n: int, fraction: float) -> int:
    """How many of a category's n train refs keep accurate sentences (see the module docstring)."""
    if n == 0 or fraction <= 0.0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def _category_names(instances: dict) -> dict:
    return {int(c["id"]): str(c["name"]).lower() for c in instances["categories"]}


def _ref_category(ref: dict, annotations: dict) -> int:
    """A ref's category id; RRSIS-D-style files may keep it only on the annotation (`categories_id`)."""
    if ref.get("category_id") is not None:
        return int(ref["category_id"])
    ann = annotations.get(ref.get("ann_id"), {})
    cid = ann.get("category_id", ann.get("categories_id"))
    if cid is None:
        raise ReferFormatError(f"ref {ref.get('ref_id')}: no category_id on the ref or its annotation")
    return int(cid)


def _is_no_target(ref: dict) -> bool:
    return bool(ref.get("no_target")) or ref.get("ann_id") == -1


def weaken_refs(refs: list, names: dict, annotations: dict, fraction: float, seed: int) -> tuple:
    """(new refs list, per-category counts); refs that stay accurate are the very same dicts."""
    by_category = {}
    for ref in refs:
        if ref.get("split") == "train" and not _is_no_target(ref):
            by_category.setdefault(_ref_category(ref, annotations), []).append(ref["ref_id"])
    weak_ids, counts = set(), {}
    for cid, ref_ids in sorted(by_category.items()):
        ref_ids = sorted(ref_ids)
        keep = accurate_count(len(ref_ids), fraction)
        order = np.random.default_rng(np.random.SeedSequence([seed, cid])).permutation(len(ref_ids))
        weak_ids.update(ref_ids[int(k)] for k in order[keep:])
        counts[names[cid]] = {"category_id": cid, "train_refs": len(ref_ids), "accurate": keep,
                              "weak": len(ref_ids) - keep}
    out = []
    for ref in refs:
        if ref["ref_id"] not in weak_ids:
            out.append(ref)
            continue
        name = names[_ref_category(ref, annotations)]
        sentences = [dict(s, raw=name, sent=name, tokens=name.split(), form=WEAK_FORM) for s in ref["sentences"]]
        out.append(dict(ref, sentences=sentences, weak=True))
    return out, counts


def weaken(src_dir, out_dir, accurate_fraction: float, seed: int, split_by: str = "unc",
           images_dir: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write the weak-expression version of the refer data set at `src_dir` to `out_dir`; returns weak.json's dict.

    accurate_fraction: p in [0, 1], share of each category's train refs that keep accurate sentences.
    """
    if not 0.0 <= accurate_fraction <= 1.0:
        raise ValueError(f"accurate_fraction must be in [0, 1], got {accurate_fraction}")
    src = Path(src_dir).absolute()
    refs_name = f"refs({split_by}).p"
    load_refer(src, split_by=split_by, images_dir=images_dir)  # every check a loader makes, before OUT is touched
    refs = load_refs_file(src / refs_name)
    instances_path = src / "instances.json"
    instances = json.loads(instances_path.read_text(encoding="utf-8"))
    annotations = {a["id"]: a for a in instances.get("annotations", [])}
    new_refs, counts = weaken_refs(refs, _category_names(instances), annotations, accurate_fraction, seed)
    images = Path(images_dir).absolute() if images_dir is not None else src / "images"
    images = images.resolve() if images.is_dir() else None
    check_folder_output(out_dir, [("--data", src), ("--images", images)])  # replacing OUT must not delete them
    meta = {
        "source": str(src),
        "refs_file": refs_name,
        "accurate_fraction": accurate_fraction,
        "seed": seed,
        "rounding": "per category k = floor(p * n + 0.5), at least 1 if p > 0; seeded by [seed, category_id]",
        "images": None if images is None else str(images),
        "weak_refs": sum(c["weak"] for c in counts.values()),
        "categories": counts,
    }
    with staged_directory(out_dir, overwrite=overwrite) as tmp:
        with open(tmp / refs_name, "wb") as f:
            pickle.dump(new_refs, f, protocol=PICKLE_PROTOCOL)
        shutil.copyfile(instances_path, tmp / "instances.json")
        if images is not None:
            os.symlink(images, tmp / "images", target_is_directory=True)
        (tmp / "weak.json").write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n")
    return meta


def ensure_weak(src_dir, out_dir, accurate_fraction: float, seed: int, split_by: str = "unc",
                images_dir: Optional[str] = None) -> Path:
    """`out_dir`, holding the weak split of `src_dir`: made by `weaken`, or reused
    when its weak.json records the same source, fraction, seed and refs file
    (what `refseg train --accurate-fraction` calls). Raises FileExistsError
    when `out_dir` holds something else."""
    out = Path(out_dir)
    wanted = {"source": str(Path(src_dir).absolute()), "accurate_fraction": float(accurate_fraction),
              "seed": int(seed), "refs_file": f"refs({split_by}).p"}
    if out.exists():
        try:
            meta = json.loads((out / "weak.json").read_text())
        except (OSError, ValueError, RecursionError):
            meta = None
        found = None if meta is None else {k: meta.get(k) for k in wanted}
        if found != wanted:
            raise FileExistsError(f"{out} exists but is not the weak split {wanted} (weak.json: {found})")
        return out
    weaken(src_dir, out, accurate_fraction, seed, split_by=split_by, images_dir=images_dir)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="source refer data set folder (refs(<split_by>).p, instances.json)")
    parser.add_argument("--accurate-fraction", type=fraction, required=True,
                        help="share p of each category's train refs that keep accurate sentences (0..1)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="seed of the per-category choice")
    parser.add_argument("--out", required=True, help="folder to create (must not exist unless --overwrite)")
    parser.add_argument("--split-by", default="unc",
                        help="refs file to read and write: refs(<split-by>).p (default unc)")
    parser.add_argument("--images", default=None, help="images folder to link as OUT/images (default: DATA/images)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT (atomically) if it exists")


def main(args: argparse.Namespace) -> int:
    try:
        meta = weaken(args.data, args.out, args.accurate_fraction, args.seed, args.split_by, args.images,
                      args.overwrite)
    except (FileExistsError, ValueError) as e:  # ReferFormatError is a ValueError
        print(f"refseg weaken: error: {e}", file=sys.stderr)
        return 2
    for name, c in meta["categories"].items():
        print(f"{name:>14}: {c['accurate']}/{c['train_refs']} train refs accurate")
    if meta["images"] is None:
        print("note: no images folder found; pass --images to the loader", file=sys.stderr)
    print(f"wrote {args.out}: {meta['weak_refs']} weak train refs")
    return 0
