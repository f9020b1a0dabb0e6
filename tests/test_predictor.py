"""Predictor's inference shortcuts give the outputs of the plain path they replace.

Each shortcut is compared with the computation it stands for: the fused
EfficientNet-Lite0 with the encoder it was built from, ``image_context`` +
``decode_context`` with ``decode``, trimmed text padding with full padding,
and the whole ``Predictor`` with ``decode`` on the letterboxed image followed
by the documented post-processing (un-letterbox, sigmoid, threshold, mean
probability inside the mask, argmax). Tolerance: 1e-4 on logits (float32
rounding of a different summation order).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _engine_fixtures import TINY_TEXT, one_thread  # noqa: F401 (autouse fixture: tiny models run faster on one thread)
from _serve_fixtures import tiny_lts

from refseg.data.transforms import Letterbox
from refseg.methods import MODELS
from refseg.modeling.visual import EfficientNetLite0Encoder
from refseg.predictor import Predictor

TOL = 1e-4
TEXTS = ["the red square", "the blue circle left of the star", "it"]  # 6, 9 and 3 tokens: < max_length 12


def _randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so that folding them is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.mark.parametrize("stride2", [False, True])
def test_fused_lite0_matches_the_encoder(stride2):
    encoder = EfficientNetLite0Encoder(pretrained=False, return_stride2=stride2)
    _randomise_batchnorm(encoder)
    fused = encoder.fused()
    assert fused.strides == encoder.strides and fused.channels == encoder.channels
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = encoder(x), fused(x)
    assert len(got) == len(ref) == len(encoder.strides)
    for r, o in zip(ref, got):
        assert o.shape == r.shape and o.is_contiguous()
        assert r.std() > 0.1, "a constant map would make the comparison vacuous"
        assert float((r - o).abs().max()) < TOL * max(1.0, float(r.abs().max()))
    fused.train()
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())


@torch.no_grad()
def test_image_context_split_matches_decode():
    model = tiny_lts()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([1, 0, 1])
    maps = model.encode_image(images)
    txt = model.encode_text(TEXTS)
    ref = model.decode(maps, txt, index)
    got = model.decode_context(model.image_context(maps), txt, index)
    assert ref["mask_logits"].std() > 0.3
    for key in ("mask_logits", "prior_logits", "no_target_logits"):
        assert float((ref[key] - got[key]).abs().max()) < TOL, key


@torch.no_grad()
def test_trimmed_text_gives_the_same_outputs():
    model = tiny_lts()
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    maps, index = model.encode_image(images), torch.zeros(len(TEXTS), dtype=torch.long)
    full, trimmed = model.encode_text(TEXTS), model.encode_text(TEXTS, trim=True)
    longest = max(len(model.text.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert full.tokens.shape[1] == model.text.max_length > trimmed.tokens.shape[1] == longest
    ref, got = model.decode(maps, full, index), model.decode(maps, trimmed, index)
    for key in ("mask_logits", "prior_logits", "no_target_logits"):
        assert float((ref[key] - got[key]).abs().max()) < TOL, key


def _reference(model, image: np.ndarray, texts, threshold: float) -> dict:
    """The definition of a Prediction: decode on the letterboxed image, then per sentence
    un-letterbox, sigmoid, threshold, mean probability inside the mask, argmax."""
    box = Letterbox(model.image_size)
    tensor = torch.from_numpy(box.apply_image(image)).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model.decode(model.encode_image(tensor), model.encode_text(texts), torch.zeros(len(texts), dtype=torch.long))
    h, w = image.shape[:2]
    p = box.params(h, w)
    crop = out["mask_logits"][:, :, : p.new_h, : p.new_w]
    logits = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    prob = torch.sigmoid(logits)
    no_target = torch.sigmoid(out["no_target_logits"]) > 0.5
    masks = (prob > threshold) & ~no_target[:, None, None]
    scores = [float(p_[m].mean()) if m.any() else 0.0 for p_, m in zip(prob, masks)]
    flat = logits.flatten(1).argmax(1)
    return {"logits": logits.numpy(), "masks": masks.numpy(), "scores": np.array(scores),
            "no_target": no_target.numpy(), "points": torch.stack([flat % w, flat // w], 1).numpy()}


@pytest.mark.parametrize("hw", [(57, 93), (64, 64), (120, 64)])
def test_predictor_matches_the_definition(hw):
    model = tiny_lts()
    with torch.no_grad():
        model.head.nt_mlp.fc2.bias.fill_(-30.0)  # every expression names a target: masks are not forced empty
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (*hw, 3)).astype(np.uint8)
    # a threshold that 30% of the pixels pass, so that the masks are neither empty nor full
    threshold = float(torch.sigmoid(torch.tensor(np.quantile(_reference(model, image, TEXTS, 0.5)["logits"], 0.7))))
    ref = _reference(model, image, TEXTS, threshold)
    predictor = Predictor(model, mask_threshold=threshold)
    predictor.set_image(image)
    got = predictor.predict(TEXTS)
    assert got.logits.shape == got.masks.shape == (len(TEXTS), *hw)
    assert np.abs(got.logits - ref["logits"]).max() < TOL
    undecided = np.abs(torch.sigmoid(torch.from_numpy(ref["logits"])).numpy() - threshold) < TOL
    assert ((got.masks == ref["masks"]) | undecided).all()
    assert 0 < got.masks.sum() < got.masks.size, "an all-on or all-off mask would make the comparison vacuous"
    assert np.abs(got.scores - ref["scores"]).max() < TOL
    assert not got.no_target.any()
    assert (got.points == ref["points"]).all()

    with torch.no_grad():
        model.head.nt_mlp.fc2.bias.fill_(30.0)  # now every expression names nothing: empty masks, scores 0
    got = predictor.predict(TEXTS)
    assert got.no_target.all() and not got.masks.any() and (got.scores == 0).all()


def test_predictor_runs_the_fused_encoder_with_the_same_outputs():
    """An LTS on EfficientNet-Lite0: Predictor swaps in the fused encoder (for_inference), same masks."""
    torch.manual_seed(0)
    model = MODELS["lts"](visual="efficientnet-lite0", pretrained=False, text=TINY_TEXT, max_length=12,
                          image_size=64, dim=32, depth=1, heads=2, decoder_widths=[16, 8, 8]).eval()
    _randomise_batchnorm(model.visual)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    predictor = Predictor(model)
    assert type(predictor.model.visual).__name__ == "FusedEfficientNetLite0"
    assert predictor.model.head is model.head and predictor.model.text is model.text
    image = np.random.default_rng(5).integers(0, 256, (50, 70, 3)).astype(np.uint8)
    ref = _reference(model, image, TEXTS, threshold=0.5)
    predictor.set_image(image)
    got = predictor.predict(TEXTS)
    assert np.abs(ref["logits"]).std() > 0.3
    assert np.abs(got.logits - ref["logits"]).max() < 1e-3 * max(1.0, np.abs(ref["logits"]).max())


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 2])
def test_mask_threshold_outside_0_1_is_refused(threshold):
    with pytest.raises(ValueError, match="mask_threshold"):
        Predictor(tiny_lts(), mask_threshold=threshold)


def test_predict_batch_with_an_image_without_expressions():
    model = tiny_lts()
    image = np.random.default_rng(6).integers(0, 256, (40, 30, 3)).astype(np.uint8)
    results = list(Predictor(model).predict_batch([image, image], [[], TEXTS[:1]], images_per_batch=2))
    assert results[0].masks.shape[0] == 0 and results[1].masks.shape == (1, 40, 30)
