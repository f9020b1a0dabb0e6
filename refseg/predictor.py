"""Run a trained model on images of any size, mode and orientation.

Modelled on Segment Anything's ``SamPredictor``: ``set_image`` runs the
visual encoder once and caches its maps (and, for a model with
``image_context``, the language-free part of the head); every ``predict``
call afterwards pays only for the text encoder and the per-sentence head,
so many expressions on one image are cheap.

Inference shortcuts, each with the same outputs up to float rounding: the
model's ``for_inference()`` form when it has one (a faster visual encoder),
``encode_text(..., trim=True)`` when the model accepts it (expressions padded
to the longest one, not to the encoder's max length), and post-processing
that upsamples each logit map once and thresholds it in logit space.

    predictor = Predictor(refseg.load("lts-synthref"))
    predictor.set_image("photo.jpg")
    result = predictor.predict(["the red star", "the blue circle on the left"])
    result.masks        # (N, H, W) bool, full resolution of the input image
"""

from typing import Iterable, Sequence, Union

import numpy as np
import torch

from refseg.data.image import load_image_rgb
from refseg.data.transforms import Letterbox
from refseg.expressions import check_expressions
from refseg.modeling.base import RISModel
from refseg.postprocess import Prediction, postprocess


class ModelOutputError(RuntimeError):
    """The model's outputs hold NaN or infinite values (broken weights, or an input that breaks it)."""


ImageLike = Union[str, "os.PathLike", np.ndarray, "PIL.Image.Image"]  # noqa: F821


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Predictor:
    """Caches one image's visual features and answers expressions about it.

    Arguments:
      model: a ``refseg.modeling.RISModel`` (see docs/DESIGN.md); it is put in
        eval mode and its ``for_inference()`` form answers.
      mask_threshold: probability above which a pixel is foreground, in (0, 1).
      text_batch_size: expressions decoded per forward pass.
    """

    def __init__(self, model: torch.nn.Module, mask_threshold: float = 0.5, text_batch_size: int = 32):
        if not 0.0 < float(mask_threshold) < 1.0:
            raise ValueError(f"Predictor: mask_threshold must be in (0, 1), got {mask_threshold!r}")
        if not isinstance(model, RISModel):
            raise TypeError(f"Predictor: model must be a refseg.modeling.RISModel, got {type(model).__name__}")
        model = model.eval()
        self.model = model.for_inference()
        self.device = _device_of(self.model)
        self.mask_threshold = float(mask_threshold)
        self.text_batch_size = int(text_batch_size)
        self.letterbox = Letterbox(model.image_size)
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

    def _encode_image(self, images: torch.Tensor) -> list:
        """(B, 3, S, S) uint8 -> what ``_decode`` reads: ``image_context(maps)``."""
        return self.model.image_context(self.model.encode_image(images.to(self.device)))

    def _decode(self, features: list, texts: Sequence[str], index: torch.Tensor) -> dict:
        txt = self.model.encode_text(texts, trim=True)
        return self.model.decode_context(features, txt, index)

    @torch.inference_mode()
    def set_image(self, image: ImageLike) -> None:
        """Encode an image and cache its features.

        image: a path, a PIL image, or an array (HW, HWC; uint8, uint16 or
        float in [0, 1]); any PIL mode; EXIF orientation is honoured.
        """
        tensor, hw = self._prepare(image)
        self._features = self._encode_image(tensor[None])
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
            parts.append(self._postprocess(self._decode(self._features, chunk, index), self._orig_hw))
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
        features = self._encode_image(torch.stack(tensors))
        all_texts = [t for _, exprs in pending for t in exprs]
        index = torch.tensor([i for i, (_, exprs) in enumerate(pending) for _ in exprs], device=self.device)
        logits, nt_logits = [], []
        for s in range(0, len(all_texts), self.text_batch_size):
            sl = slice(s, s + self.text_batch_size)
            out = self._decode(features, all_texts[sl], index[sl])
            logits.append(out["mask_logits"])
            nt_logits.append(out["no_target_logits"])
        logits = torch.cat(logits) if logits else None
        nt_logits = torch.cat(nt_logits) if nt_logits else None
        results, start = [], 0
        for i, (_, exprs) in enumerate(pending):
            stop = start + len(exprs)
            hw = tuple(int(v) for v in sizes[i])
            out = {"mask_logits": logits[start:stop], "no_target_logits": nt_logits[start:stop]}
            results.append(self._postprocess(out, hw))
            start = stop
        return results

    def _postprocess(self, out: dict, hw: tuple) -> Prediction:
        """Decoder outputs for B sentences about one image of size ``hw`` -> Prediction at full resolution.

        Refuses non-finite outputs (ModelOutputError), then calls
        ``refseg.postprocess.postprocess``, the post-processing `refseg eval` scores.
        """
        if out["mask_logits"] is None or out["mask_logits"].shape[0] == 0:  # an image with no expressions
            return Prediction(
                np.zeros((0, 0, 0), bool), np.zeros(0, np.float32), np.zeros(0, bool),
                np.zeros(0, np.float32), np.zeros((0, 0, 0), np.float32), np.zeros((0, 2), np.int64),
            )
        for key in ("mask_logits", "no_target_logits"):  # NaN would become empty masks and NaN scores, silently
            bad = ~torch.isfinite(out[key].reshape(len(out[key]), -1)).all(1)  # (B,)
            if bool(bad.any()):
                raise ModelOutputError(f"the model's {key} hold NaN or infinite values for {int(bad.sum())} of "
                                       f"{len(bad)} expressions; its weights or this input break it")
        return postprocess(out["mask_logits"], out["no_target_logits"], hw, self.letterbox, self.mask_threshold)


def _concat(parts: list) -> Prediction:
    if len(parts) == 1:
        return parts[0]
    return Prediction(*(np.concatenate([getattr(p, f) for p in parts]) for f in Prediction.__dataclass_fields__))
