"""RISMetrics on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from refseg.metrics import RISMetrics, format_table

KEYS = ["oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "PointM", "n"]


def _mask(h, w, *pixels):
    m = np.zeros((h, w), dtype=bool)
    for y, x in pixels:
        m[y, x] = True
    return m


def _four_samples():
    """IoUs 1, 0.5, 0 and 1 (both empty); intersections 4, 2, 0, 0; unions 4, 4, 3, 0."""
    square = _mask(4, 4, (0, 0), (0, 1), (1, 0), (1, 1))
    return [
        (square, square),
        (square, _mask(4, 4, (0, 0), (0, 1))),
        (np.zeros((4, 4), bool), _mask(4, 4, (3, 3), (3, 2), (2, 3))),  # empty prediction
        (np.zeros((4, 4), bool), np.zeros((4, 4), bool)),  # both empty
    ]


def test_hand_computed_target_samples():
    m = RISMetrics()
    ious = [m.update(p, g) for p, g in _four_samples()]
    assert ious == [1.0, 0.5, 0.0, 1.0]
    r = m.compute()
    assert list(r) == KEYS
    assert r["oIoU"] == pytest.approx(6 / 11)
    assert r["mIoU"] == pytest.approx(2.5 / 4)
    assert r["P@0.5"] == pytest.approx(3 / 4)  # IoU exactly 0.5 counts
    for t in ("P@0.6", "P@0.7", "P@0.8", "P@0.9"):
        assert r[t] == pytest.approx(2 / 4)
    assert math.isnan(r["PointM"]) and r["n"] == 4


def test_threshold_boundary_is_inclusive_and_exact():
    m = RISMetrics()
    pred = np.zeros((1, 10), bool)
    pred[0, :7] = True
    gt = np.ones((1, 10), bool)
    assert m.update(pred, gt) == pytest.approx(0.7)
    r = m.compute()
    assert (r["P@0.5"], r["P@0.6"], r["P@0.7"], r["P@0.8"], r["P@0.9"]) == (1.0, 1.0, 1.0, 0.0, 0.0)
    m = RISMetrics()
    pred[0, 6] = False  # IoU 0.6 just under 0.7
    m.update(pred, gt)
    assert m.compute()["P@0.7"] == 0.0 and m.compute()["P@0.6"] == 1.0


def test_no_target_samples():
    m = RISMetrics()
    square = _mask(4, 4, (0, 0), (0, 1), (1, 0), (1, 1))
    empty = np.zeros((4, 4), bool)
    m.update(square, square, point=(0, 0))  # target, hit, IoU 1
    m.update(empty, square, point=(3, 3))  # target predicted empty, point misses, IoU 0
    assert m.update(empty, empty, point=(0, 0), no_target=True) == 1.0  # correct rejection
    assert m.update(square, empty, point=(0, 0), no_target=True) == 0.0  # false positive
    r = m.compute()
    assert r["n"] == 4
    assert r["oIoU"] == pytest.approx(4 / 8)  # target samples only: I 4 + 0, U 4 + 4
    assert r["mIoU"] == pytest.approx(2 / 4)  # all samples: 1, 0, 1, 0
    assert r["P@0.9"] == pytest.approx(2 / 4)
    assert r["PointM"] == pytest.approx(1 / 2)  # no-target points are ignored
    assert r["N-acc"] == pytest.approx(1 / 2)
    assert r["T-acc"] == pytest.approx(1 / 2)
    assert list(r)[-2:] == ["N-acc", "T-acc"]
    with pytest.raises(ValueError, match="empty ground-truth"):
        m.update(empty, square, no_target=True)


def test_pointm_rounding_missing_points_and_bounds():
    m = RISMetrics()
    gt = _mask(3, 3, (1, 2))  # row 1, column 2
    m.update(gt, gt, point=(2, 1))  # inside
    m.update(gt, gt, point=(2.4, 0.6))  # rounds to (2, 1): inside
    m.update(gt, gt, point=(1, 2))  # x/y swapped: outside
    m.update(gt, gt, point=(5, 1))  # outside the image: a miss
    m.update(gt, gt)  # no point given: not counted
    assert m.compute()["PointM"] == pytest.approx(2 / 4)


def test_torch_and_integer_inputs():
    a = RISMetrics()
    b = RISMetrics()
    for p, g in _four_samples():
        a.update(p, g)
        b.update(torch.from_numpy(p.astype(np.uint8)), torch.from_numpy(g))
    assert a.compute() == pytest.approx(b.compute(), nan_ok=True)
    with pytest.raises(ValueError, match="one shape"):
        a.update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_merge_and_state_round_trip():
    samples = _four_samples()
    whole, left, right = RISMetrics(), RISMetrics(), RISMetrics()
    for i, (p, g) in enumerate(samples):
        whole.update(p, g, point=(0, 0))
        (left if i % 2 else right).update(p, g, point=(0, 0))
    right.update(np.zeros((4, 4)), np.zeros((4, 4)), no_target=True)
    whole.update(np.zeros((4, 4)), np.zeros((4, 4)), no_target=True)
    merged = left.merge(right)
    assert merged.compute() == pytest.approx(whole.compute())
    state = whole.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())
    assert RISMetrics.from_state(state) == whole
    as_floats = {k: float(v) for k, v in state.items()}  # what an all-reduce in float64 hands back
    assert RISMetrics.from_state(as_floats) == whole


def test_empty_accumulator_is_nan():
    r = RISMetrics().compute()
    assert r["n"] == 0 and math.isnan(r["oIoU"]) and math.isnan(r["mIoU"]) and "N-acc" not in r


def test_format_table_aligned():
    a = RISMetrics()
    for p, g in _four_samples():
        a.update(p, g)
    b = RISMetrics()
    b.update(np.zeros((2, 2)), np.zeros((2, 2)), no_target=True)
    table = format_table({"lts/val": a.compute(), "sag/val-with-no-target": b.compute()})
    lines = table.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    header = lines[0].split()
    assert header == ["oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "PointM", "N-acc", "T-acc", "n"]
    row = lines[1].split()
    assert row[:3] == ["lts/val", "54.55", "62.50"] and row[8] == "-" and row[-1] == "4"
    assert lines[2].split()[1] == "-"  # oIoU undefined without target samples
    assert "N-acc" not in format_table({"x": a.compute()})


def test_format_table_single_result_and_by_form():
    m = RISMetrics()
    for p, g in _four_samples():
        m.update(p, g)
    result = {**m.compute(), "by_form": {"location": m.compute()}}
    lines = format_table(result).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["all", "all/location"]
    assert lines[1].split()[1:] == lines[2].split()[1:]
