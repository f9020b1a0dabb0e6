"""Run a trained model on images of any size, mode and orientation.

Modelled on Segment Anything's ``SamPredictor``: ``set_image`` runs the
visual encoder once and caches its maps; every ``predict`` call afterwards
pays only for the text encoder and the head, so many expressions on one
image are cheap.

    predictor = Predictor(refseg.load("lts-synthref"))
    predictor.set_image("photo.jpg")
    result = predictor.predict(["the red star", "the blue circle on the left"])
    result.masks        # (N, H, W) bool, full resolution of the input image
"""

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from refseg.data.image import load_image_rgb
from refseg.data.transforms import Letterbox
from refseg.expressions import check_expressions


@dataclass
class Prediction:
    """What ``Predictor.predict`` returns for N expressions on one image.

    masks:      (N, H, W) bool, at the input image's full resolution.
    scores:     (N,) float32 in [0, 1], mean foreground probability inside the
                predicted mask (0 when the mask is empty).
    no_target:  (N,) bool, the model's decision that the expression names
                nothing in the image (its mask is then empty).
    no_target_prob: (N,) float32 in [0, 1].
    logits:     (N, H, W) float32 mask logits at full resolution.
    points:     (N, 2) int64, x, y of the response map's argmax (full resolution).
    """

    masks: np.ndarray
    scores: np.ndarray
    no_target: np.ndarray
    no_target_prob: np.ndarray
    logits: np.ndarray
    points: np.ndarray


ImageLike = Union[str, "os.PathLike", np.ndarray, "PIL.Image.Image"]  # noqa: F821


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Predictor:
    """Caches one image's visual features and answers expressions about it.

    Arguments:
      model: a refseg model exposing ``encode_image``, ``encode_text`` and
        ``decode`` (see docs/DESIGN.md); it is put in eval mode.
      mask_threshold: probability above which a pixel is foreground.
      text_batch_size: expressions decoded per forward pass.
    """

    def __init__(self, model: torch.nn.Module, mask_threshold: float = 0.5, text_batch_size: int = 32):
        self.model = model.eval()
        self.device = _device_of(model)
        self.mask_threshold = float(mask_threshold)
        self.text_batch_size = int(text_batch_size)
        self.letterbox = Letterbox(int(getattr(model, "image_size", 320)))
        self.reset_image()

    def reset_image(self) -> None:
        self._features = None
        self._orig_hw = None

    @property
    def is_image_set(self) -> bool:
        return self._features is not None

    def _prepare(self, image: ImageLike) -> tuple:
        rgb = load_image_rgb(image)  # HWC uint8
        boxed = self.letterbox.apply_image(rgb)  # (S, S, 3) uint8
        tensor = torch.from_numpy(np.ascontiguousarray(boxed)).permute(2, 0, 1)  # (3, S, S)
        return tensor, rgb.shape[:2]

    @torch.inference_mode()
    def set_image(self, image: ImageLike) -> None:
        """Encode an image and cache its features.

        image: a path, a PIL image, or an array (HW, HWC; uint8, uint16 or
        float in [0, 1]); any PIL mode; EXIF orientation is honoured.
        """
        tensor, hw = self._prepare(image)
        self._features = self.model.encode_image(tensor[None].to(self.device))
        self._orig_hw = tuple(int(v) for v in hw)

    @torch.inference_mode()
    def predict(self, text: Union[str, Sequence[str]]) -> Prediction:
        """Segment what each expression names in the image given to ``set_image``."""
        if not self.is_image_set:
            raise RuntimeError("Predictor.predict: no image is set; call set_image(image) first.")
        texts = check_expressions(text, "Predictor.predict: expression")
        parts = []
        for i in range(0, len(texts), self.text_batch_size):
            chunk = texts[i : i + self.text_batch_size]
            index = torch.zeros(len(chunk), dtype=torch.long, device=self.device)
            out = self.model.decode(self._features, self.model.encode_text(chunk), index)
            parts.append(self._postprocess(out, [self._orig_hw] * len(chunk)))
        return _concat(parts)

    @torch.inference_mode()
    def predict_batch(
        self, images: Iterable[ImageLike], texts: Iterable[Sequence[str]], images_per_batch: int = 8
    ) -> Iterable[Prediction]:
        """Segment many images, each with its own expressions, in batches.

        Yields one ``Prediction`` per image, in order. The visual encoder
        runs on ``images_per_batch`` images at a time and all their
        expressions are decoded together. Leaves the cached image unchanged.
        """
        pending = []
        for image, exprs in zip(images, texts):
            exprs = [exprs] if isinstance(exprs, str) else list(exprs)
            pending.append((image, exprs))
            if len(pending) == images_per_batch:
                yield from self._run_batch(pending)
                pending = []
        if pending:
            yield from self._run_batch(pending)

    def _run_batch(self, pending: list) -> list:
        tensors, sizes = zip(*(self._prepare(img) for img, _ in pending))
        features = self.model.encode_image(torch.stack(tensors).to(self.device))
        all_texts = [t for _, exprs in pending for t in exprs]
        index = torch.tensor([i for i, (_, exprs) in enumerate(pending) for _ in exprs], device=self.device)
        logits, nt_logits = [], []
        for s in range(0, len(all_texts), self.text_batch_size):
            sl = slice(s, s + self.text_batch_size)
            out = self.model.decode(features, self.model.encode_text(all_texts[sl]), index[sl])
            logits.append(out["mask_logits"])
            nt_logits.append(out["no_target_logits"])
        logits = torch.cat(logits) if logits else None
        nt_logits = torch.cat(nt_logits) if nt_logits else None
        results, start = [], 0
        for i, (_, exprs) in enumerate(pending):
            stop = start + len(exprs)
            hw = tuple(int(v) for v in sizes[i])
            out = {"mask_logits": logits[start:stop], "no_target_logits": nt_logits[start:stop]}
            results.append(self._postprocess(out, [hw] * len(exprs)))
            start = stop
        return results

    def _postprocess(self, out: dict, hws: list) -> Prediction:
        if not hws:
            return Prediction(
                np.zeros((0, 0, 0), bool), np.zeros(0, np.float32), np.zeros(0, bool),
                np.zeros(0, np.float32), np.zeros((0, 0, 0), np.float32), np.zeros((0, 2), np.int64),
            )
        logits = out["mask_logits"].float()  # (B, 1, S, S)
        nt_prob = torch.sigmoid(out["no_target_logits"].float())  # (B,)
        masks, scores, full_logits, points = [], [], [], []
        for i, hw in enumerate(hws):
            lg = self.letterbox.invert(logits[i, 0], hw)  # (H, W)
            prob = torch.sigmoid(lg)
            m = prob > self.mask_threshold
            if nt_prob[i] > 0.5:
                m = torch.zeros_like(m)
            flat = int(torch.argmax(lg).item())
            points.append((flat % hw[1], flat // hw[1]))
            scores.append(float(prob[m].mean()) if m.any() else 0.0)
            masks.append(m.cpu().numpy())
            full_logits.append(lg.cpu().numpy())
        no_target = (nt_prob > 0.5).cpu().numpy()
        return Prediction(
            masks=np.stack(masks),
            scores=np.asarray(scores, dtype=np.float32),
            no_target=no_target,
            no_target_prob=nt_prob.cpu().numpy().astype(np.float32),
            logits=np.stack(full_logits).astype(np.float32),
            points=np.asarray(points, dtype=np.int64),
        )


def _concat(parts: list) -> Prediction:
    if len(parts) == 1:
        return parts[0]
    return Prediction(*(np.concatenate([getattr(p, f) for p in parts]) for f in Prediction.__dataclass_fields__))
