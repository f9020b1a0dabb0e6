"""Bad refer-format data through the real loaders and the command line: refused in one line, or read when valid.

Each data-set case damages a hand-made RefCOCO folder (tests/fixtures.py) the way a
broken converter or an attacker would, then runs `refseg stats DIR` (the
fastest command that loads a data set; `refseg eval`, `train` and `weaken`
load through the same `load_refer`). Expected: exit status 2 and one
stderr line naming the file, the ref / annotation / image id and the field.
The last cases read `refseg predict`'s query files (CSV, JSONL).
"""

import json
import os
import pickle

import pytest
from fixtures import edit, make_refcoco

from refseg.cli import main as cli_main
from refseg.data import ReferFormatError, load_refer
from refseg.data.refer import load_refs_file

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def refcoco(tmp_path):
    return make_refcoco(tmp_path / "refcoco")


def _stats_refuses(root, capsys, *needles):
    """`refseg stats root` exits 2 with one stderr line holding every needle; nothing on stdout."""
    assert cli_main(["stats", str(root)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refseg stats: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert out == ""
    return lines[0]


def _ann(ann_id, **fields):
    def fn(inst):
        ann = next(a for a in inst["annotations"] if a["id"] == ann_id)
        ann.update(fields)
    return fn


def _sentence(ref_index, **fields):
    def fn(refs):
        refs[ref_index]["sentences"][0].update(fields)
    return fn


# --- polygons that would give an empty or a giant ground truth ------------------------------------------

@pytest.mark.parametrize("seg, says", [
    ([[4, 4, NAN, 4, 12, 10, 4, 10]], "NaN or infinite coordinate"),
    ([[4, 4, 12, 4, 12, INF, 4, 10]], "NaN or infinite coordinate"),
    ([[4, 4, -INF, 4, INF, 10, 4, 10]], "NaN or infinite coordinate"),
    ([[4, 4, 1e9, 4, 1e9, 1e9, 4, 10]], "far outside the 32x24 (w x h) image"),
    ([[4, 4, 12, 4, 12, -500, 4, 10]], "far outside"),
    ([[4, 4, 10 ** 400, 4, 12, 10, 4, 10]], "NaN or infinite coordinate (1000"),  # an int no float holds
    ([[4, 4, "12", 4, 12, 10, 4, 10]], "polygon must be an even list of numbers"),
    ([[4, 4, [12], 4, 12, 10, 4, 10]], "polygon must be an even list of numbers"),
    ([[4, 4, None, 4, 12, 10, 4, 10]], "polygon must be an even list of numbers"),
])
def test_polygon_coordinates_refused(refcoco, capsys, seg, says):
    edit(refcoco.root, instances=_ann(101, segmentation=seg))
    _stats_refuses(refcoco.root, capsys, "instances.json: annotation 101: field 'segmentation'", says)


def test_bad_polygon_refused_on_an_annotation_no_ref_uses(refcoco, capsys):
    edit(refcoco.root, instances=_ann(105, segmentation=[[0, 0, NAN, 0, 4, 4]]))  # annotation 105: no ref
    _stats_refuses(refcoco.root, capsys, "annotation 105: field 'segmentation'", "NaN")


@pytest.mark.parametrize("ann_id, seg", [
    (104, [[2, 2, 12, 2]]),  # two points: no polygon at all
    (104, [[2, 2, 12, 2], [5, 5]]),
    (104, [[0, 0, 5, 5, 10, 10, 15, 15]]),  # collinear: no area
    (104, [[3, 3, 3, 3, 3, 3]]),  # one point three times
    (104, [[20.5, 2, 21.5, 2, 21.5, 10, 20.5, 10]]),  # beside the 20-pixel-wide image (within the margin)
    (103, {"size": [30, 20], "counts": [600]}),  # an RLE of zeros
])
def test_segmentation_that_rasterises_to_nothing_refused(refcoco, capsys, ann_id, seg):
    edit(refcoco.root, instances=_ann(ann_id, segmentation=seg))
    line = _stats_refuses(refcoco.root, capsys, f"instances.json: annotation {ann_id}: field 'segmentation'",
                          "empty mask")
    assert f"ref {ann_id - 91}" in line  # the ref that points to it (ref 13 -> 104, ref 12 -> 103)


def test_an_annotation_without_a_mask_loads_but_its_mask_is_never_scored(refcoco):
    """`segmentation: []` is a text- or click-only data set's way of giving no mask: it loads, and any
    attempt to read that mask (training with masks, evaluation) is refused instead of scoring an empty one."""
    edit(refcoco.root, instances=_ann(104, segmentation=[]))
    data = load_refer(refcoco.root)
    with pytest.raises(ReferFormatError, match=r"annotation 104: field 'segmentation' is empty"):
        data.get_mask(104)


def test_degenerate_extra_parts_beside_a_real_polygon_are_kept(refcoco):
    # annotation 101 holds a real rectangle and a two-point part, as some COCO annotations do
    mask = load_refer(refcoco.root).get_mask(101)
    assert mask.sum() == 8 * 6


# --- ids ----------------------------------------------------------------------------------------------

def test_duplicate_annotation_id_refused(refcoco, capsys):
    def dup(inst):
        inst["annotations"].append(dict(inst["annotations"][0], segmentation=[[0, 0, 30, 0, 30, 20, 0, 20]]))
    edit(refcoco.root, instances=dup)
    _stats_refuses(refcoco.root, capsys, "instances.json: annotation 101: field 'id' is duplicated")


def test_duplicate_image_id_refused(refcoco, capsys):
    def dup(inst):
        inst["images"].append(dict(inst["images"][0], file_name="other.jpg", height=48, width=64))
    edit(refcoco.root, instances=dup)
    _stats_refuses(refcoco.root, capsys, "instances.json: image 1: field 'id' is duplicated")


def test_duplicate_category_id_refused(refcoco, capsys):
    edit(refcoco.root, instances=lambda i: i["categories"].append({"id": 2, "name": "cat"}))
    _stats_refuses(refcoco.root, capsys, "instances.json: category 2: field 'id' is duplicated")


def test_duplicate_sentence_id_refused(refcoco, capsys):
    def dup(refs):
        refs[1]["sentences"][0]["sent_id"] = 1000  # ref 10 has sentence 1000 already
        refs[1]["sent_ids"] = [1000]
    edit(refcoco.root, refs=dup)
    _stats_refuses(refcoco.root, capsys, "refs(unc).p: ref 11 sentence 1000: field 'sent_id' is duplicated",
                   "ref 10")


def test_duplicate_sentence_id_within_a_ref_refused(refcoco, capsys):
    def dup(refs):
        refs[0]["sentences"][1]["sent_id"] = 1000
        refs[0]["sent_ids"] = [1000, 1000]
    edit(refcoco.root, refs=dup)
    _stats_refuses(refcoco.root, capsys, "ref 10 sentence 1000: field 'sent_id' is duplicated")


def test_image_size_beyond_any_readable_image_refused(refcoco, capsys):
    edit(refcoco.root, instances=lambda i: i["images"][2].update(height=10 ** 6, width=10 ** 6))
    _stats_refuses(refcoco.root, capsys, "instances.json: image 3: fields 'height' x 'width'", "over the 179 MP")


def test_annotation_on_an_unlisted_image_refused(refcoco, capsys):
    edit(refcoco.root, instances=_ann(105, image_id=77))
    _stats_refuses(refcoco.root, capsys, "annotation 105: field 'image_id' = 77 has no entry in images")


# --- bbox and area ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    ({"bbox": ["4", 4, 8, 6]}, "bbox"),
    ({"bbox": [4, 4, NAN, 6]}, "bbox"),
    ({"bbox": [4, 4, True, 6]}, "bbox"),
    ({"bbox": [4, 4, -8, 6]}, "bbox"),
    ({"bbox": {"x": 4}}, "bbox"),
    ({"area": "60"}, "area"),
    ({"area": INF}, "area"),
    ({"area": [60]}, "area"),
    ({"area": -1}, "area"),
    ({"area": 10 ** 400}, "area"),
])
def test_bbox_and_area_of_the_wrong_type_refused(refcoco, capsys, fields, field):
    edit(refcoco.root, instances=_ann(101, **fields))
    _stats_refuses(refcoco.root, capsys, f"instances.json: annotation 101: field '{field}'")


# --- sentences ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    ({"sent": ""}, "sent"),
    ({"sent": "  \t\n"}, "sent"),
    ({"sent": ["man", "on", "the", "left"]}, "sent"),
    ({"sent": 5}, "sent"),
    ({"sent": None}, "sent"),
    ({"sent": {"text": "man"}}, "sent"),
    ({"raw": 5}, "raw"),
    ({"tokens": "man on the left"}, "tokens"),
    ({"tokens": ["man", 5]}, "tokens"),
    ({"form": ["location"]}, "form"),
    ({"form": 3}, "form"),
])
def test_sentence_fields_of_the_wrong_type_or_empty_refused(refcoco, capsys, fields, field):
    edit(refcoco.root, refs=_sentence(0, **fields))
    _stats_refuses(refcoco.root, capsys, "refs(unc).p: ref 10 sentence 1000", f"field '{field}'")


def test_tokens_only_sentence_of_empty_tokens_refused(refcoco, capsys):
    edit(refcoco.root, refs=lambda refs: refs[2]["sentences"][0].update(tokens=[]))  # ref 12: tokens only
    _stats_refuses(refcoco.root, capsys, "ref 12 sentence 1003", "field 'tokens' is empty")


@pytest.mark.parametrize("text", ["man \ud800 left", "caf\udce9", "\udfff"])
def test_sentence_with_a_lone_surrogate_refused(refcoco, capsys, text):
    edit(refcoco.root, refs=_sentence(0, sent=text))  # pickle keeps lone surrogates (surrogatepass)
    _stats_refuses(refcoco.root, capsys, "refs(unc).p: ref 10 sentence 1000: field 'sent'", "lone surrogate U+D")


def test_lone_surrogates_in_instances_json_refused(refcoco, capsys):
    path = refcoco.root / "instances.json"
    text = path.read_text()
    path.write_text(text.replace('"name": "dog"', '"name": "d\\udcffg"'))  # a JSON escape: valid JSON
    _stats_refuses(refcoco.root, capsys, "instances.json: category 2: field 'name'", "lone surrogate U+DCFF")
    path.write_text(text.replace("COCO_val2014_000000000003.png", "COCO_val2014_\\ud800.png"))
    _stats_refuses(refcoco.root, capsys, "instances.json: image 3: field 'file_name'", "lone surrogate U+D800")


# --- deep structures, pickles -------------------------------------------------------------------------

def test_100000_deep_json_is_one_line(refcoco, capsys):
    (refcoco.root / "instances.json").write_text("[" * 100_000 + "]" * 100_000)
    _stats_refuses(refcoco.root, capsys, "instances.json", "nested too deeply")


def test_100000_deep_value_in_refs_is_one_line(refcoco, capsys):
    path = refcoco.root / "refs(unc).p"
    with open(path, "rb") as f:
        refs = pickle.load(f)
    refs[0]["ref_id"] = "DEEP"
    data = pickle.dumps(refs, protocol=2)
    placeholder = b"X" + (4).to_bytes(4, "little") + b"DEEP"  # BINUNICODE "DEEP"
    assert data.count(placeholder) == 1
    n = 100_000  # EMPTY_LIST n times, then APPEND n - 1 times: a list nested n deep (pickle.dumps would recurse)
    path.write_bytes(data.replace(placeholder, b"]" * n + b"a" * (n - 1)))
    line = _stats_refuses(refcoco.root, capsys, "refs(unc).p: ref [[[", "field 'ref_id' must be an integer")
    assert len(line) < 400


def test_huge_integer_literal_in_json_is_one_line(refcoco, capsys):
    path = refcoco.root / "instances.json"
    path.write_text(path.read_text().replace('"height": 24', '"height": ' + "9" * 5000, 1))
    _stats_refuses(refcoco.root, capsys, "instances.json", "not valid JSON")


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_refs_pickle_runs_nothing(refcoco, capsys, tmp_path):
    marker = tmp_path / "ran"
    for protocol in (0, 2, 4, pickle.HIGHEST_PROTOCOL):
        def inject(refs):
            refs[0]["evil"] = _Marker(marker)
        edit(refcoco.root, refs=inject)
        _stats_refuses(refcoco.root, capsys, "refs(unc).p", "posix.system", "not allowed")
        assert not marker.exists()
        with pytest.raises(ReferFormatError):
            load_refs_file(refcoco.root / "refs(unc).p")
        assert not marker.exists()
        make_refcoco(refcoco.root)  # a clean folder for the next protocol


# --- the other entry points load the same way ----------------------------------------------------------

def test_weaken_refuses_bad_data_before_writing(refcoco, capsys, tmp_path):
    edit(refcoco.root, instances=_ann(101, segmentation=[[4, 4, NAN, 4, 12, 10, 4, 10]]))
    out = tmp_path / "weak"
    assert cli_main(["weaken", "--data", str(refcoco.root), "--accurate-fraction", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "instances.json: annotation 101: field 'segmentation'" in err[0], err
    assert not out.exists()


def test_weaken_deep_instances_json_is_one_line(refcoco, capsys, tmp_path):
    (refcoco.root / "instances.json").write_text("[" * 100_000 + "]" * 100_000)
    assert cli_main(["weaken", "--data", str(refcoco.root), "--accurate-fraction", "0.5",
                     "--out", str(tmp_path / "weak")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "instances.json" in err[0] and "nested too deeply" in err[0], err


def test_eval_refuses_bad_data_before_loading_a_model(refcoco, capsys, tmp_path):
    edit(refcoco.root, refs=_sentence(0, sent="   "))
    argv = ["eval", "--checkpoint", str(tmp_path / "no-model"), "--data", str(refcoco.root), "--split", "train"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refs(unc).p: ref 10 sentence 1000: field 'sent' is empty" in err[0], err


def test_valid_data_still_loads_with_every_check(refcoco):
    data = load_refer(refcoco.root)
    assert sorted(data.refs_by_id) == [10, 11, 12, 13, 14]
    assert all(data.get_mask(r["ann_id"]).sum() > 0 for r in data.refs_by_id.values())


# --- query files of `refseg predict` ------------------------------------------------------------------

def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    from refseg.expressions import read_queries

    path = tmp_path / "q.csv"
    path.write_bytes(b"\xef\xbb\xbfimage,text\r\na.png,the red square\r\nb.png,\xc3\xa9l\xc3\xa9phant\r\n")
    assert read_queries(path) == {"a.png": ["the red square"], "b.png": ["\u00e9l\u00e9phant"]}
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"image": "a.png", "text": "the red square"}\n')
    assert read_queries(path) == {"a.png": ["the red square"]}


def test_jsonl_with_line_separators_inside_strings_is_read(tmp_path):
    from refseg.expressions import read_queries

    path = tmp_path / "q.jsonl"
    text = "the red\u2028square\u2029on the left\x85\x0b\x0c\x1c"  # str.splitlines would break at each of these
    path.write_text(json.dumps({"image": "a.png", "texts": [text, "b"]}, ensure_ascii=False) + "\r\n\n"
                    + json.dumps({"image": "b.png", "text": "c"}) + "\n", encoding="utf-8")
    assert read_queries(path) == {"a.png": [text, "b"], "b.png": ["c"]}


@pytest.mark.parametrize("line, says", [
    ("[" * 100_000 + "]" * 100_000, "q.jsonl:2: not valid JSON (nested too deeply)"),
    ('{"image": "a.png", "text": ' + "9" * 5000 + "}", "q.jsonl:2: not valid JSON"),
    ('{"image": "a\\ud800.png", "text": "x"}', "q.jsonl:2: field 'image' holds a NUL or a lone surrogate"),
    ('{"image": "a.png", "text": "x\\udcff"}', "q.jsonl:2: expression #0: not valid UTF-8 text"),
])
def test_bad_jsonl_lines_are_one_line_errors(tmp_path, line, says):
    from refseg.expressions import read_queries

    path = tmp_path / "q.jsonl"
    path.write_text('{"image": "a.png", "text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError) as info:
        read_queries(path)
    assert says in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 300


def test_predict_reads_a_bom_csv_and_a_u2028_jsonl(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "q.csv").write_bytes(b"\xef\xbb\xbfimage,text\na.png,the red square\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "text": "red\u2028square"}, ensure_ascii=False))
    for queries in ("q.csv", "q.jsonl"):  # the queries pass; the run stops at the model, which does not exist
        argv = ["predict", "--model", str(tmp_path / "no-model"), "--images", str(tmp_path),
                "--queries", str(tmp_path / queries), "--out-dir", str(tmp_path / "out")]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "no-model" in err and queries not in err, err


@pytest.mark.parametrize("file_name", ["/etc/passwd", "../secret.png", "sub/../../secret.png", "..\\secret.png",
                                       "C:\\secret.png"])
def test_image_file_names_cannot_leave_the_images_folder(refcoco, capsys, file_name):
    """A data set names its images relative to its images folder; no file elsewhere is ever read through it."""
    def point_outside(inst):
        inst["images"][0]["file_name"] = file_name
    edit(refcoco.root, instances=point_outside)
    _stats_refuses(refcoco.root, capsys, "instances.json: image", "field 'file_name' must be a path inside")


def test_image_file_names_in_subfolders_are_read(refcoco):
    data = load_refer(refcoco.root)
    image_id = next(iter(data.images))
    name = data.images[image_id]["file_name"]
    (data.images_dir / "sub").mkdir()
    os.replace(data.images_dir / name, data.images_dir / "sub" / name)
    edit(refcoco.root, instances=lambda inst: next(i for i in inst["images"] if i["id"] == image_id)
         .update(file_name=f"sub/{name}"))
    assert load_refer(refcoco.root).load_image(image_id).ndim == 3
