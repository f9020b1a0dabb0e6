"""`refseg stats` on the hand-made fixtures."""

import json
import shutil

import pytest
from fixtures import edit, make_refcoco, make_rrsisd

from refseg.cli import main as cli_main
from refseg.data import load_refer
from refseg.data.stats import compute_stats


@pytest.fixture
def synthlike(tmp_path):
    return make_refcoco(tmp_path / "synth", extras=True)


def test_compute_stats_counts(synthlike):
    st = compute_stats(load_refer(synthlike.root))
    train = st["splits"]["train"]
    assert (train["images"], train["refs"], train["sentences"]) == (1, 3, 4)
    assert train["no_target_sentences"] == 1 and train["weak_refs"] == 1
    assert train["mean_sentence_length"] == pytest.approx((4 + 2 + 4 + 2) / 4)
    assert train["mean_objects_per_image"] == 2.0  # image 1 holds annotations 101 and 102
    assert st["splits"]["testB"]["mean_objects_per_image"] == 2.0  # 105 is never referred to but counts
    assert list(st["splits"]) == ["train", "val", "testA", "testB"]
    assert st["categories"] == {"dog": {"train": 2, "testA": 1}, "person": {"train": 1, "val": 1, "testB": 1}}
    assert st["forms"]["attribute"] == {"train": 2}
    assert st["forms"]["class"] == {"train": 1}


def test_same_category_objects(synthlike):
    """How much a class name says: per target ref, the objects of its category on its image."""
    st = compute_stats(load_refer(synthlike.root))
    for split in ("train", "val", "testA", "testB"):  # one object per category per image; ref 15 (no target) left out
        assert st["splits"][split]["mean_same_category_objects"] == 1.0
        assert st["splits"][split]["unique_category_refs"] == 1.0

    def add_people(inst):  # two more people on image 1 (ref 10's), one more dog on image 3 (no ref's)
        for aid, cat in ((107, 1), (108, 1), (109, 2)):
            inst["annotations"].append({"id": aid, "image_id": 1 if cat == 1 else 3, "category_id": cat, "iscrowd": 0,
                                        "area": 4.0, "bbox": [0, 0, 2, 2], "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]})
    edit(synthlike.root, instances=add_people)
    st = compute_stats(load_refer(synthlike.root))
    train = st["splits"]["train"]  # refs 10 (person, now 3 on image 1) and 11 (dog, still alone there)
    assert train["mean_same_category_objects"] == 2.0 and train["unique_category_refs"] == 0.5
    assert st["splits"]["testB"]["unique_category_refs"] == 1.0  # ref 14 (person on image 3): the new dog is no person

    def no_target_alone(refs):  # ref 15 (no target) in a split of its own
        next(r for r in refs if r["ref_id"] == 15)["split"] = "extra"
    edit(synthlike.root, refs=no_target_alone)
    st = compute_stats(load_refer(synthlike.root))
    assert st["splits"]["extra"]["mean_same_category_objects"] is None
    assert st["splits"]["extra"]["unique_category_refs"] is None
    assert st["splits"]["train"]["unique_category_refs"] == 0.5


def test_forms_unknown_and_category_zero(tmp_path):
    st = compute_stats(load_refer(make_rrsisd(tmp_path / "r").root))
    assert st["forms"] == {"unknown": {"train": 1, "val": 1, "test": 1}}
    assert st["categories"] == {"airplane": {"train": 1, "test": 1}, "ship": {"val": 1}}


def test_cli_tables_and_json(synthlike, capsys):
    assert cli_main(["stats", str(synthlike.root)]) == 0
    out = capsys.readouterr().out
    assert "split_by: unc" in out and "objects/image" in out and "class unique" in out and "location" in out
    table = out.split("\n\n")[1].splitlines()
    assert table[0].split()[:4] == ["split", "images", "refs", "sentences"]
    assert table[1].split()[:4] == ["train", "1", "3", "4"]
    assert cli_main(["stats", str(synthlike.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["val"]["refs"] == 1


def test_cli_split_by_images_and_errors(synthlike, tmp_path, capsys):
    shutil.copy(synthlike.root / "refs(unc).p", synthlike.root / "refs(umd).p")
    assert cli_main(["stats", str(synthlike.root)]) == 2
    assert "refs(umd).p" in capsys.readouterr().err
    assert cli_main(["stats", str(synthlike.root), "--split-by", "umd", "--images", str(tmp_path)]) == 0
    assert "split_by: umd" in capsys.readouterr().out
    assert cli_main(["stats", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
