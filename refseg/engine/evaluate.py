"""`refseg eval`: the full metric table of a model on a refer-format split.

    refseg eval --checkpoint lts-synthref --data DIR --split test --out results.json --save-vis 16

Any data set in the refer format loads (RefCOCO/+/g, RRSIS-D, SynthRef, or
one written by another tool to the SynthRef spec). The table lists oIoU,
mIoU, P@0.5-0.9 and PointM overall and per sentence form; the JSON holds the
same figures plus what was evaluated.

Arguments are checked when parsed and outputs before the model loads: an
output (--out, --markdown, the --save-vis overlays) that is an input (the
refs file, instances.json, the checkpoint), replaces an image of the data
set, or collides with another output is refused. All outputs are renamed
into place together at the end, or none (refseg/outputs.py).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from refseg.argtypes import device, nonneg_int, positive_int, resolve_device, threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a shipped model name, a run folder or a checkpoint")
    p.add_argument("--data", required=True, help="refer-format folder (refs(<split_by>).p + instances.json)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--split-by", default=None, help="refs file to read: unc, google, umd (default: the only one)")
    p.add_argument("--images", default=None, help="images folder (default: DATA/images)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="sentences per forward pass")
    p.add_argument("--max-samples", type=positive_int, default=None, help="evaluate only the first N sentences")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=threads, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--per-sample", action="store_true",
                   help="also put one record per sentence in the JSON (sent_id, IoU, pixel counts, point hit)")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the metric table as Markdown (the columns of `refseg bench`'s table)")
    p.add_argument("--save-vis", type=nonneg_int, default=0, metavar="N", help="write overlays of the first N sentences")
    p.add_argument("--vis-dir", default=None, help="folder for --save-vis (default: next to --out, or ./eval-vis)")


def write_json_atomic(obj, path: Path) -> None:
    """Write `obj` as indented JSON, atomically (refseg.outputs.write_text)."""
    from refseg.outputs import write_text

    write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def data_inputs(data) -> tuple:
    """(files, folders) a loaded data set was read from, for OutputSet: an output must not replace them."""
    files = [("--data", data.refs_file)] + [("--data", data.ann_dir / name)
                                           for name in ("instances.json", "synthref.json", "weak.json")]
    return files, [("--images", data.images_dir)]


def table_rows(results: dict, name: str) -> dict:
    """Rows for format_table: the whole split, then each sentence form."""
    rows = {name: {k: v for k, v in results.items() if k != "by_form"}}
    for form, figures in sorted(results.get("by_form", {}).items()):
        rows[f"  {form}"] = figures
    return rows


def main(args: argparse.Namespace) -> int:
    import torch

    import refseg
    from refseg.data import load_refer
    from refseg.engine.evaluate_core import evaluate_model
    from refseg.metrics import format_table

    from refseg.outputs import OutputSet, model_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    vis_dir = Path(args.vis_dir or (Path(args.out).with_suffix("").as_posix() + "-vis" if args.out else "eval-vis"))
    try:
        data = load_refer(args.data, split_by=args.split_by, images_dir=args.images)
        samples = data.samples(args.split)  # fails early, naming the splits present
        files, folders = data_inputs(data)
        model_files, model_folders = model_inputs("--checkpoint", args.checkpoint)
        outs = OutputSet(files + model_files, folders + model_folders)  # every output checked before the model loads
        if args.out:
            outs.plan(args.out, "--out")
        if args.markdown:
            outs.plan(args.markdown, "--markdown")
        for s in samples[:args.save_vis]:
            outs.plan(vis_dir / f"{s.sent_id}.png", "--save-vis", image="rgb")
        model = refseg.load(args.checkpoint, device=device)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"refseg eval: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    records = [] if args.per_sample else None
    results = evaluate_model(model, data, split=args.split, batch_size=args.batch_size, device=device,
                             max_samples=args.max_samples, progress=True, per_sample=records)
    seconds = time.perf_counter() - start
    name = f"{Path(str(args.checkpoint)).name} / {args.split}"
    print(format_table(table_rows(results, name)))
    print(f"{results['n']} sentences in {seconds:.1f} s")
    with outs:  # every output renamed into place at the end, or none
        if args.save_vis:
            evaluate_model(model, data, split=args.split, batch_size=args.batch_size, device=device,
                           max_samples=args.save_vis, progress=False, save_vis=vis_dir, outputs=outs)
        if args.markdown:
            from refseg.bench.report import METRIC_COLUMNS, markdown_table

            rows = [{"name": name, "metrics": results}]
            rows += [{"name": f"{name} / {form}", "metrics": r} for form, r in sorted(results["by_form"].items())]
            outs.write_text(args.markdown, markdown_table(rows, [("model / split", lambda r: r["name"])]
                                                          + METRIC_COLUMNS) + "\n")
        if args.out:
            from refseg.bench.report import jsonable

            out = {"checkpoint": str(args.checkpoint), "data": str(Path(args.data).resolve()), "split": args.split,
                   "split_by": data.split_by, "seconds": round(seconds, 2), "metrics": results}
            if records is not None:
                out["samples"] = records
            outs.write_text(args.out, json.dumps(jsonable(out), indent=2, sort_keys=True))
    if args.save_vis:
        print(f"overlays of the first {args.save_vis} sentences: {vis_dir}")
    for path in (args.markdown, args.out):
        if path:
            print(f"wrote {path}")
    return 0
