"""`refseg weaken`: the LRB-WREL weak-expression split of a refer data set."""

import json
import os
import shutil
from pathlib import Path

import pytest

from refseg.cli import main as cli_main
from refseg.data.refer import load_refer, load_refs_file
from refseg.data.synthref.generate import generate
from refseg.data.weak import accurate_count, weaken

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny aerial SynthRef data set with a few no-target refs."""
    folder = tmp_path_factory.mktemp("weak") / "aerial"
    generate(folder, "aerial", "tiny", seed=0, no_target_fraction=0.1, workers=1)
    return folder


def _refs(folder: Path, split_by: str = "unc") -> dict:
    return {r["ref_id"]: r for r in load_refs_file(folder / f"refs({split_by}).p")}


def test_rounding():
    assert [accurate_count(n, 0.1) for n in (0, 1, 3, 10, 14, 15, 16)] == [0, 1, 1, 1, 1, 2, 2]
    assert accurate_count(5, 0.5) == 3  # halves round up
    assert accurate_count(7, 0.0) == 0 and accurate_count(7, 1.0) == 7


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_fraction_per_category_and_val_test_untouched(source, tmp_path, fraction):
    meta = weaken(source, tmp_path / "out", fraction, seed=0)
    before, after = _refs(source), _refs(tmp_path / "out")
    assert before.keys() == after.keys()
    names = {c["id"]: c["name"] for c in json.loads((source / "instances.json").read_text())["categories"]}
    per_category = {}
    for ref_id, old in before.items():
        new = after[ref_id]
        if old["split"] != "train" or old["no_target"]:
            assert new == old and "weak" not in new
            continue
        kept = per_category.setdefault(old["category_id"], [0, 0])
        kept[1] += 1
        if new.get("weak"):
            assert new["sent_ids"] == old["sent_ids"] and len(new["sentences"]) == len(old["sentences"])
            for s in new["sentences"]:
                name = names[old["category_id"]]
                assert (s["raw"], s["sent"], s["tokens"], s["form"]) == (name, name, name.split(), "class")
        else:
            assert new == old
            kept[0] += 1
    for cid, (accurate, total) in per_category.items():
        assert accurate == accurate_count(total, fraction)
        assert meta["categories"][names[cid]] == {"category_id": cid, "train_refs": total, "accurate": accurate,
                                                  "weak": total - accurate}


def test_output_folder_and_loading(source, tmp_path):
    out = tmp_path / "out"
    weaken(source, out, 0.5, seed=1)
    assert sorted(os.listdir(out)) == ["images", "instances.json", "refs(unc).p", "weak.json"]
    assert (out / "images").is_symlink() and (out / "images").resolve() == (source / "images").resolve()
    assert (out / "instances.json").read_bytes() == (source / "instances.json").read_bytes()
    data = load_refer(out)
    weak_sentences = sum(len(r["sentences"]) for r in _refs(out).values() if r.get("weak"))
    assert sum(s.weak for s in data.samples("train")) == weak_sentences > 0
    assert not any(s.weak for split in ("val", "test") for s in data.samples(split))
    with pytest.raises(FileExistsError):
        weaken(source, out, 0.5, seed=1)


def test_seeded_choice(source, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        weaken(source, tmp_path / name, 0.5, seed=seed)
    refs = {name: (tmp_path / name / "refs(unc).p").read_bytes() for name in "abc"}
    assert refs["a"] == refs["b"] and refs["a"] != refs["c"]


def test_other_split_by_and_command_line(source, tmp_path, capsys):
    umd = tmp_path / "umd"
    umd.mkdir()
    shutil.copyfile(source / "refs(unc).p", umd / "refs(umd).p")
    shutil.copyfile(source / "instances.json", umd / "instances.json")
    out = tmp_path / "out"
    argv = ["weaken", "--data", str(umd), "--accurate-fraction", "0.2", "--seed", "0", "--out", str(out),
            "--split-by", "umd", "--images", str(source / "images")]
    assert cli_main(argv) == 0
    assert sorted(os.listdir(out)) == ["images", "instances.json", "refs(umd).p", "weak.json"]
    assert json.loads((out / "weak.json").read_text())["accurate_fraction"] == 0.2
    assert cli_main(argv) == 2 and "exists" in capsys.readouterr().err
    meta = weaken(umd, tmp_path / "no-images", 0.2, seed=0, split_by="umd")  # umd has no images folder
    assert meta["images"] is None and not (tmp_path / "no-images" / "images").exists()
