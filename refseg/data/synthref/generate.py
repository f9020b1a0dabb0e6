"""`refseg make-data`: generate a SynthRef data set (docs/SYNTHREF.md) in the refer format.

    refseg make-data --domain natural --preset small --seed 0 --out data/synthref-natural

writes, atomically (a temporary sibling folder renamed into place at the end):

    OUT/images/<split>_<index>.png   320 x 320 RGB
    OUT/refs(unc).p                  pickled list of ref dicts (protocol 4)
    OUT/instances.json               COCO: every object of every image, masks as [one RLE]
    OUT/synthref.json                metadata (domain, preset, seed, version, counts), written last

Ids (image, annotation, ref, sentence) count from 1 in split order train,
val, test. Extra keys beyond the refer format: on refs `click_center`,
`click_corners`, `class_name`, `no_target`; on sentences `form`; on
annotations `attributes` = {"colour": word or null, "size": word or null},
which with the stored mask is all the grammar can say about an object (see
`verify.py`). A preset and a seed fix the output: the annotation files are
byte-identical across runs and across `--workers`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import sys
import time
from pathlib import Path

from refseg.argtypes import fraction_below_one, nonneg_int, processes
from refseg.data.atomic import staged_directory
from refseg.data.synthref.build import ImageTask, assemble, build_image
from refseg.data.synthref.vocab import DOMAINS, IMAGE_SIZE, PRESETS, SPLITS, VOCABS

VERSION = "1.0"  # of the generator; changes whenever the output for a seed changes
REFS_FILE = "refs(unc).p"
PICKLE_PROTOCOL = 4  # fixed so the refs file's bytes do not depend on the Python version's default
CHUNK = 4  # images per task sent to a worker


def image_tasks(domain: str, preset: str, seed: int, images_dir: Path) -> list:
    """One ImageTask per image of the preset, in split order; image ids count from 1."""
    tasks = []
    for split, count in zip(SPLITS, PRESETS[preset]):
        for index in range(count):
            tasks.append(ImageTask(domain, seed, split, index, len(tasks) + 1, str(images_dir)))
    return tasks


def _collect(results, total: int, progress: bool) -> list:
    records = []
    step = max(1, total // 10)
    for record in results:
        records.append(record)
        if progress and len(records) % step == 0:
            print(f"  {len(records)}/{total} images", file=sys.stderr, flush=True)
    return records


def _draw_all(tasks: list, workers: int, progress: bool) -> list:
    """build_image over all tasks, in order; `workers` > 1 uses a process pool."""
    if workers <= 1:
        return _collect(map(build_image, tasks), len(tasks), progress)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return _collect(pool.imap(build_image, tasks, chunksize=CHUNK), len(tasks), progress)


def _write_files(folder: Path, refs: list, instances: dict, metadata: dict) -> None:
    """The annotation files; synthref.json last, so its presence means the rest is complete."""
    with open(folder / REFS_FILE, "wb") as f:
        pickle.dump(refs, f, protocol=PICKLE_PROTOCOL)
    (folder / "instances.json").write_text(json.dumps(instances, sort_keys=True, separators=(",", ":")))
    (folder / "synthref.json").write_text(json.dumps(metadata, sort_keys=True, indent=2) + "\n")


def generate(out, domain: str = "natural", preset: str = "tiny", seed: int = 0, no_target_fraction: float = 0.0,
             workers: int = 1, overwrite: bool = False, progress: bool = False) -> dict:
    """Generate a SynthRef data set into the folder `out`; returns the metadata written to synthref.json.

    no_target_fraction: share (0 <= f < 1) of each split's sentences that name
    an absent object. workers: processes drawing images (output identical for any).
    Raises FileExistsError if `out` exists and `overwrite` is False.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if not 0.0 <= no_target_fraction < 1.0:
        raise ValueError(f"no_target_fraction must be in [0, 1), got {no_target_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    with staged_directory(out, overwrite=overwrite) as tmp:
        images_dir = tmp / "images"
        images_dir.mkdir()
        tasks = image_tasks(domain, preset, seed, images_dir)
        records = _draw_all(tasks, workers, progress)
        refs, instances, summary = assemble(records, domain, seed, no_target_fraction)
        vocab = VOCABS[domain]
        metadata = {
            "name": "SynthRef",
            "spec": "docs/SYNTHREF.md",
            "version": VERSION,
            "domain": domain,
            "preset": preset,
            "seed": seed,
            "no_target_fraction": no_target_fraction,
            "image_size": IMAGE_SIZE,
            "refs_file": REFS_FILE,
            "categories": {str(k): v for k, v in vocab.categories.items()},
            "splits": summary,
        }
        _write_files(tmp, refs, instances, metadata)
    return metadata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", choices=DOMAINS, default="natural", help="natural shapes or aerial scenes")
    sizes = ", ".join(f"{name} {'/'.join(map(str, counts))}" for name, counts in PRESETS.items())
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help=f"images per split (train/val/test): {sizes}")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="non-negative; with the preset it fixes the output")
    parser.add_argument("--out", required=True, help="folder to create (must not exist unless --overwrite)")
    parser.add_argument("--no-target-fraction", type=fraction_below_one, default=0.0,
                        help="share of each split's sentences that name an absent object (default 0)")
    parser.add_argument("--workers", type=processes, default=os.cpu_count() or 1,
                        help="processes drawing images (default: all CPU cores); the output does not depend on it")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT (atomically) if it exists")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        meta = generate(args.out, args.domain, args.preset, args.seed, args.no_target_fraction, args.workers,
                        args.overwrite, progress=True)
    except FileExistsError as e:
        print(f"refseg make-data: error: {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"refseg make-data: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    for split, c in meta["splits"].items():
        print(f"{split:>5}: {c['images']} images, {c['objects']} objects, {c['refs']} refs, "
              f"{c['sentences']} sentences, {c['no_target_sentences']} no-target")
    print(f"wrote {Path(args.out)} in {seconds:.1f} s")
    return 0
