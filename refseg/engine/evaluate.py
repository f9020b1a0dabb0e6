"""`refseg eval`: the full metric table of a model on a refer-format split.

    refseg eval --checkpoint lts-synthref --data DIR --split test --out results.json --save-vis 16

Any data set in the refer format loads (RefCOCO/+/g, RRSIS-D, SynthRef, or
one written by another tool to the SynthRef spec). The table lists oIoU,
mIoU, P@0.5-0.9 and PointM overall and per sentence form; the JSON holds the
same figures plus what was evaluated.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a shipped model name, a run folder or a checkpoint")
    p.add_argument("--data", required=True, help="refer-format folder (refs(<split_by>).p + instances.json)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--split-by", default=None, help="refs file to read: unc, google, umd (default: the only one)")
    p.add_argument("--images", default=None, help="images folder (default: DATA/images)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N sentences")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--per-sample", action="store_true",
                   help="also put one record per sentence in the JSON (sent_id, IoU, pixel counts, point hit)")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the metric table as Markdown (the columns of `refseg bench`'s table)")
    p.add_argument("--save-vis", type=int, default=0, metavar="N", help="write overlays of the first N sentences")
    p.add_argument("--vis-dir", default=None, help="folder for --save-vis (default: next to --out, or ./eval-vis)")


def write_json_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


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

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        data = load_refer(args.data, split_by=args.split_by, images_dir=args.images)
        data.samples(args.split)  # fails early, naming the splits present
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
    if args.save_vis:
        vis_dir = Path(args.vis_dir or (Path(args.out).with_suffix("").as_posix() + "-vis" if args.out else "eval-vis"))
        evaluate_model(model, data, split=args.split, batch_size=args.batch_size, device=device,
                       max_samples=args.save_vis, progress=False, save_vis=vis_dir)
        print(f"overlays of the first {args.save_vis} sentences: {vis_dir}")
    if args.markdown:
        from refseg.bench_report import METRIC_COLUMNS, markdown_table, write_text_atomic

        rows = [{"name": name, "metrics": results}]
        rows += [{"name": f"{name} / {form}", "metrics": r} for form, r in sorted(results["by_form"].items())]
        write_text_atomic(Path(args.markdown), markdown_table(rows, [("model / split", lambda r: r["name"])]
                                                              + METRIC_COLUMNS) + "\n")
        print(f"wrote {args.markdown}")
    if args.out:
        from refseg.bench_report import jsonable

        out = {"checkpoint": str(args.checkpoint), "data": str(Path(args.data).resolve()), "split": args.split,
               "split_by": data.split_by, "seconds": round(seconds, 2), "metrics": results}
        if records is not None:
            out["samples"] = records
        write_json_atomic(jsonable(out), Path(args.out))
        print(f"wrote {args.out}")
    return 0
