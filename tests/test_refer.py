"""load_refer on hand-made RefCOCO and RRSIS-D folders: masks, quirks, clicks, safety, errors."""

import os
import pickle
import shutil

import numpy as np
import pytest
from fixtures import edit, make_refcoco, make_rrsisd, rle_counts
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.data import ReferFileNotFoundError, ReferFormatError, load_refer
from refseg.data.refer import clicks_from_mask, decode_segmentation, load_refs_file


@pytest.fixture
def refcoco(tmp_path):
    return make_refcoco(tmp_path / "refcoco")


@pytest.fixture
def synthlike(tmp_path):
    return make_refcoco(tmp_path / "synth", extras=True)


def test_refcoco_splits_and_sample_order(refcoco):
    data = load_refer(refcoco.root)
    assert data.split_by == "unc"
    assert data.splits() == ["train", "val", "testA", "testB"]
    train = data.samples("train")
    assert [s.sent_id for s in train] == [1000, 1001, 1002]
    assert [s.ref_id for s in train] == [10, 10, 11]
    s = train[0]
    assert (s.ann_id, s.image_id, s.category_id, s.class_name) == (101, 1, 1, "person")
    assert s.form is None and not s.no_target and not s.weak
    with pytest.raises(KeyError, match="testC"):
        data.samples("testC")


def test_sentence_text_prefers_sent_then_raw_then_tokens(refcoco):
    data = load_refer(refcoco.root)
    texts = {s.sent_id: s.text for split in data.splits() for s in data.samples(split)}
    assert texts[1000] == "man on the left"  # `sent`
    assert texts[1002] == "Dog with a hole"  # only `raw`
    assert texts[1003] == "crowd at the bottom"  # only `tokens`


def test_masks_from_every_segmentation_form(refcoco):
    data = load_refer(refcoco.root)
    for ann_id, expected in refcoco.masks.items():  # list of RLE, bare uncompressed, list of uncompressed, bare RLE
        m = data.get_mask(ann_id)
        assert m.dtype == np.uint8 and m.shape == expected.shape
        np.testing.assert_array_equal(m, expected)
    x0, y0, x1, y1 = refcoco.boxes[101]  # polygon rectangle (+ a degenerate part)
    m = data.get_mask(101)
    box = np.zeros_like(m)
    box[y0:y1, x0:x1] = 1
    np.testing.assert_array_equal(m, box)
    tri = data.get_mask(104)  # polygon triangle, inside its bbox
    ys, xs = np.nonzero(tri)
    assert tri.shape == (30, 20) and 20 < tri.sum() < 60 and xs.min() >= 2 and ys.max() <= 10


def test_decode_bytes_counts_and_size_mismatch():
    m = np.zeros((6, 5), dtype=np.uint8)
    m[1:4, 2:5] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    assert isinstance(rle["counts"], bytes)
    np.testing.assert_array_equal(decode_segmentation(rle, 6, 5), m)
    np.testing.assert_array_equal(decode_segmentation([{"size": [6, 5], "counts": rle_counts(m)}], 6, 5), m)
    with pytest.raises(ReferFormatError, match="size"):
        decode_segmentation(rle, 5, 6, "annotation 7")
    with pytest.raises(ReferFormatError, match="annotation 7.*segmentation"):
        decode_segmentation("not a mask", 6, 5, "annotation 7")
    with pytest.raises(ReferFormatError, match="annotation 7: field 'segmentation' polygon"):
        decode_segmentation([[1, 1, "x", 1, 4, 4]], 6, 5, "annotation 7")


def test_no_target_mask_is_empty(synthlike):
    data = load_refer(synthlike.root)
    assert data.get_mask(-1, image_id=1).shape == (24, 32)
    assert not data.get_mask(-1, image_id=1).any()
    with pytest.raises(ValueError, match="image_id"):
        data.get_mask(-1)


def test_refs_file_name_is_ignored_images_come_from_instances(refcoco):
    data = load_refer(refcoco.root)
    assert data.refs_by_id[11]["file_name"] == "nonexistent.jpg"
    assert data.load_image(1).shape == (24, 32, 3)
    assert data.load_image(2).shape == (30, 20, 3)


def test_images_dir_option(refcoco, tmp_path):
    shutil.move(refcoco.root / "images", tmp_path / "train2014")
    with pytest.raises(ReferFileNotFoundError, match="COCO_train2014_000000000001.jpg"):
        load_refer(refcoco.root).load_image(1)
    data = load_refer(refcoco.root, images_dir=tmp_path / "train2014")
    assert data.load_image(3).dtype == np.uint8


def test_rrsisd_quirks(tmp_path):
    fx = make_rrsisd(tmp_path / "rrsisd")
    data = load_refer(fx.root)
    assert data.splits() == ["train", "val", "test"]
    assert data.categories == {0: "airplane", 1: "ship"}
    (s0,) = data.samples("train")
    assert (s0.sent_id, s0.ref_id, s0.ann_id, s0.image_id) == (0, 0, 0, 0)
    assert s0.category_id == 0 and s0.class_name == "airplane"
    (s2,) = data.samples("test")  # ref without category_id: taken from the annotation's categories_id
    assert s2.category_id == 0 and s2.class_name == "airplane"
    assert data.anns[1]["category_id"] == 1
    np.testing.assert_array_equal(data.get_mask(0), fx.masks[0])


def test_extra_keys_are_kept(synthlike):
    data = load_refer(synthlike.root)
    ref = data.refs_by_id[10]
    assert ref["click_center"] == [6, 5] and ref["class_name"] == "person"
    assert data.refs_by_id[11]["weak"] is True
    nt = data.refs_by_id[15]
    assert nt["no_target"] is True and nt["ann_id"] == -1 and nt["click_center"] is None
    forms = [s.form for s in data.samples("train")]
    assert forms == ["location", "attribute", "attribute", "class"]
    assert [s.no_target for s in data.samples("train")] == [False, False, False, True]


def test_clicks_stored_or_derived(refcoco, synthlike):
    stored = load_refer(synthlike.root)
    assert stored.clicks(10) == ([6, 5], [[4, 4], [11, 9]])
    assert stored.clicks(15) is None
    derived = load_refer(refcoco.root)
    center, corners = derived.clicks(12)  # mask rows 12..26, cols 3..14
    assert corners == [[3, 12], [14, 26]]
    assert center == [8, 17]  # distance 6 on rows 17..21, cols 8..9: first in row order
    assert derived.clicks(10) == clicks_from_mask(derived.get_mask(101))


def test_clicks_from_mask_definitions():
    m = np.ones((5, 5), dtype=np.uint8)  # the image border is a border
    assert clicks_from_mask(m) == ([2, 2], [[0, 0], [4, 4]])
    m = np.zeros((6, 8), dtype=np.uint8)
    m[1:3, 2:6] = 1  # 2 x 4 block: every pixel at distance 1, first in row order is (2, 1)
    assert clicks_from_mask(m) == ([2, 1], [[2, 1], [5, 2]])
    assert clicks_from_mask(np.zeros((3, 3))) is None


def test_split_by_detection(refcoco):
    shutil.copy(refcoco.root / "refs(unc).p", refcoco.root / "refs(google).p")
    with pytest.raises(ReferFormatError, match=r"refs\(google\)\.p, refs\(unc\)\.p"):
        load_refer(refcoco.root)
    assert load_refer(refcoco.root, split_by="google").split_by == "google"
    with pytest.raises(ReferFileNotFoundError, match=r"refs\(umd\)\.p"):
        load_refer(refcoco.root, split_by="umd")


def test_missing_files_are_named(refcoco, tmp_path):
    with pytest.raises(ReferFileNotFoundError, match="no refs"):
        load_refer(tmp_path)
    (refcoco.root / "instances.json").unlink()
    with pytest.raises(ReferFileNotFoundError, match="instances.json"):
        load_refer(refcoco.root)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        load_refer(refcoco.root)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps([{"ref_id": 1, "evil": _RunsCode(marker)}], protocol=protocol))
        with pytest.raises(ReferFormatError, match=r"refs\(unc\)\.p.*system.*not allowed"):
            load_refs_file(path)
        assert not marker.exists()


def test_restricted_unpickler_admits_plain_data(tmp_path):
    path = tmp_path / "refs.p"
    value = [{"a": (1, 2.5, None, True), "b": b"raw", "c": {"x"}, "d": "naïve"}]
    path.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    assert load_refs_file(path) == value
    path.write_bytes(pickle.dumps([np.float64(1.0)]))  # numpy scalars need a global: refused
    with pytest.raises(ReferFormatError, match="numpy"):
        load_refs_file(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(ReferFormatError, match="refs.p"):
        load_refs_file(path)


def _set(key, value, index=0):
    def fn(refs):
        refs[index][key] = value
    return fn


@pytest.mark.parametrize("edit_refs, pattern", [
    (_set("image_id", 99), r"refs\(unc\)\.p: ref 10: field 'image_id' = 99"),
    (_set("ann_id", 555), r"refs\(unc\)\.p: ref 10: field 'ann_id' = 555"),
    (_set("image_id", 2), r"ref 10: field 'image_id' = 2 but annotation 101"),
    (_set("sentences", "man on the left"), r"ref 10: field 'sentences' must be"),
    (_set("sent_ids", [1]), r"ref 10: field 'sent_ids'"),
    (_set("ref_id", "ten"), r"field 'ref_id' must be an integer"),
    (_set("click_center", [1, 2, 3]), r"ref 10: field 'click_center'"),
    (_set("sentences", [{"sent_id": 5}], index=1), r"ref 11 sentence 5: sentence has none of"),
])
def test_malformed_refs_name_file_id_and_field(refcoco, edit_refs, pattern):
    edit(refcoco.root, refs=edit_refs)
    with pytest.raises(ReferFormatError, match=pattern):
        load_refer(refcoco.root)


def _set_ann(key, value):
    def fn(inst):
        inst["annotations"][0][key] = value
    return fn


@pytest.mark.parametrize("edit_inst, pattern", [
    (_set_ann("bbox", [1, 2, 3]), r"instances.json: annotation 101: field 'bbox'"),
    (_set_ann("segmentation", "abc"), r"annotation 101: field 'segmentation' has unknown form"),
    (_set_ann("segmentation", [[1, 2, 3]]), r"annotation 101: field 'segmentation' polygon"),
    (_set_ann("segmentation", [{"counts": "x"}]), r"annotation 101: field 'segmentation' RLE"),
])
def test_malformed_instances_name_file_id_and_field(refcoco, edit_inst, pattern):
    edit(refcoco.root, instances=edit_inst)
    with pytest.raises(ReferFormatError, match=pattern):
        load_refer(refcoco.root)


def test_missing_image_file_named_at_load_time(refcoco):
    (refcoco.root / "images" / "COCO_train2014_000000000002.png").unlink()
    data = load_refer(refcoco.root)  # loading does not touch images
    with pytest.raises(ReferFileNotFoundError, match=r"image 2: file not found: .*COCO_train2014_000000000002.png"):
        data.load_image(2)


def test_image_size_must_match_instances(refcoco):
    Image.new("RGB", (10, 10)).save(refcoco.root / "images" / "COCO_val2014_000000000003.png")
    with pytest.raises(ReferFormatError, match="image 3: .* says 16x16"):
        load_refer(refcoco.root).load_image(3)


def test_exif_rotated_photo_falls_back_to_stored_pixels(refcoco):
    path = refcoco.root / "images" / "COCO_train2014_000000000001.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: EXIF view is 32 x 24, annotations were drawn on 24 x 32
    Image.open(path).save(path, exif=exif)
    assert load_refer(refcoco.root).load_image(1).shape == (24, 32, 3)


def test_python2_pickles_decode_utf8_then_latin1(tmp_path):
    path = tmp_path / "refs.p"
    path.write_bytes(b"\x80\x02]q\x00}q\x01U\x03keyq\x02U\x03h\xc3\xa9q\x03sa.")  # Python 2 str holding UTF-8
    assert load_refs_file(path) == [{"key": "hé"}]
    path.write_bytes(b"\x80\x02]q\x00}q\x01U\x03keyq\x02U\x02h\xe9q\x03sa.")  # Python 2 str holding latin-1
    assert load_refs_file(path) == [{"key": "hé"}]
