"""Letterbox geometry and RefSegDataset items for each supervision budget."""

import numpy as np
import pytest
import torch
from fixtures import make_refcoco
from torch.utils.data import DataLoader

from refseg.data import Letterbox, RefSegDataset, collate, load_refer

S = 64


@pytest.fixture
def data(tmp_path):
    return load_refer(make_refcoco(tmp_path / "d", extras=True).root)


def _iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("h, w", [(120, 80), (80, 120), (90, 90), (30, 20), (21, 47)])
def test_letterbox_mask_round_trip(h, w):
    yy, xx = np.mgrid[:h, :w]
    mask = (((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.55 * w) / (0.3 * w)) ** 2 <= 1).astype(np.uint8)
    lb = Letterbox(S)
    boxed = lb.apply_mask(mask)
    assert boxed.shape == (S, S) and boxed.dtype == np.uint8
    p = lb.params(h, w)
    assert boxed[p.new_h:].sum() == 0 and boxed[:, p.new_w:].sum() == 0  # padding stays empty
    logits = torch.from_numpy(boxed).float() * 20 - 10  # (S, S) logits
    back = lb.invert(logits[None, None], (h, w))  # (1, 1, H, W)
    assert back.shape == (1, 1, h, w)
    assert _iou((back[0, 0] > 0).numpy(), mask) > 0.9


def test_letterbox_params_and_image():
    lb = Letterbox(S)
    p = lb.params(32, 16)  # portrait: height -> 64, width -> 32, pad right 32
    assert (p.scale, p.new_h, p.new_w, p.pad_x, p.pad_y) == (2.0, 64, 32, 32, 0)
    p = lb.params(16, 32)
    assert (p.new_h, p.new_w, p.pad_x, p.pad_y) == (32, 64, 0, 32)
    img = np.full((16, 32, 3), 200, dtype=np.uint8)
    out = lb.apply_image(img)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    assert (out[:32] == 200).all() and (out[32:] == 0).all()
    with pytest.raises(ValueError):
        lb.apply_image(img[:, :, 0])


def test_letterbox_points_map_pixel_centres():
    lb = Letterbox(S)
    pts = lb.apply_points(np.array([[0.0, 0.0], [31.0, 15.0], [15.5, 7.5]]), (16, 32))  # scale 2
    np.testing.assert_allclose(pts, [[0.5, 0.5], [62.5, 30.5], [31.5, 15.5]])
    corners = lb.apply_points(np.array([[0, 0], [3, 1]]), (128, 128))  # scale 0.5
    np.testing.assert_allclose(corners, [[-0.25, -0.25], [1.25, 0.25]])


def test_letterbox_invert_keeps_leading_dims_and_dtype():
    lb = Letterbox(S)
    x = torch.randn(2, 3, S, S, dtype=torch.float64)
    out = lb.invert(x, (10, 30))
    assert out.shape == (2, 3, 10, 30) and out.dtype == torch.float64
    const = lb.invert(torch.full((S, S), 0.25), torch.tensor([7, 5]))
    assert const.shape == (7, 5) and torch.allclose(const, torch.tensor(0.25))
    with pytest.raises(ValueError):
        lb.invert(torch.zeros(S, S + 1), (5, 5))


def test_full_mode_items(data):
    ds = RefSegDataset(data, "train", size=S, supervision="full")
    assert len(ds) == 4
    item = ds[2]
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (1, S, S) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["text"] == "Dog with a hole" and item["no_target"].item() is False
    assert (item["image_id"], item["ref_id"], item["sent_id"], item["ann_id"]) == (1, 11, 1002, 102)
    assert item["orig_hw"].tolist() == [24, 32] and item["orig_hw"].dtype == torch.long
    assert item["letterbox"].tolist() == [2.0, 0.0, 16.0]
    expected = Letterbox(S).apply_mask(data.get_mask(102))
    np.testing.assert_array_equal(item["mask"][0].numpy(), expected)
    assert "click_center" not in item and "orig_mask" not in item
    nt = ds[3]
    assert nt["no_target"].item() is True and nt["mask"].sum() == 0 and nt["ann_id"] == -1


def test_eval_mode_has_original_mask(data):
    item = RefSegDataset(data, "val", size=S, supervision="eval")[0]
    assert item["orig_mask"].shape == (30, 20) and item["orig_mask"].dtype == torch.uint8
    np.testing.assert_array_equal(item["orig_mask"].numpy(), data.get_mask(103))
    assert item["mask"].shape == (1, S, S)


def test_click_mode_never_reads_a_mask(data, monkeypatch):
    def no_masks(*args, **kwargs):
        raise AssertionError("click supervision read a mask")

    monkeypatch.setattr(data, "get_mask", no_masks)
    for ann in data.anns.values():
        ann["segmentation"] = "corrupted"
    ds = RefSegDataset(data, "train", size=S, supervision="click")
    items = [ds[i] for i in range(len(ds))]
    first = items[0]  # ref 10 on a 24 x 32 image (scale 2): stored center [6, 5], corners [[4, 4], [11, 9]]
    assert "mask" not in first
    np.testing.assert_allclose(first["click_center"].numpy(), [12.5, 10.5])
    np.testing.assert_allclose(first["click_corners"].numpy(), [[8.5, 8.5], [22.5, 18.5]])
    assert first["click_center"].dtype == torch.float32 and first["click_corners"].shape == (2, 2)
    assert torch.isnan(items[3]["click_center"]).all() and torch.isnan(items[3]["click_corners"]).all()


def test_click_mode_derives_clicks_without_stored_ones(tmp_path):
    data = load_refer(make_refcoco(tmp_path / "plain").root)
    item = RefSegDataset(data, "val", size=30, supervision="click")[0]  # 30 x 20 image: scale 1
    assert item["click_center"].tolist() == [8.0, 17.0]
    assert item["click_corners"].tolist() == [[3.0, 12.0], [14.0, 26.0]]


def test_text_mode_reads_only_image_and_text(data, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("text supervision read a mask or a click")

    monkeypatch.setattr(data, "get_mask", forbidden)
    monkeypatch.setattr(data, "clicks", forbidden)
    ds = RefSegDataset(data, "train", size=S, supervision="text")
    item = ds[0]
    assert item["text"] == "man on the left"
    assert not {"mask", "click_center", "click_corners", "orig_mask"} & set(item)


def test_collate_and_dataloader(data):
    ds = RefSegDataset(data, "train", size=S, supervision="eval")
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, S, S) and batch["mask"].shape == (4, 1, S, S)
    assert batch["text"] == ["man on the left", "left guy", "Dog with a hole", "the cat"]
    assert batch["sent_id"].tolist() == [1000, 1001, 1002, 1006] and batch["sent_id"].dtype == torch.long
    assert batch["no_target"].tolist() == [False, False, False, True]
    assert batch["orig_hw"].shape == (4, 2) and batch["letterbox"].shape == (4, 3)
    assert isinstance(batch["orig_mask"], list) and batch["orig_mask"][0].shape == (24, 32)


def test_bad_supervision_and_split(data):
    with pytest.raises(ValueError, match="supervision"):
        RefSegDataset(data, "train", supervision="boxes")
    with pytest.raises(KeyError):
        RefSegDataset(data, "nope")
