"""SynthRef generator: the spec's invariants, checked on the written files of the `tiny` preset."""

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from refseg.cli import main as cli_main
from refseg.data.refer import clicks_from_mask, load_refer, load_refs_file
from refseg.data.synthref import generate as gen
from refseg.data.synthref.build import draw_image
from refseg.data.synthref.grammar import GrammarError, NounPhrase, ObjectFacts, evaluate, parse, render, resolve
from refseg.data.synthref.verify import check_dataset, decode_annotation, facts_from_annotations
from refseg.data.synthref.vocab import AERIAL, NATURAL, PRESETS, THIRD

SPEC_CATEGORIES = {
    "natural": {1: "circle", 2: "square", 3: "triangle", 4: "star", 5: "hexagon", 6: "cross"},
    "aerial": {1: "vehicle", 2: "storage tank", 3: "airplane", 4: "ship", 5: "building", 6: "tennis court"},
}
NO_TARGET_FRACTION = 0.1

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The tiny preset of both domains, seed 0; aerial with 10 % no-target sentences."""
    root = tmp_path_factory.mktemp("synthref")
    gen.generate(root / "natural", "natural", "tiny", seed=0, workers=1)
    gen.generate(root / "aerial", "aerial", "tiny", seed=0, no_target_fraction=NO_TARGET_FRACTION, workers=1)
    return {"natural": root / "natural", "aerial": root / "aerial"}


@pytest.fixture
def micro(monkeypatch):
    """A 4/2/2-image preset, for tests that only need a run to happen."""
    monkeypatch.setitem(PRESETS, "micro", (4, 2, 2))
    return "micro"


def _digest(folder: Path, names) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def _load(folder: Path):
    return load_refs_file(folder / "refs(unc).p"), json.loads((folder / "instances.json").read_text())


# --- the grammar's evaluator on hand-built scenes ---------------------------------------------------------


def _obj(cid, x, y, colour="red", size="small", area=500):
    return ObjectFacts(cid, colour, size, float(x), float(y), area)


def test_spatial_margin_leaves_sentences_undecided():
    near = [_obj(1, THIRD - 5, 160)]  # 5 px left of the W/3 line: rounding could decide it
    far = [_obj(1, THIRD - 9, 160)]
    assert resolve("the circle on the left", near, NATURAL).unique is None
    assert resolve("the circle on the left", far, NATURAL).unique == 0
    assert resolve("the circle in the top left", far, NATURAL).empty  # y = 160 is surely not at the top


def test_relations_ordinals_and_extremes():
    scene = [_obj(1, 100, 150, "red"), _obj(1, 130, 150, "blue"), _obj(2, 200, 150, "red")]
    assert resolve("the circle left of the square", scene, NATURAL).definite == {0, 1}
    assert resolve("the red circle left of the square", scene, NATURAL).unique == 0
    assert resolve("the square right of the circle", scene, NATURAL).empty  # the anchor is not unique
    assert resolve("the leftmost circle", scene, NATURAL).unique == 0  # gap 30 px > 20 + 8
    close = [_obj(1, 100, 150), _obj(1, 125, 150)]  # gap 25 px: within 8 px of the 20 px margin
    assert resolve("the leftmost circle", close, NATURAL).unique is None
    assert resolve("the leftmost square", scene, NATURAL).empty  # one square is not enough
    ships = [_obj(4, 50, 50, "white", None, 130), _obj(4, 250, 250, "grey", None, 100)]
    assert resolve("the largest ship", ships, AERIAL).unique == 0  # 1.3 > 1.25
    ships[0] = _obj(4, 50, 50, "white", None, 120)
    assert resolve("the largest ship", ships, AERIAL).empty  # 1.2 is not enough


def test_parse_render_round_trip_and_errors():
    for vocab, text in [(NATURAL, "the small red star left of the blue circle"), (NATURAL, "the topmost green hexagon"),
                        (AERIAL, "the grey ship in the bottom right"), (AERIAL, "the smallest storage tank"),
                        (AERIAL, "the tennis court below the airplane")]:
        assert render(parse(text, vocab), vocab) == text
    assert parse("the large cross", NATURAL) == NounPhrase(6, size="large")
    for vocab, bad in [(AERIAL, "the red tennis court on the left"), (NATURAL, "the big circle"),
                       (NATURAL, "the circle on the left please"), (NATURAL, "circle")]:
        with pytest.raises(GrammarError):
            parse(bad, vocab)


# --- scenes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["natural", "aerial"])
def test_scenes_keep_objects_visible_and_inside(datasets, domain):
    """Redraw the stored images from their seeds: same pixels and masks, every object inside and >= 60 % visible."""
    vocab = NATURAL if domain == "natural" else AERIAL
    folder = datasets[domain]
    _, instances = _load(folder)
    tasks = gen.image_tasks(domain, "tiny", 0, folder / "images")
    for task in tasks[:: len(tasks) // 12]:
        scene, _ = draw_image(task)
        with Image.open(folder / "images" / task.file_name) as im:
            assert np.array_equal(np.asarray(im), scene.image)
        anns = sorted((a for a in instances["annotations"] if a["image_id"] == task.image_id), key=lambda a: a["id"])
        assert [a["category_id"] for a in anns] == [o.category_id for o in scene.objects]
        lo, hi = vocab.object_count
        assert lo <= len(scene.objects) <= hi
        for k, (obj, ann) in enumerate(zip(scene.objects, anns)):
            h, w = obj.layer.coverage.shape
            assert 0 <= obj.layer.x0 and obj.layer.x0 + w <= 320 and 0 <= obj.layer.y0 and obj.layer.y0 + h <= 320
            assert np.array_equal(decode_annotation(ann), scene.mask(k))
            assert ann["area"] >= 0.6 * scene.own_area[k]


# --- the written data set ------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["natural", "aerial"])
def test_every_sentence_names_its_object_alone(datasets, domain):
    folder = datasets[domain]
    assert check_dataset(folder) == []
    refs, instances = _load(folder)
    vocab = NATURAL if domain == "natural" else AERIAL
    by_image = {}
    for ann in sorted(instances["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    facts_by_image = {image_id: facts_from_annotations(anns) for image_id, anns in by_image.items()}
    for ref in refs:
        if ref["no_target"]:
            continue
        anns, facts = by_image[ref["image_id"]], facts_by_image[ref["image_id"]]
        target = [a["id"] for a in anns].index(ref["ann_id"])
        assert 1 <= len(ref["sentences"]) <= 3
        assert len({s["form"] for s in ref["sentences"]}) == len(ref["sentences"])
        for s in ref["sentences"]:
            assert s["sent"] == s["raw"] and s["tokens"] == s["raw"].lower().split()
            assert evaluate(parse(s["raw"], vocab), facts).unique == target
            assert s["form"] == parse(s["raw"], vocab).form
        assert facts[target].area >= vocab.min_referent_pixels


@pytest.mark.parametrize("domain", ["natural", "aerial"])
def test_files_follow_the_refer_format_and_the_spec(datasets, domain):
    folder = datasets[domain]
    refs, instances = _load(folder)
    coco = COCO(str(folder / "instances.json"))
    assert {c["id"]: c["name"] for c in instances["categories"]} == SPEC_CATEGORIES[domain]
    lo, hi = (3, 6) if domain == "natural" else (6, 16)
    for image_id, img in coco.imgs.items():
        assert (img["height"], img["width"]) == (320, 320)
        assert lo <= len(coco.getAnnIds(imgIds=[image_id])) <= hi
    with Image.open(folder / "images" / instances["images"][0]["file_name"]) as im:
        assert im.size == (320, 320) and im.mode == "RGB"
    for ann in instances["annotations"]:
        assert isinstance(ann["segmentation"], list) and len(ann["segmentation"]) == 1
        # REFER.getMask passes the list of RLEs to decode as it is (COCO.annToMask would read it as
        # uncompressed RLE: the spec's form serves the refer API, not annToMask)
        m = mask_utils.decode(ann["segmentation"])[..., 0]
        assert m.shape == (320, 320) and m.sum() == ann["area"] > 0
        assert ann["iscrowd"] == 0 and ann["bbox"] == [float(v) for v in mask_utils.toBbox(ann["segmentation"])[0]]
    splits = {}
    for ref in refs:
        splits.setdefault(ref["image_id"], set()).add(ref["split"])
        assert [s["sent_id"] for s in ref["sentences"]] == ref["sent_ids"]
        assert ref["class_name"] == SPEC_CATEGORIES[domain][ref["category_id"]]
    assert all(len(s) == 1 for s in splits.values())  # no image in two splits
    assert len({r["ref_id"] for r in refs}) == len(refs)
    meta = json.loads((folder / "synthref.json").read_text())
    assert [meta["splits"][s]["images"] for s in ("train", "val", "test")] == list(PRESETS["tiny"])


@pytest.mark.parametrize("domain", ["natural", "aerial"])
def test_clicks_lie_in_the_mask(datasets, domain):
    refs, instances = _load(datasets[domain])
    anns = {a["id"]: a for a in instances["annotations"]}
    for ref in refs:
        if ref["no_target"]:
            continue
        m = decode_annotation(anns[ref["ann_id"]])
        (x, y), corners = ref["click_center"], ref["click_corners"]
        assert m[y, x] == 1
        assert (ref["click_center"], ref["click_corners"]) == tuple(clicks_from_mask(m))
        (x0, y0), (x1, y1) = corners
        rows, cols = np.nonzero(m)
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max(), rows.max())


def test_natural_images_repeat_the_targets_shape(datasets):
    refs, instances = _load(datasets["natural"])
    shapes = {}
    for ann in instances["annotations"]:
        shapes.setdefault(ann["image_id"], []).append(ann["category_id"])
    repeated = {r["image_id"] for r in refs if shapes[r["image_id"]].count(r["category_id"]) >= 2}
    assert len(repeated) >= len(shapes) / 2


def test_no_target_refs(datasets):
    refs, instances = _load(datasets["aerial"])
    for split in ("train", "val", "test"):
        ours = [r for r in refs if r["split"] == split]
        absent = [r for r in ours if r["no_target"]]
        targets = sum(len(r["sentences"]) for r in ours if not r["no_target"])
        assert abs(len(absent) - NO_TARGET_FRACTION * targets / (1 - NO_TARGET_FRACTION)) <= 1
        for r in absent:
            assert r["ann_id"] == -1 and r["click_center"] is None and r["click_corners"] is None
            assert len(r["sentences"]) == 1 and parse(r["sentences"][0]["raw"], AERIAL).category_id == r["category_id"]


@pytest.mark.parametrize("domain", ["natural", "aerial"])
def test_loads_through_load_refer(datasets, domain):
    data = load_refer(datasets[domain])
    refs, instances = _load(datasets[domain])
    assert data.splits() == ["train", "val", "test"]
    assert sum(len(data.samples(s)) for s in data.splits()) == sum(len(r["sentences"]) for r in refs)
    sample = data.samples("val")[0]
    ann = next(a for a in instances["annotations"] if a["id"] == sample.ann_id)
    assert np.array_equal(data.get_mask(sample.ann_id), decode_annotation(ann))
    assert data.load_image(sample.image_id).shape == (320, 320, 3)


# --- determinism, atomicity, the command line ---------------------------------------------------------


def test_same_seed_is_byte_identical_for_any_worker_count(datasets, tmp_path):
    again = tmp_path / "again"
    gen.generate(again, "natural", "tiny", seed=0, workers=2)
    names = ["refs(unc).p", "instances.json", "synthref.json"]
    names += sorted(f"images/{p.name}" for p in (again / "images").iterdir())
    assert _digest(again, names) == _digest(datasets["natural"], names)


def test_different_seeds_differ(micro, tmp_path):
    for seed in (1, 2):
        gen.generate(tmp_path / str(seed), "natural", micro, seed=seed)
    names = ["refs(unc).p", "instances.json"]
    a, b = _digest(tmp_path / "1", names), _digest(tmp_path / "2", names)
    assert all(a[n] != b[n] for n in names)


def test_failure_mid_run_leaves_no_folder(micro, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash after the images were drawn")

    monkeypatch.setattr(gen, "assemble", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        gen.generate(tmp_path / "out", "natural", micro, seed=0)
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary sibling


def test_refuses_to_overwrite_unless_asked(micro, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        gen.generate(out, "aerial", micro, seed=0)
    assert (out / "old.txt").exists()
    monkeypatch.setattr(gen, "assemble", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        gen.generate(out, "aerial", micro, seed=0, overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and (out / "old.txt").exists()  # a failed overwrite keeps the old data
    monkeypatch.undo()
    monkeypatch.setitem(PRESETS, "micro", (4, 2, 2))
    gen.generate(out, "aerial", micro, seed=0, overwrite=True)
    assert sorted(os.listdir(out)) == ["images", "instances.json", "refs(unc).p", "synthref.json"]
    assert os.listdir(tmp_path) == ["out"]


def test_command_line(micro, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["make-data", "--domain", "aerial", "--preset", micro, "--seed", "3", "--out", str(out), "--workers", "1"]
    assert cli_main(argv) == 0
    meta = json.loads((out / "synthref.json").read_text())
    assert (meta["domain"], meta["preset"], meta["seed"]) == ("aerial", micro, 3)
    assert cli_main(argv) == 2 and "exists" in capsys.readouterr().err
    with open(out / "refs(unc).p", "rb") as f:
        assert isinstance(pickle.load(f), list)
