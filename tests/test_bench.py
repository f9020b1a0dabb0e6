"""`refseg bench`: the method registry, the annotation cost model, and the whole tiny pipeline.

The end-to-end test runs `refseg bench --preset tiny` once (SynthRef tiny,
natural and aerial; every available row trained for 40 steps with a small
head at 160 px) and checks the report folder. Its accuracy check is only
"trained beats untrained", on the figure that 40 steps really move:
- the row's own training objective on the test split ("test loss"), for
  every row: an untrained head starts above it (LTS 1.48 -> 1.08, PKS
  6.0 -> 2.0, PKS clicks 10.5 -> 2.7, SaG 3.86 -> 3.76, aerial LTS, naive and
  LRB-WREL 1.38 -> 1.04 in a run of these settings);
- mIoU for the natural rows that learn from masks or clicks: an untrained
  LTS / PKS predicts empty masks (mIoU 0; its mask bias starts at p = 0.02),
  trained ones reached 0.055 (LTS), 0.11 (PKS), 0.094 (PKS clicks) with 2
  threads. Not for SaG (text only: 40 steps do not localise) nor aerial rows
  (small objects: their masks stay empty after 40 steps).
"""

import json
import pickle
from types import SimpleNamespace

import pytest
from PIL import Image

from refseg import bench
from refseg.annotation import COSTS, annotation_cost
from refseg.bench.report import judge_targets
from refseg.cli import main as cli

# ---- pieces ------------------------------------------------------------------------------


def _ref(split, n_sent, weak=False, no_target=False):
    return {"split": split, "sentences": [{}] * n_sent, "weak": weak, "no_target": no_target}


def test_annotation_cost_hand_computed():
    """Train refs: A (2 sentences), B (weak, 1), C (no-target, 1); a val ref that must not count."""
    data = SimpleNamespace(refs_by_id={1: _ref("train", 2), 2: _ref("train", 1, weak=True),
                                       3: _ref("train", 1, no_target=True), 4: _ref("val", 3)})
    # full: masks of A, B (C has no object) = 2 x 79.2; expressions A 2 + C 1 = 3 x 10; B one class name = 1
    assert annotation_cost(data, "train", "full")["seconds"] == pytest.approx(2 * 79.2 + 30 + 1)
    # click: a point (2.4) and a box (7.0) for A and B, the same text
    assert annotation_cost(data, "train", "click")["seconds"] == pytest.approx(2 * 9.4 + 30 + 1)
    text = annotation_cost(data, "train", "text")
    assert text["seconds"] == pytest.approx(31.0)
    assert text["refs"] == 3 and text["seconds_per_ref"] == pytest.approx(31.0 / 3)
    assert text["labels"] == {"mask": 0, "point": 0, "box": 0, "class": 1, "expression": 3}
    with pytest.raises(ValueError, match="supervision"):
        annotation_cost(data, "train", "boxes")
    assert all(c.source and c.note for c in COSTS.values())


def test_missing_train_support_is_detected_not_run(tmp_path):
    lts = next(e for e in bench.ENTRIES if e.name == "lts")
    argv = bench.train_argv(lts, bench.PRESETS["tiny"], 0, tmp_path / "run", tmp_path / "data", tmp_path / "d")
    assert bench.missing_train_support(lts, argv) is None
    recipe = tmp_path / "x.yaml"
    recipe.write_text("synthref: {domain: natural, preset: tiny, seed: 0}\nmodel: {name: lts, method: magic}\n")
    fake = bench.Entry("x", "X-Net", "natural", "masks", "x", str(recipe))
    reason = bench.missing_train_support(fake, bench.train_argv(fake, bench.PRESETS["tiny"], 0, tmp_path / "run",
                                                                tmp_path / "data"))
    assert "X-Net" in reason and "model.method (--method) must be one of" in reason and "'magic'" in reason
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # resolved, never run
    gone = bench.Entry("y", "Y-Net", "natural", "masks", "y", "configs/no-such-recipe.yaml")
    assert "Y-Net" in bench.missing_train_support(gone, []) and "configs/no-such-recipe.yaml" in \
        bench.missing_train_support(gone, [])


def test_targets_absolute_and_relative():
    entries = [bench.Entry("a", "A", "aerial", "-", "a", "a.yaml", targets=(("mIoU", 0.5, ""),)),
               bench.Entry("w", "W", "aerial", "-", "w", "w.yaml", targets=(("oIoU", 0.9, "a"),)),
               bench.Entry("z", "Z", "aerial", "-", "z", "z.yaml", targets=(("oIoU", 0.9, "a"),))]
    rows = [{"name": "a", "metrics": {"mIoU": 0.49, "oIoU": 0.80}}, {"name": "w", "metrics": {"oIoU": 0.73}}]
    got = {(t["row"], t["metric"]): t for t in judge_targets(entries, rows)}
    assert got[("a", "mIoU")]["passed"] is False
    assert got[("w", "oIoU")]["target"] == pytest.approx(0.72) and got[("w", "oIoU")]["passed"] is True
    assert got[("z", "oIoU")]["passed"] is None  # row z did not run


def test_unknown_method_is_a_clear_error(capsys):
    assert cli(["bench", "--preset", "tiny", "--methods", "lts,nope"]) == 2
    assert "nope" in capsys.readouterr().err


# ---- the tiny pipeline -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = root / "report"
    assert cli(["bench", "--preset", "tiny", "--out", str(out), "--work", str(root / "work"), "--threads", "2"]) == 0
    results = json.loads((out / "results.json").read_text(), parse_constant=_refuse)
    return out, results, root / "work" / "data"


def _refuse(name):
    raise AssertionError(f"results.json holds {name}: not strict JSON")


def _table(markdown: str):
    """Header and data rows of the first Markdown table of the report."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip().strip("|").split("|")])
    return block[0], block[2:]


@pytest.mark.slow
def test_every_file_is_there_and_well_formed(report):
    out, results, _ = report
    assert {"preset", "seed", "command", "rows", "skipped", "costs", "files", "data", "targets"} <= set(results)
    assert results["preset"] == "tiny" and set(results["costs"]) == set(COSTS)
    for row in results["rows"]:
        assert {"name", "method", "domain", "metrics", "heldout_loss", "train_seconds", "annotation"} <= set(row)
        assert {"oIoU", "mIoU", "P@0.5", "P@0.9", "PointM", "n"} <= set(row["metrics"])
    with Image.open(out / "accuracy_vs_cost.png") as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 300
        im.load()
    trained = [r for r in results["rows"] if r["trained"]]
    assert set(results["files"]["overlays"]) == {r["name"] for r in trained}
    for r in trained:
        with Image.open(out / r["overlays"]) as im:
            assert im.format == "PNG" and im.width > 110 + 240 and im.height > 2 * 80
            im.load()
    assert not list(out.glob(".*")), "temporary files left in the report folder"


@pytest.mark.slow
def test_table_has_one_row_per_model(report):
    out, results, _ = report
    header, rows = _table((out / "report.md").read_text())
    for col in ("oIoU", "mIoU", "P@0.5", "P@0.9", "PointM", "training time", "annotation cost"):
        assert col in header
    assert [r[0] for r in rows] == [r["name"] for r in results["rows"]]
    assert all(len(r) == len(header) for r in rows)
    text = (out / "report.md").read_text()
    for cited in ("| 79.2 | Lin et al.", "| 2.4 | Bearman et al.", "| 7 | Papadopoulos et al.", "| 1 | Bearman et al.",
                  "| 10 | derived: Kazemzadeh et al."):
        assert cited in text, cited
    miou = header.index("mIoU")
    for cells, row in zip(rows, results["rows"]):
        assert float(cells[miou]) == pytest.approx(100 * row["metrics"]["mIoU"], abs=0.006)


@pytest.mark.slow
def test_every_registered_row_ran_or_says_why(report):
    out, results, _ = report
    text = (out / "report.md").read_text()
    ran = {r["name"] for r in results["rows"] if r["trained"]}
    skipped = {s["name"]: s for s in results["skipped"]}
    for entry in bench.ENTRIES:
        assert (entry.name in ran) != (entry.name in skipped), entry.name
        if entry.name in skipped:
            s = skipped[entry.name]
            assert s["status"] == "not available", s  # a failed row would say "failed"
            assert f"- `{entry.name}`: not available: {s['reason']}" in text
        else:
            assert f"{entry.name} (untrained)" in {r["name"] for r in results["rows"]}
            command = next(r for r in results["rows"] if r["name"] == entry.name)["train_command"]
            assert command.startswith(f"refseg train --config {entry.recipe} --out "), command
            assert f"`{command}`" in text
    assert {"lts", "pks", "pks-click", "sag", "lts-aerial"} <= ran


@pytest.mark.slow
def test_trained_beats_untrained(report):
    _, results, _ = report
    rows = {r["name"]: r for r in results["rows"]}
    for name, r in rows.items():
        if not r["trained"]:
            continue
        base = rows[f"{name} (untrained)"]
        assert r["heldout_loss"] < base["heldout_loss"], (name, r["heldout_loss"], base["heldout_loss"])
        assert r["train_seconds"] > 0 and base["train_seconds"] == 0
    for name in ("lts", "pks", "pks-click"):
        assert rows[name]["metrics"]["mIoU"] > rows[f"{name} (untrained)"]["metrics"]["mIoU"] + 0.01, name


@pytest.mark.slow
def test_annotation_cost_of_the_rows(report):
    """Costs recomputed from the training refs with the stated per-label seconds."""
    _, results, data_root = report
    rows = {r["name"]: r for r in results["rows"]}
    with open(data_root / "natural-tiny-s0" / "refs(unc).p", "rb") as f:
        train = [r for r in pickle.load(f) if r["split"] == "train"]
    refs, sents = len(train), sum(len(r["sentences"]) for r in train)
    assert rows["lts"]["annotation"]["seconds"] == pytest.approx(79.2 * refs + 10 * sents)
    assert rows["pks-click"]["annotation"]["seconds"] == pytest.approx((2.4 + 7.0) * refs + 10 * sents)
    assert rows["sag"]["annotation"]["seconds"] == pytest.approx(10 * sents)
    weak_json = json.loads((data_root / "aerial-tiny-s0-p0.1-w0" / "weak.json").read_text())
    assert (weak_json["accurate_fraction"], weak_json["seed"]) == (0.1, 0)  # the recipe's, made by the bench
    with open(data_root / "aerial-tiny-s0-p0.1-w0" / "refs(unc).p", "rb") as f:
        weak = [r for r in pickle.load(f) if r["split"] == "train"]
    accurate = sum(len(r["sentences"]) for r in weak if not r.get("weak"))
    n_weak = sum(1 for r in weak if r.get("weak"))
    assert rows["lts-aerial-naive-p0.1"]["annotation"]["seconds"] == pytest.approx(
        79.2 * len(weak) + 10 * accurate + 1.0 * n_weak)
    for p in ("0.1", "0.5"):  # LRB-WREL pays for the labels its naive baseline reads
        if f"wrel-aerial-p{p}" in rows:
            assert rows[f"wrel-aerial-p{p}"]["annotation"] == rows[f"lts-aerial-naive-p{p}"]["annotation"]
