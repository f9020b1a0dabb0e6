"""Encoders and models: one smoke test over MODELS on tiny random encoders,
a consistency test of the two execution paths, the real offline encoders once."""

import dataclasses
import json

import pytest
import torch
from _engine_fixtures import one_thread  # noqa: F401 (autouse fixture: tiny models run faster on one thread)

from refseg.methods import MODELS, build_model
from refseg.methods.lts.loss import lts_loss
from refseg.modeling import ModelConfigError, build_text, build_visual

TINY_VISUAL = {"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}
TINY_TEXT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
S = 64
ENCODERS = dict(visual=TINY_VISUAL, text=TINY_TEXT, max_length=12, image_size=S)
# Every entry of MODELS needs a tiny configuration here.
TINY = {
    "lts": dict(ENCODERS, dim=32, depth=1, heads=2, decoder_widths=[16, 8, 8]),
    "sag": dict(ENCODERS, dim=32, num_slots=6, iters=2, heads=2, decoder_hidden=32),
    "pks": dict(ENCODERS, dim=32, depth=1, heads=2, fpn_width=16),
}
TEXTS = [
    "the large red star",
    "the blue circle on the left",
    "the leftmost green square",
    "the red star left of the blue circle",
]


def _images(n, size=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _tiny(name, **kwargs):
    torch.manual_seed(0)
    return MODELS[name](**{**TINY[name], **kwargs})


def test_every_model_has_a_tiny_config():
    assert set(TINY) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_smoke(name):
    """Forward + backward, the output contract, no NaNs, config round trip."""
    model = _tiny(name)
    out = model(_images(2), TEXTS[:2])
    assert out["mask_logits"].shape == (2, 1, S, S)
    assert out["prior_logits"].dim() == 4 and out["prior_logits"].shape[:2] == (2, 1)
    assert out["no_target_logits"].shape == (2,)
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    scalar = sum(v.float().mean() for v in out.values() if v.is_floating_point() and v.requires_grad)
    scalar.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n, _ in trainable)  # encoders frozen by default
    assert any(p.grad is not None for _, p in trainable)
    for n, p in trainable:
        assert p.grad is None or torch.isfinite(p.grad).all(), n

    # model.config is JSON and rebuilds the same architecture
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        a, b = model(_images(1, seed=3), TEXTS[:1]), rebuilt(_images(1, seed=3), TEXTS[:1])
    assert torch.allclose(a["mask_logits"], b["mask_logits"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decode_shares_images_like_forward(name):
    model = _tiny(name).eval()
    images = _images(2, seed=1)
    index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        shared = model.decode(model.encode_image(images), model.encode_text(TEXTS), index)
        direct = model(images[index], TEXTS)
        half = model.decode([m.half() for m in model.encode_image(images)], model.encode_text(TEXTS), index)
    for key in ("mask_logits", "prior_logits", "no_target_logits"):
        assert torch.allclose(shared[key], direct[key], atol=1e-5), key
    assert half["mask_logits"].dtype == torch.float32  # fp16 cached maps are accepted


def test_lts_loss_trains_every_head_parameter():
    model = _tiny("lts")
    out = model(_images(2), TEXTS[:2])
    assert out["prior_logits"].shape == (2, 1, S // 16, S // 16)
    mask = torch.zeros(2, 1, S, S)
    mask[0, :, 8:24, 8:24] = 1
    losses = lts_loss(out, {"mask": mask, "no_target": torch.tensor([False, True])})
    losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    for n, p in model.head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_unfrozen_encoders_train():
    model = _tiny("lts", freeze_visual=False, freeze_text=False)
    out = model(_images(2), TEXTS[:2])
    (out["mask_logits"].mean() + out["prior_logits"].mean() + out["no_target_logits"].mean()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text.parameters())
    model.train()
    assert model.visual.training and model.text.training


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "swin", "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2},
        {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
        {"model_type": "dinov2", "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
         "intermediate_size": 32, "patch_size": 8},
    ],
    ids=lambda c: c["model_type"],
)
def test_hf_backbones_give_a_four_level_pyramid(config):
    encoder = build_visual(config)
    maps = encoder(torch.randn(1, 3, 64, 64))
    assert encoder.strides == (4, 8, 16, 32)
    assert [m.shape[1] for m in maps] == list(encoder.channels)
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]


def test_hf_text_encoder_roberta():
    encoder = build_text(dict(TINY_TEXT, model_type="roberta"), max_length=12)
    tokens, sentence = encoder(**encoder.tokenize(["the red star", "a much longer expression than that"]))
    assert tokens.shape == (2, 12, 32) and sentence.shape == (2, 32)


# The real offline encoders, loaded once for the tests below.


@pytest.fixture(scope="module")
def real_lts():
    torch.manual_seed(0)
    return MODELS["lts"]()


def test_real_encoders_at_320(real_lts):
    model = real_lts
    model.train()
    assert not model.visual.training and not model.text.training and model.head.training
    images = _images(2, 320)
    vis = model.encode_image(images)
    shapes = [(16, 160, 160), (24, 80, 80), (40, 40, 40), (112, 20, 20), (320, 10, 10)]
    assert [tuple(m.shape[1:]) for m in vis] == shapes
    txt = model.encode_text(TEXTS[:3])
    assert txt.tokens.shape == (3, 24, 384) and txt.sentence.shape == (3, 384) and txt.mask.dtype == torch.bool
    assert txt.mask[0].sum() == 6  # [CLS] the large red star [SEP]
    out = model.decode(vis, txt, torch.tensor([0, 0, 1]))
    assert out["mask_logits"].shape == (3, 1, 320, 320) and out["prior_logits"].shape == (3, 1, 20, 20)
    loss = lts_loss(out, {"mask": torch.zeros(3, 1, 320, 320)})["loss"]
    loss.backward()
    assert all(p.grad is None for p in model.visual.parameters())
    assert all(p.grad is None for p in model.text.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    model.head.zero_grad(set_to_none=True)


def test_real_text_encoder_embeds_path(real_lts):
    text = real_lts.text
    batch = text.tokenize(["the red star", "the blue circle on the left"])
    tokens, sentence = text(**batch)
    embeds = text.embed_tokens(batch["input_ids"]).detach().requires_grad_(True)
    tokens2, sentence2 = text.forward_embeds(embeds, batch["attention_mask"])
    assert torch.allclose(sentence, sentence2, atol=1e-5)
    sentence2.sum().backward()  # prompts can be learnt through the frozen encoder
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    s = torch.nn.functional.normalize(sentence, dim=-1)
    assert 0.3 < float(s[0] @ s[1]) < 0.99  # related, not identical: real pretrained weights


def test_truncated_minilm_is_the_full_one_stopped_early(real_lts):
    """text_depth=k keeps MiniLM's first k pretrained layers: its tokens are the full encoder's k-th hidden state."""
    full = real_lts.text
    batch = full.tokenize(["the red star left of the blue circle", "the leftmost green square"])
    with torch.no_grad():
        hidden = full.model(**batch, output_hidden_states=True).hidden_states  # embeddings + one per layer
        short = build_text("minilm", depth=2)
        tokens, sentence = short(**batch)
    assert len(short.model.encoder.layer) == 2 and short.dim == 384
    assert torch.allclose(tokens, hidden[2], atol=1e-5)
    assert not torch.allclose(tokens, hidden[6], atol=1e-2)
    mask = batch["attention_mask"][..., None].float()
    assert torch.allclose(sentence, (hidden[2] * mask).sum(1) / mask.sum(1), atol=1e-5)
    assert not any(p.requires_grad for p in short.parameters())  # frozen like the full one


def test_text_depth_in_config_and_cache_key():
    from refseg.engine.cache import encoder_fingerprint

    short = _tiny("lts", text=dict(TINY_TEXT, num_hidden_layers=3), text_depth=2)
    assert short.config["text_depth"] == 2 and len(short.text.model.encoder.layer) == 2
    again = build_model(json.loads(json.dumps(short.config)))
    assert len(again.text.model.encoder.layer) == 2
    whole = _tiny("lts", text=dict(TINY_TEXT, num_hidden_layers=3))
    assert "text_depth" not in whole.config  # configs of whole encoders (every shipped one) are unchanged
    assert len(whole.text.model.encoder.layer) == 3
    assert encoder_fingerprint(short) != encoder_fingerprint(whole)
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"text_depth'? must be .*in 1\\.\\.(3|64).*got {bad}"):
            _tiny("lts", text=dict(TINY_TEXT, num_hidden_layers=3), text_depth=bad)


# ---- the method registry and the model interface ---------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_class_lists_exactly_the_factory_arguments_with_their_defaults(name):
    import inspect

    from refseg.methods import METHODS
    from refseg.modeling.limits import head_defaults, known_fields

    method = METHODS[name]
    head = type(_tiny(name).head)
    fields = {f.name: f.default for f in dataclasses.fields(method.config)}
    assert set(fields) == set(known_fields(method.build, head))
    factory = {n: p.default for n, p in inspect.signature(method.build).parameters.items()
               if p.default is not p.empty}
    for field, default in {**head_defaults(head), **factory}.items():
        assert fields[field] == default, field
    method.config().validate()


def test_config_class_refuses_bad_fields_through_the_model_limits():
    from refseg.methods import METHODS

    with pytest.raises(ModelConfigError, match="'image_size'"):
        METHODS["lts"].config(image_size=100).validate()
    with pytest.raises(ModelConfigError, match="'num_slots'"):
        METHODS["sag"].config.from_dict({"model": "sag", "num_slots": 0})
    with pytest.raises(ModelConfigError, match="'nope' is not an argument of 'pks'"):
        METHODS["pks"].config.from_dict({"nope": 1})


def test_no_model_file_imports_a_loss_or_an_augmentation():
    import ast
    from pathlib import Path

    import refseg

    root = Path(refseg.__file__).parent
    for path in [*root.glob("methods/*/model.py"), *root.glob("modeling/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                assert not any(bad in name for bad in ("loss", "augment", "word_negatives", ".train", "engine")), \
                    f"{path.relative_to(root)} imports {name}"


def test_predictor_refuses_a_module_that_is_not_a_model():
    from refseg.predictor import Predictor

    with pytest.raises(TypeError, match="RISModel"):
        Predictor(torch.nn.Linear(2, 2))
