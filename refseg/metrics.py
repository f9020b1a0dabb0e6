"""Referring-segmentation metrics, accumulated as running sums.

Definitions (README.md, "Metrics"); IoU(pred, gt) = |pred & gt| / |pred | gt|,
and the IoU of two empty masks is 1.

- oIoU: total intersection / total union over the target samples.
- mIoU: mean per-sample IoU over all samples. A no-target sample has an
  empty ground truth, so it scores 1 when predicted empty and 0 otherwise:
  mIoU over a split with no-target expressions is gRefCOCO's gIoU.
- P@t (t = 0.5 ... 0.9): share of all samples with IoU >= t, the comparison
  the field's reference code (LAVT, CRIS) uses. It is evaluated exactly in
  integers (10 * I >= 10t * U), so an IoU of exactly t counts.
- PointM: share of target samples whose point (the response-map argmax)
  lies inside the ground-truth mask, over the target samples given a point;
  NaN when no sample gave one. Points are [x, y] pixel-index coordinates;
  non-integer ones are rounded to the nearest pixel; outside the image is a miss.
- N-acc: share of no-target samples predicted empty; T-acc: share of target
  samples predicted non-empty. Both appear only when the accumulator has
  seen a no-target sample.
No-target samples are left out of oIoU and PointM. compute() returns
fractions in [0, 1]; format_table prints percentages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

THRESHOLDS_TENTHS = (5, 6, 7, 8, 9)  # P@0.5 ... P@0.9


def _as_bool_array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    return a if a.dtype == np.bool_ else a != 0


@dataclass
class RISMetrics:
    """Streaming accumulator of RIS metrics; every field is a running sum (O(1) memory).

    Usage: `m.update(pred, gt, point=(x, y), no_target=False)` per sample,
    `m.merge(other)` to combine shards, `m.compute()` for the numbers.
    """

    n_target: int = 0  # samples with a referent
    n_no_target: int = 0  # samples whose expression names nothing
    total_inter: int = 0  # sum of |pred & gt| over target samples, pixels
    total_union: int = 0  # sum of |pred | gt| over target samples, pixels
    sum_iou: float = 0.0  # sum of per-sample IoU over all samples
    hits: list = field(default_factory=lambda: [0] * len(THRESHOLDS_TENTHS))  # samples with IoU >= t
    point_given: int = 0  # target samples that came with a point
    point_hits: int = 0  # of those, points inside the gt mask
    target_nonempty: int = 0  # target samples predicted non-empty
    no_target_empty: int = 0  # no-target samples predicted empty

    def update(self, pred, gt, point=None, no_target: bool = False) -> float:
        """Add one sample and return its IoU.

        Args:
            pred, gt: (H, W) masks, bool or {0,1} (numpy arrays or torch tensors), same shape.
            point: optional (x, y) pixel coordinates of the response-map argmax.
            no_target: the expression names nothing (gt must then be empty).
        """
        p, g = _as_bool_array(pred), _as_bool_array(gt)
        if p.shape != g.shape or p.ndim != 2:
            raise ValueError(f"pred and gt must be (H, W) masks of one shape, got {p.shape} and {g.shape}")
        inter = int(np.count_nonzero(p & g))
        union = int(np.count_nonzero(p | g))
        iou = 1.0 if union == 0 else inter / union
        self.sum_iou += iou
        for k, tenths in enumerate(THRESHOLDS_TENTHS):
            self.hits[k] += int(union == 0 or 10 * inter >= tenths * union)
        pred_empty = not p.any()
        if no_target:
            if g.any():
                raise ValueError("a no-target sample must have an empty ground-truth mask")
            self.n_no_target += 1
            self.no_target_empty += int(pred_empty)
            return iou
        self.n_target += 1
        self.total_inter += inter
        self.total_union += union
        self.target_nonempty += int(not pred_empty)
        if point is not None:
            x, y = (int(math.floor(float(v) + 0.5)) for v in point)
            h, w = g.shape
            self.point_given += 1
            self.point_hits += int(0 <= x < w and 0 <= y < h and bool(g[y, x]))
        return iou

    def merge(self, other: "RISMetrics") -> "RISMetrics":
        """Add another accumulator's sums into this one (in place) and return self."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b)
        return self

    def state_dict(self) -> dict:
        """The sums as a flat dict of numbers (hits expanded to hits_5 ... hits_9), stable key order.

        For DDP: `torch.tensor(list(state.values()), dtype=torch.float64)`,
        all_reduce(SUM), then `RISMetrics.from_state(dict(zip(state, t.tolist())))`.
        """
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                out.update({f"hits_{t}": v for t, v in zip(THRESHOLDS_TENTHS, value)})
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_state(cls, state: dict) -> "RISMetrics":
        """Inverse of state_dict; float counts (after an all-reduce) are rounded back to ints."""
        m = cls()
        for f in fields(m):
            if f.name == "hits":
                m.hits = [int(round(state[f"hits_{t}"])) for t in THRESHOLDS_TENTHS]
            elif f.name == "sum_iou":
                m.sum_iou = float(state["sum_iou"])
            else:
                setattr(m, f.name, int(round(state[f.name])))
        return m

    def compute(self) -> dict:
        """{"oIoU", "mIoU", "P@0.5", ..., "P@0.9", "PointM", "n"} (+ "N-acc", "T-acc").

        Metrics are fractions in [0, 1], NaN when undefined (no samples of that kind); n counts all samples.
        """
        n = self.n_target + self.n_no_target
        nan = float("nan")
        out = {
            "oIoU": (self.total_inter / self.total_union if self.total_union else 1.0) if self.n_target else nan,
            "mIoU": self.sum_iou / n if n else nan,
        }
        for t, h in zip(THRESHOLDS_TENTHS, self.hits):
            out[f"P@0.{t}"] = h / n if n else nan
        out["PointM"] = self.point_hits / self.point_given if self.point_given else nan
        out["n"] = n
        if self.n_no_target:
            out["N-acc"] = self.no_target_empty / self.n_no_target
            out["T-acc"] = self.target_nonempty / self.n_target if self.n_target else nan
        return out


COLUMNS = ("oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "PointM", "N-acc", "T-acc")


def format_table(results: dict) -> str:
    """One aligned text table: rows are the keys of `results` (model or split names),
    values are `compute()` dicts. Metrics print as percentages with two decimals,
    "-" where undefined; N-acc / T-acc columns appear only if some row has them.

    A single `compute()` dict is accepted too (one row, "all"), and a row's
    nested {"by_form": {form: compute() dict}} adds one row per form, "name/form".
    """
    if any(not isinstance(v, dict) for k, v in results.items() if k != "by_form"):
        results = {"all": results}
    rows_in = {}
    for name, r in results.items():
        rows_in[name] = r
        rows_in.update({f"{name}/{form}": fr for form, fr in r.get("by_form", {}).items()})
    results = rows_in
    cols = [c for c in COLUMNS if c not in ("N-acc", "T-acc") or any(c in r for r in results.values())]
    header = ["", *cols, "n"]
    rows = []
    for name, r in results.items():
        cells = [str(name)]
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.2f}")
        cells.append(str(r.get("n", "-")))
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
    return "\n".join(lines)
