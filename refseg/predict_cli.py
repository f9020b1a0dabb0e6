"""`refseg predict`: segment what expressions name, on one image or a folder.

One image:
    refseg predict --model lts-synthref --image photo.png \
        --text "the red star" --text "the blue circle on the left" \
        --out overlay.png --mask-out mask.png

A batch job (a folder of images and a CSV or JSONL of expressions):
    refseg predict --model lts-synthref --images DIR --queries queries.csv --out-dir OUT

CSV: a header with columns ``image`` and ``text`` (one row per expression).
JSONL: one object per line, ``{"image": "a.png", "text": "..."}`` or
``{"image": "a.png", "texts": ["...", "..."]}``. Image paths are relative to
``--images``. OUT receives, per expression, ``<image-stem>_<k>.png`` (binary
mask, 0/255) and ``<image-stem>_overlay.png`` per image, plus
``results.jsonl`` with scores, the no-target decision and COCO RLE masks.
An image that cannot be read is skipped: its line in ``results.jsonl`` is
``{"image": ..., "error": "..."}``, the others are segmented, and the
command exits with status 1.

Outputs are checked before the model loads: an output that is an input (the
image, the queries file, the model; through a symlink or a hard link too),
that replaces a file in the --images folder, that two images would both
write (``a.png`` and ``a.jpg``; compared case-insensitively), or whose suffix
names no format Pillow writes (masks: lossless formats only) is refused.
Images are written in the format their suffix names (``--out x.jpg`` is a
JPEG). Every file goes to a temporary name and all are renamed into place
together at the end (refseg/outputs.py), so a failed run leaves no file and
no partial set.
"""

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from refseg.argtypes import device, probability_threshold, resolve_device, threads
from refseg.outputs import OutputSet, model_inputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lts-synthref", help="a shipped model name or a checkpoint/run path")
    p.add_argument("--options", default=None,
                   help='JSON of inference options merged into the model config, e.g. \'{"mask_refine": 2}\' '
                        "for SaG's finer masks (only options that keep the weights)")
    p.add_argument("--image", help="one input image")
    p.add_argument("--text", action="append", default=[], help="an expression; repeat for several")
    p.add_argument("--out", help="overlay image for --image (all expressions, one colour each); "
                                 "the suffix names the format (.png, .jpg ...)")
    p.add_argument("--mask-out", help="binary mask for --image, a lossless format (.png); with several --text, "
                                      "_<k> is added")
    p.add_argument("--images", help="folder of images for a batch job")
    p.add_argument("--queries", help="CSV (image,text) or JSONL of expressions for a batch job")
    p.add_argument("--out-dir", help="output folder for a batch job")
    p.add_argument("--threshold", type=probability_threshold, default=0.5, help="mask probability threshold")
    p.add_argument("--device", type=device, default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=threads, default=0,
                   help="torch threads, and onnxruntime's for the image graph (0: leave the default)")
    p.add_argument("--backend", choices=("auto", "onnx", "torch"), default=None,
                   help="auto: ONNX Runtime graphs (built on first use, cached per model) on the CPU when "
                        "onnxruntime is installed, else PyTorch; onnx or torch: that one "
                        "(default: $REFSEG_BACKEND, else auto)")


def _fail(msg: str) -> int:
    print(f"refseg predict: error: {msg}", file=sys.stderr)
    return 2


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255)


def _with_index(path: str, k: int, n: int) -> Path:
    p = Path(path)
    return p if n == 1 else p.with_name(f"{p.stem}_{k}{p.suffix}")


def _output_set(args, files=(), folders=()) -> OutputSet:
    """An OutputSet that knows the command's inputs: `files` and `folders` plus the model's."""
    model_files, model_folders = model_inputs("--model", args.model)
    return OutputSet(list(files) + model_files, list(folders) + model_folders)


def _stem(name: str) -> str:
    """The output name stem of a query image: its path without suffix, '/' -> '__'."""
    return Path(name).with_suffix("").as_posix().replace("/", "__")


def read_queries(path: Path) -> "OrderedDict[str, list]":
    """Read a CSV or JSONL query file into {image: [texts]} (file order kept); see refseg.expressions.read_queries."""
    from refseg.expressions import read_queries as read

    return read(path)


def _plan_single(args) -> OutputSet:
    """The outputs of a one-image job, checked (ValueError / OutputError) before the model loads."""
    from refseg.expressions import check_expressions

    if not args.text:
        raise ValueError("--image needs at least one --text")
    check_expressions(args.text, "--text")  # before any work: a bad expression writes nothing
    outs = _output_set(args, [("--image", args.image)])
    if args.out:
        outs.plan(args.out, "--out", image="rgb")
    if args.mask_out:
        for k in range(len(args.text)):
            outs.plan(_with_index(args.mask_out, k, len(args.text)), "--mask-out", image="mask")
    return outs


def _single(args, predictor, outs: OutputSet) -> int:
    from refseg.data.image import load_image_rgb
    from refseg.vis import overlay

    rgb = load_image_rgb(args.image)
    predictor.set_image(rgb)
    result = predictor.predict(args.text)
    for k, text in enumerate(args.text):
        print(json.dumps({
            "text": text, "score": round(float(result.scores[k]), 4),
            "no_target": bool(result.no_target[k]), "area": int(result.masks[k].sum()),
            "point": [int(v) for v in result.points[k]],
        }))
    with outs:
        if args.out:
            outs.save_image(args.out, overlay(rgb, list(result.masks), args.text))
        if args.mask_out:
            for k in range(len(args.text)):
                outs.save_image(_with_index(args.mask_out, k, len(args.text)), _mask_image(result.masks[k]))
    return 0


def _plan_batch(args):
    """(queries, outs) of a batch job, checked (ValueError / OutputError) before the model loads.

    Every output name is planned up front: two images whose outputs would
    share a name (a.png / a.jpg, sub/x.png / sub__x.png) are refused, naming both.
    """
    if not (args.queries and args.out_dir):
        raise ValueError("a batch job needs --images, --queries and --out-dir")
    root, out_dir = Path(args.images), Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir}: exists and is not a folder")
    queries = read_queries(Path(args.queries))
    missing = [name for name in queries if not (root / name).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} image(s) named in {args.queries} not found under {root}, "
                         f"e.g. {missing[0]!r}")
    outs = _output_set(args, [("--queries", args.queries)], [("--images", root)])
    outs.plan(out_dir / "results.jsonl", "results.jsonl")
    for name, texts in queries.items():
        stem, owner = _stem(name), f"image {name!r}"
        for k in range(len(texts)):
            outs.plan(out_dir / f"{stem}_{k}.png", owner, image="mask")
        outs.plan(out_dir / f"{stem}_overlay.png", owner, image="rgb")
    return queries, outs


def _batch(args, predictor, queries, outs: OutputSet) -> int:
    from refseg.data.image import ImageReadError, load_image_rgb

    root, out_dir = Path(args.images), Path(args.out_dir)
    loaded = {}  # images read for prediction, kept until their overlay is drawn
    good: list = []  # names whose image was read, in order: predict_batch's results follow them
    failed: list = []  # (name, message) of images that could not be read

    def images():
        for name in queries:
            try:
                loaded[name] = load_image_rgb(root / name)
            except (ImageReadError, OSError) as e:
                failed.append((name, str(e)))
                continue
            good.append(name)
            yield loaded[name]

    def texts():  # predict_batch pulls an image, then its texts: good[k] is known when text k is asked for
        for k in range(len(queries)):
            yield queries[good[k]]

    with outs:  # every file renamed into place at the end, or none
        with outs.open_text(out_dir / "results.jsonl") as log:
            results = predictor.predict_batch(images(), texts())
            pairs = ((good[k], result) for k, result in enumerate(results))  # good[k] is set once result k exists
            _write_results(pairs, queries, loaded, out_dir, outs, log, len(queries))
            for name, message in failed:
                log.write(json.dumps({"image": name, "error": message}) + "\n")
    print(f"wrote {sum(len(queries[n]) for n in good)} masks for {len(good)} images to {out_dir}")
    if failed:
        print(f"refseg predict: {len(failed)} image(s) could not be read and were skipped (listed in "
              f"results.jsonl), e.g. {failed[0][1]}", file=sys.stderr)
        return 1
    return 0


def _write_results(pairs, queries, loaded, out_dir: Path, outs: OutputSet, log, total: int) -> None:
    """Per image: one mask PNG per expression, the overlay, and one results.jsonl line per expression."""
    from pycocotools import mask as mask_utils
    from tqdm import tqdm

    from refseg.vis import overlay

    for name, result in tqdm(pairs, total=total, desc="predict", unit="img"):
        stem = _stem(name)
        texts = queries[name]
        for k, text in enumerate(texts):
            outs.save_image(out_dir / f"{stem}_{k}.png", _mask_image(result.masks[k]))
            rle = mask_utils.encode(np.asfortranarray(result.masks[k].astype(np.uint8)))
            log.write(json.dumps({
                "image": name, "k": k, "text": text, "score": round(float(result.scores[k]), 4),
                "no_target": bool(result.no_target[k]),
                "rle": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }) + "\n")
        outs.save_image(out_dir / f"{stem}_overlay.png", overlay(loaded.pop(name), list(result.masks), texts))


def main(args: argparse.Namespace) -> int:
    if bool(args.image) == bool(args.images):
        return _fail("give exactly one of --image (one image) or --images (a batch job)")
    try:  # outputs and expressions are checked before the model loads
        plan = (_plan_single(args),) if args.image else _plan_batch(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return _fail(str(e))
    options = None
    if args.options:
        try:
            options = json.loads(args.options)
        except json.JSONDecodeError as e:
            return _fail(f"--options is not JSON ({e}): {args.options!r}")
        if not isinstance(options, dict):
            return _fail(f"--options must be a JSON object of config fields, got {args.options!r}")
    from refseg.backends import load_predictor

    def note(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        predictor = load_predictor(args.model, backend=args.backend, mask_threshold=args.threshold,
                                   device=resolve_device(args.device), options=options, threads=args.threads,
                                   report=note, on_build=note)
        return _single(args, predictor, *plan) if args.image else _batch(args, predictor, *plan)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return _fail(str(e))
