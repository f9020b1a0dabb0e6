"""The report folder of `refseg bench`, and the Markdown metric table `refseg eval --markdown` shares.

    OUT/report.md              the table (one row per model evaluated), not-available rows, targets,
                               the annotation cost assumptions with sources, the commands
    OUT/results.json           every figure (metrics overall and per form, per-row timings, label counts)
    OUT/accuracy_vs_cost.png   mIoU and oIoU against annotation hours, one panel per domain
    OUT/overlays/<row>.png     correct (IoU >= 0.5) and failed test cases of each trained row

Every file is written to a temporary name in OUT and renamed into place;
report.md comes last, so a report.md means a complete report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

METRICS = ("oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "PointM")


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.2f}"


def format_duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_cost(annotation) -> str:
    if not annotation:
        return "-"
    if not annotation["seconds"]:
        return "0"
    return f"{annotation['hours']:.1f} h ({annotation['seconds_per_ref']:.0f} s/ref)"


Column = Tuple[str, Callable[[Dict[str, Any]], str]]
METRIC_COLUMNS: List[Column] = [(m, (lambda r, m=m: _pct(r["metrics"].get(m)))) for m in METRICS] + [
    ("n", lambda r: str(r["metrics"].get("n", "-")))]
BENCH_COLUMNS: List[Column] = (
    [("row", lambda r: r["name"]), ("method", lambda r: r["method"]), ("domain", lambda r: r["domain"]),
     ("training labels", lambda r: r["budget"])]
    + METRIC_COLUMNS
    + [("test loss", lambda r: "-" if r.get("heldout_loss") is None else f"{r['heldout_loss']:.4f}"),
       ("training time", lambda r: format_duration(r.get("train_seconds"))),
       ("annotation cost", lambda r: format_cost(r.get("annotation")))])


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Column] = BENCH_COLUMNS) -> str:
    """A GitHub Markdown table, one line per row; metrics as percentages with two decimals."""
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "|".join("---" if i < 1 else "--:" for i, _ in enumerate(columns)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(get(r).replace("|", "\\|") for _, get in columns) + " |")
    return "\n".join(lines)


def judge_targets(entries, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each target of the rows run: {"row", "metric", "target", "value", "passed", "rule"}.

    An absolute target reads `metric >= threshold`; a relative one
    `metric >= threshold x the same metric of another row` (LRB-WREL against
    its upper bound). A target whose rows did not run is listed with passed None.
    """
    by_name = {r["name"]: r for r in rows if r.get("trained", True)}
    out = []
    for e in entries:
        for metric, threshold, relative in e.targets:
            value = by_name.get(e.name, {}).get("metrics", {}).get(metric)
            base = by_name.get(relative, {}).get("metrics", {}).get(metric) if relative else 1.0
            target = None if base is None else threshold * base
            rule = f"{metric} >= {threshold:g}" + (f" x {relative} {metric}" if relative else "")
            passed = None if value is None or target is None else bool(value >= target)
            out.append({"row": e.name, "metric": metric, "target": target, "value": value, "passed": passed,
                        "rule": rule})
    return out


# ---- files ------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temp file beside `path`, renamed into place (refseg.outputs.write_file)."""
    from refseg.outputs import write_file

    write_file(path, write)


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def jsonable(obj):
    """NaN / inf -> None, tuples -> lists, recursively (results.json stays strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def plot_accuracy_vs_cost(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    """mIoU (filled) and oIoU (hollow) in % against annotation hours (log axis), one panel per domain.

    Untrained rows cost nothing and appear as dashed horizontal lines at their mIoU.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({r["domain"] for r in rows}) or ["-"]
    fig, axes = plt.subplots(1, len(domains), figsize=(6.4 * len(domains), 4.8), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        trained = [r for r in rows if r["domain"] == domain and r["trained"] and r["annotation"]["hours"] > 0]
        for i, r in enumerate(trained):
            color = f"C{i % 10}"
            x = r["annotation"]["hours"]
            ax.scatter([x], [100 * (r["metrics"]["mIoU"] or 0)], color=color, label=r["name"], zorder=3)
            ax.scatter([x], [100 * (r["metrics"]["oIoU"] or 0)], facecolors="none", edgecolors=color, zorder=3)
            ax.annotate(r["name"], (x, 100 * (r["metrics"]["mIoU"] or 0)), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        for r in rows:
            if r["domain"] == domain and not r["trained"]:
                ax.axhline(100 * (r["metrics"]["mIoU"] or 0), color="grey", linestyle="--", linewidth=0.8)
        if trained:
            ax.set_xscale("log")
        ax.set_xlabel("annotation cost of the training labels (hours, log scale)")
        ax.set_ylabel("test accuracy (%): mIoU filled, oIoU hollow")
        ax.set_title(f"SynthRef {domain}")
        ax.set_ylim(0, 100)
        ax.grid(True, which="both", alpha=0.3)
        if trained:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def overlay_grid(groups: Dict[str, List[Tuple[str, float]]], title: str, tile: int = 240):
    """One row of tiles per group ("correct", "failed") under a title, labels on the left; a PIL image.

    groups: {label: [(overlay PNG path, IoU), ...]}; each tile is the overlay
    scaled to `tile` pixels wide; an empty group shows "none".
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    loaded = {}
    for label, items in groups.items():
        tiles = []
        for path, _ in items:
            with Image.open(path) as im:
                tiles.append(im.convert("RGB").resize((tile, round(tile * im.height / im.width))))
        loaded[label] = tiles
    label_w, head_h, pad = 110, 22, 4
    cols = max([len(t) for t in loaded.values()] + [1])
    heights = [max([t.height for t in tiles] + [tile // 3]) for tiles in loaded.values()]
    canvas = Image.new("RGB", (label_w + cols * (tile + pad), head_h + sum(h + pad for h in heights)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    y = head_h
    for (label, tiles), h in zip(loaded.items(), heights):
        draw.text((4, y + 4), f"{label}\n({len(tiles)} shown)", fill=(0, 0, 0), font=font)
        if not tiles:
            draw.text((label_w, y + 4), "none", fill=(120, 120, 120), font=font)
        for j, t in enumerate(tiles):
            canvas.paste(t, (label_w + j * (tile + pad), y))
        y += h + pad
    return canvas


def write_report(out: Path, result: Dict[str, Any]) -> None:
    """Write results.json, the plot, the overlay grids, then report.md (see the module docstring)."""
    from refseg.annotation import COSTS
    from refseg.vis import save_image_atomic

    out = Path(out)
    rows = result["rows"]
    for r in rows:
        examples = r.pop("examples", None)
        if examples is not None:
            rel = f"overlays/{r['name']}.png"
            grid = overlay_grid({"correct (IoU >= 0.5)": examples["correct"], "failed (IoU < 0.5)": examples["failed"]},
                                f"{r['name']}: {r['method']}, {r['budget']} (prediction red, ground truth blue)")
            save_image_atomic(grid, out / rel)
            r["overlays"] = rel
    plot_accuracy_vs_cost(rows, out / "accuracy_vs_cost.png")
    costs = {k: {"seconds": c.seconds, "unit": c.unit, "source": c.source, "note": c.note} for k, c in COSTS.items()}
    payload = {**result, "costs": costs,
               "files": {"table": "report.md", "plot": "accuracy_vs_cost.png",
                         "overlays": {r["name"]: r["overlays"] for r in rows if "overlays" in r}}}
    write_text_atomic(out / "results.json", json.dumps(jsonable(payload), indent=2, sort_keys=True) + "\n")
    write_text_atomic(out / "report.md", render_markdown(payload))


def render_markdown(p: Dict[str, Any]) -> str:
    lines = [f"# refseg bench: preset `{p['preset']}`", "",
             f"Command: `{p['command']}`  ",
             f"Device: {p['device']}, {p['threads']} torch threads; whole bench {format_duration(p['seconds'])}.", "",
             "## Test-split results", "",
             "Metrics in % (definitions: refseg README, \"Metrics\"). Test loss: the row's own training objective over the "
             "test split (same batches for every instance of a method). Training time: measured by this bench, "
             "or the logged span in a shipped model's card. Annotation cost: the training split's labels under "
             "the costs below.", "",
             markdown_table(p["rows"]), ""]
    notes = [f"- `{r['name']}`: note: {r['note']}" for r in p["rows"] if r.get("note")]
    notes += [f"- `{s['name']}`: {s['status']}: {s['reason']}" for s in p["skipped"]]
    lines += notes + ([""] if notes else [])
    if p["targets"]:
        lines += ["## Targets", "", "| row | rule | target | value | result |", "|---|---|--:|--:|---|"]
        for t in p["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "not run"}[t["passed"]]
            lines.append(f"| {t['row']} | {t['rule']} | {_pct(t['target'])} | {_pct(t['value'])} | {verdict} |")
        lines.append("")
    lines += ["## Annotation cost assumptions", "",
              "Seconds of annotator time per label. They are assumptions taken from the studies cited, "
              "not measurements on SynthRef. Full masks pay one mask per training referent, clicks a point "
              "and a box, every supervision one expression per sentence, except weakened referents, which "
              "pay one class name (refseg/annotation.py).", "",
              "| label | seconds | source | how the figure is read |", "|---|--:|---|---|"]
    for c in p["costs"].values():
        lines.append(f"| {c['unit']} | {c['seconds']:g} | {c['source']} | {c['note']} |")
    lines += ["", "## Accuracy against annotation cost", "",
              "![accuracy against annotation cost](accuracy_vs_cost.png)", "", "## Examples (test split)", ""]
    for name, rel in p["files"]["overlays"].items():
        lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    lines += ["## Data and commands", ""]
    for d, meta in p["data"].items():
        lines.append(f"- {d}: `{meta['path']}` " + ", ".join(f"{k} {v}" for k, v in meta.items() if k != "path"))
    for r in p["rows"]:
        if r.get("train_command"):
            lines.append(f"- `{r['name']}` ({r['source']}): `{r['train_command']}`")
    return "\n".join(lines) + "\n"
