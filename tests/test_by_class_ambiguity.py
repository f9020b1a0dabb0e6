"""benchmarks/by_class_ambiguity.py: per-bucket figures from hand-made per-sentence records."""

import importlib.util
import json
from pathlib import Path

import pytest
from fixtures import edit, make_refcoco

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("by_class_ambiguity", ROOT / "benchmarks" / "by_class_ambiguity.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)


def rec(ref_id, iou, pred, gt, hit):
    return {"sent_id": ref_id * 10, "ref_id": ref_id, "image_id": 0, "iou": iou, "pred_pixels": pred,
            "gt_pixels": gt, "point_in_mask": hit}


def test_summarise_buckets_by_hand():
    alike = {1: 1, 2: 2, 3: 5}
    records = [rec(1, 0.5, 30, 30, True),   # I 20, U 40
               rec(1, 1.0, 10, 10, True),   # I 10, U 10
               rec(2, 0.0, 5, 15, False),   # I 0, U 20
               rec(3, 0.25, 10, 40, True),  # I 10, U 40
               rec(9, 1.0, 0, 0, None)]     # no target: left out, whatever its ref
    out = mod.summarise(records, alike)
    assert out["1"]["n"] == 2 and out["1"]["oIoU"] == pytest.approx(100 * 30 / 50)
    assert out["1"]["mIoU"] == pytest.approx(75.0) and out["1"]["PointM"] == 100.0
    assert out["2"] == {"n": 1, "oIoU": 0.0, "mIoU": 0.0, "PointM": 0.0}
    assert out[">=3"]["oIoU"] == pytest.approx(25.0)
    assert out["all"]["n"] == 4 and out["all"]["oIoU"] == pytest.approx(100 * 40 / 110)
    assert out["all"]["PointM"] == pytest.approx(75.0)
    with pytest.raises(SystemExit, match="ref 4"):
        mod.summarise([rec(4, 0.5, 1, 1, True)], alike)


def test_cli_on_fixture(tmp_path, capsys, monkeypatch):
    fx = make_refcoco(tmp_path / "d")

    def crowd(inst):  # a second person on image 1: ref 10 (train) gets a look-alike
        inst["annotations"].append({"id": 107, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4.0,
                                    "bbox": [0, 0, 2, 2], "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]})
    edit(fx.root, instances=crowd)
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps({"samples": [rec(10, 0.5, 30, 30, True), rec(11, 1.0, 10, 10, True)]}))
    monkeypatch.setattr("sys.argv", ["x", str(ev), "--data", str(fx.root), "--split", "train",
                                     "--json", str(tmp_path / "o.json")])
    assert mod.main() == 0
    out = json.loads((tmp_path / "o.json").read_text())["results"][str(ev)]
    assert out["1"]["n"] == 1 and out["1"]["mIoU"] == 100.0  # ref 11, the only dog
    assert out["2"]["n"] == 1 and out["2"]["mIoU"] == 50.0  # ref 10, one of two people
    assert "1: 1, 2: 1" in capsys.readouterr().out
    ev.write_text(json.dumps({"metrics": {}}))
    assert mod.main() == 1
    assert "--per-sample" in capsys.readouterr().err
