"""RefSegDataset: one item per sentence of a refer-format split, letterboxed to S x S.

What an item holds depends on the supervision budget, and the data set reads
only what that budget allows:

- full:  image, text, mask (letterboxed).
- click: image, text, click_center, click_corners; never reads a mask when
         the refs store clicks (SynthRef does). For data without stored
         clicks (real RefCOCO) `ReferData.clicks` derives them from the mask
         once per ref, which is the only mask read in this mode.
- text:  image and text only.
- eval:  as full, plus `orig_mask`, the mask at the original resolution.

Every item also carries no_target, the ids, orig_hw and letterbox; see
docs/DESIGN.md for the table of keys.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from refseg.data.augment import check_view, flip_item
from refseg.data.refer import ReferData
from refseg.data.transforms import Letterbox

SUPERVISION = ("full", "click", "text", "eval")
LIST_KEYS = ("text", "orig_mask")  # always lists after collate: strings, per-image sizes


class RefSegDataset(Dataset):
    """Torch Dataset over `data.samples(split)`.

    Item keys and types:
        image: uint8 (3, S, S), letterboxed RGB in [0, 255].
        text: str.
        mask: float32 (1, S, S) in {0, 1} (full, eval).
        orig_mask: uint8 (H, W) in {0, 1} (eval).
        click_center: float32 (2,) [x, y], letterboxed pixels (click); NaN for no-target.
        click_corners: float32 (2, 2) [[x0, y0], [x1, y1]] (click); NaN for no-target.
        no_target: bool ().
        image_id, ref_id, sent_id, ann_id: int.
        orig_hw: int64 (2,) original (height, width).
        letterbox: float32 (3,) (scale, pad_x, pad_y); content occupies the top-left
            (S - pad_y) x (S - pad_x) pixels.
    """

    def __init__(self, data: ReferData, split: str, size: int = 320, supervision: str = "full",
                 view: str = "none"):
        if supervision not in SUPERVISION:
            raise ValueError(f"supervision must be one of {SUPERVISION}, got {supervision!r}")
        check_view(view)
        if view != "none" and supervision == "eval":
            raise ValueError(f"flip view {view!r} is for training; evaluation data are never flipped")
        self.data = data
        self.view = view  # every item seen flipped this way (data/augment.py); an index (i, view) overrides it
        self.split = split
        self.supervision = supervision
        self.letterbox = Letterbox(size)
        self.samples = data.samples(split)
        # The last image and mask read, letterboxed: sentences of one image are
        # usually read one after another (feature caching, evaluation), and
        # decoding a PNG costs more than the rest of an item.
        self._last_image: tuple = (None, None)
        self._last_mask: tuple = (None, None)

    def _image(self, image_id: int) -> tuple:
        """(letterboxed (3, S, S) uint8 tensor, (H, W)) of an image, reusing the last one read."""
        if self._last_image[0] != image_id:
            image = self.data.load_image(image_id)  # (H, W, 3) uint8
            boxed = torch.from_numpy(self.letterbox.apply_image(image)).permute(2, 0, 1).contiguous()  # (3, S, S)
            self._last_image = (image_id, (boxed, image.shape[:2]))
        return self._last_image[1]

    def _mask(self, ann_id: int, image_id: int) -> tuple:
        """(original (H, W) uint8 mask, letterboxed (1, S, S) float), reusing the last one read."""
        key = (ann_id, image_id)
        if self._last_mask[0] != key:
            mask = self.data.get_mask(ann_id, image_id=image_id)  # (H, W) uint8
            self._last_mask = (key, (mask, torch.from_numpy(self.letterbox.apply_mask(mask)).float()[None]))
        return self._last_mask[1]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index) -> dict:
        """Item `index`, or `(index, view)`: item index flipped by view (data/augment.py)."""
        index, view = index if isinstance(index, tuple) else (index, self.view)
        return flip_item(self._item(index), view)

    def _item(self, index: int) -> dict:
        s = self.samples[index]
        boxed, (h, w) = self._image(s.image_id)
        lb = self.letterbox.params(h, w)
        item = {
            "image": boxed.clone(),  # (3, S, S) uint8
            "text": s.text,
            "no_target": torch.tensor(s.no_target),
            "image_id": s.image_id,
            "ref_id": s.ref_id,
            "sent_id": s.sent_id,
            "ann_id": s.ann_id,
            "orig_hw": torch.tensor([h, w], dtype=torch.long),
            "letterbox": torch.tensor(lb.as_tuple(), dtype=torch.float32),
        }
        if self.supervision in ("full", "eval"):
            mask, boxed_mask = self._mask(s.ann_id, s.image_id)
            item["mask"] = boxed_mask.clone()  # (1, S, S)
            if self.supervision == "eval":
                item["orig_mask"] = torch.from_numpy(mask.copy())
        elif self.supervision == "click":
            clicks = self.data.clicks(s.ref_id)
            if clicks is None:
                center, corners = np.full(2, np.nan), np.full((2, 2), np.nan)
            else:
                center = self.letterbox.apply_points(np.asarray(clicks[0], dtype=np.float64), (h, w))
                corners = self.letterbox.apply_points(np.asarray(clicks[1], dtype=np.float64), (h, w))
            item["click_center"] = torch.tensor(center, dtype=torch.float32)  # (2,)
            item["click_corners"] = torch.tensor(corners, dtype=torch.float32)  # (2, 2)
        return item


def collate(batch: list[dict]) -> dict:
    """Batch items: tensors are stacked (B, ...), ints/bools become (B,) tensors;
    `text` (list[str]) and `orig_mask` (list of (H_i, W_i) uint8) stay lists."""
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        first = values[0]
        if key in LIST_KEYS or not isinstance(first, (torch.Tensor, bool, int)):
            out[key] = values
        elif isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.bool)
        else:
            out[key] = torch.tensor(values, dtype=torch.long)
    return out
