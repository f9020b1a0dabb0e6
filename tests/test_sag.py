"""SaG (Shatter and Gather), trained from text alone: the model, its loss, and
training through the real engine on SynthRef stripped of every mask, box and click."""

import csv
import json
import math
import pickle
import shutil

import pytest
import torch
from _engine_fixtures import TINY_TEXT, TINY_VISUAL, one_thread  # noqa: F401 (autouse fixture)

from refseg.losses import info_nce
from refseg.methods import MODELS, build_model
from refseg.methods.sag.loss import sag_text_loss
from refseg.methods.sag.model import SlotAttention
from refseg.methods.sag.train import teacher_forcing

S = 64
TINY_SAG = dict(visual=TINY_VISUAL, text=TINY_TEXT, max_length=12, dim=32, num_slots=6, iters=2, heads=2,
                decoder_hidden=32)
TEXTS = ["the large red star", "the blue circle on the left", "the leftmost green square",
         "the red star left of the blue circle"]


def _images(n, size=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _tiny(**kwargs):
    torch.manual_seed(0)
    return MODELS["sag"](image_size=S, **{**TINY_SAG, **kwargs})


# ---- model ----------------------------------------------------------------------------


def test_sag_smoke_forward_backward_shapes():
    model = _tiny()
    index = torch.tensor([0, 0, 1, 1])
    out = model.decode(model.encode_image(_images(2)), model.encode_text(TEXTS), index)
    K, D, g = 6, 32, S // 16
    shapes = {"mask_logits": (4, 1, S, S), "prior_logits": (4, 1, g, g), "no_target_logits": (4,),
              "text_embedding": (4, D), "gathered": (4, 2, D), "logit_scale": (), "relevance": (4, K),
              "slot_attn": (2, K, g, g), "recon_mse": (2,), "hard_negative_weight": (), "contrast_weight": ()}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert (out["no_target_logits"] < -4).all()  # never fires untrained
    batch = {"image_index": index, "ref_id": torch.tensor([1, 2, 3, 3]), "no_target": torch.zeros(4, dtype=torch.bool)}
    losses = sag_text_loss(out, batch)
    losses["loss"].backward()
    for key, value in {**out, **losses}.items():
        assert torch.isfinite(value).all(), key
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n, _ in trainable)  # encoders frozen by default
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n

    # model.config is JSON and rebuilds the same architecture
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        a, b = model(_images(1), TEXTS[:1]), rebuilt(_images(1), TEXTS[:1])
    assert torch.allclose(a["mask_logits"], b["mask_logits"])


def test_sag_decode_shares_images_like_forward():
    model = _tiny().eval()
    images = _images(2, seed=1)
    index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        vis = model.encode_image(images)
        shared = model.decode(vis, model.encode_text(TEXTS), index)
        direct = model(images[index], TEXTS)
        half = model.decode([m.half() for m in vis], model.encode_text(TEXTS), index)
    assert len(vis) == 2  # only the stride-16 and stride-32 maps are kept (and cached)
    for key in ("mask_logits", "prior_logits", "no_target_logits", "text_embedding", "relevance"):
        assert torch.allclose(shared[key], direct[key], atol=1e-5), key
    # direct's image j is shared's image index[j]
    assert torch.allclose(shared["gathered"][:, index], direct["gathered"], atol=1e-5)
    assert half["mask_logits"].dtype == torch.float32


def test_slot_attention_is_a_softmax_over_slots():
    torch.manual_seed(0)
    sa = SlotAttention(dim=16, num_slots=5, iters=3)
    slots, attn = sa(torch.randn(3, 40, 16))
    assert slots.shape == (3, 5, 16) and attn.shape == (3, 5, 40)
    assert (attn >= 0).all() and torch.allclose(attn.sum(1), torch.ones(3, 40), atol=1e-5)
    out = _tiny()(_images(2), TEXTS[:2])
    assert torch.allclose(out["slot_attn"].sum(1), torch.ones(2, S // 16, S // 16), atol=1e-5)
    assert torch.allclose(out["relevance"].sum(1), torch.ones(2), atol=1e-5)


def test_gaussian_slots_sum_to_one_and_eval_is_deterministic():
    torch.manual_seed(0)
    sa = SlotAttention(dim=16, num_slots=5, iters=3, init="gaussian")
    x = torch.randn(3, 40, 16)
    slots, attn = sa(x)  # training mode: fresh noise
    assert torch.allclose(attn.sum(1), torch.ones(3, 40), atol=1e-5)
    assert not torch.allclose(sa(x)[0], slots)  # stochastic in training
    sa.eval()
    a, b = sa(x)[0], sa(x)[0]
    assert torch.equal(a, b)  # the fixed eval seed
    assert torch.allclose(sa(x[1:2])[0], a[1:2], atol=1e-6)  # an image's slots do not depend on its batch
    assert set(dict(sa.named_parameters())) >= {"slots_mu", "slots_log_sigma"} and not hasattr(sa, "slots_init")
    with pytest.raises(ValueError, match="slot init"):
        SlotAttention(dim=16, num_slots=5, init="uniform")

    model = _tiny(slot_init="gaussian", iters=4).eval()
    with torch.no_grad():
        o1, o2 = model(_images(2), TEXTS[:2]), model(_images(2), TEXTS[:2])
    assert torch.equal(o1["mask_logits"], o2["mask_logits"])
    assert torch.allclose(o1["slot_attn"].sum(1), torch.ones(2, S // 16, S // 16), atol=1e-5)


def test_rgb_map_is_encoded_cached_and_reconstructed():
    from refseg.engine.cache import encoder_fingerprint

    model = _tiny(rgb=True)
    images = _images(2)
    vis = model.encode_image(images)
    assert len(vis) == 3 and vis[-1].shape == (2, 3, S // 16, S // 16)
    expected = torch.nn.functional.avg_pool2d(images.float() / 255, 16)
    assert torch.allclose(vis[-1], expected, atol=1e-5) and not vis[-1].requires_grad
    out = model.decode(vis, model.encode_text(TEXTS[:2]), torch.tensor([0, 1]))
    assert out["mask_logits"].shape == (2, 1, S, S) and torch.isfinite(out["recon_mse"]).all()
    # the colour term is part of recon_mse: without its weight the error is smaller
    head = model.head
    with torch.no_grad():
        full = head.shatter(vis)[2]
        head.rgb_weight = 0.0
        feat_only = head.shatter(vis)[2]
    assert (full > feat_only).all()
    with pytest.raises(ValueError, match="rgb"):  # features cached without the colour map
        model.decode(_tiny().encode_image(images), model.encode_text(TEXTS[:1]), torch.tensor([0]))
    # the colour map changes what encode_image returns, so the feature cache key; the default key is unchanged
    assert encoder_fingerprint(model) != encoder_fingerprint(_tiny())
    assert encoder_fingerprint(_tiny()) == encoder_fingerprint(_tiny(slot_init="gaussian"))
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.head.rgb


def test_slot_input_rgb_makes_the_slots_read_colour_only():
    model = _tiny(rgb=True, slot_input="rgb")
    assert model.head.feat_in.fc1.in_features == 3
    images = _images(2)
    vis = model.encode_image(images)
    with torch.no_grad():
        slots, attn, recon, _ = model.head.shatter(vis)
        # the encoder maps may change at will: the slots (colour + position only) do not move
        changed = [m + 5.0 for m in vis[:-1]] + [vis[-1]]
        slots2, attn2, _, _ = model.head.shatter(changed)
        assert torch.allclose(slots, slots2, atol=1e-5) and torch.allclose(attn, attn2, atol=1e-5)
        # ... but the reconstruction target still holds the features (layer-normalised: change their pattern)
        scrambled = [m.flip(-1) for m in vis[:-1]] + [vis[-1]]
        assert not torch.allclose(recon, model.head.shatter(scrambled)[2])
        # while a change of colour moves the slots
        slots3 = model.head.shatter(vis[:-1] + [vis[-1].flip(-1)])[0]
    assert not torch.allclose(slots, slots3, atol=1e-4)
    with pytest.raises(ValueError, match="slot_input"):
        _tiny(slot_input="rgb")  # needs the colour map
    with pytest.raises(ValueError, match="slot_input"):
        _tiny(rgb=True, slot_input="pixels")


def test_pretrain_steps_turn_the_contrastive_terms_on_later():
    model = _tiny(pretrain_steps=2)
    vis, txt = model.encode_image(_images(2)), model.encode_text(TEXTS)
    index = torch.tensor([0, 0, 1, 1])
    batch = {"image_index": index, "ref_id": torch.tensor([1, 2, 3, 4])}
    model.eval()
    with torch.no_grad():
        assert model.decode(vis, txt, index)["contrast_weight"].item() == 0.0  # eval does not count
    model.train()
    weights = []
    for _ in range(3):
        model.zero_grad()
        out = model.decode(vis, txt, index)
        losses = sag_text_loss(out, batch)
        losses["loss"].backward()
        weights.append(out["contrast_weight"].item())
        if weights[-1] == 0.0:  # reconstruction alone: the loss is recon, the gather learns nothing
            assert losses["loss"].item() == pytest.approx(losses["recon"].item(), rel=1e-6)
            assert model.head.gather_q.weight.grad is None or not model.head.gather_q.weight.grad.any()
    assert weights == [0.0, 0.0, 1.0]
    assert int(model.state_dict()["head.steps_seen"]) == 3  # saved with the weights: a resumed run keeps its phase
    assert "head.steps_seen" not in _tiny().state_dict()  # default models keep their state keys


def test_detach_slots_keeps_the_contrastive_gradient_out_of_the_shatter_stage():
    model = _tiny(detach_slots=True)
    out = model.decode(model.encode_image(_images(2)), model.encode_text(TEXTS), torch.tensor([0, 0, 1, 1]))
    losses = sag_text_loss(out, {"image_index": torch.tensor([0, 0, 1, 1]), "ref_id": torch.tensor([1, 2, 3, 4])},
                           w_recon=0.0)
    losses["loss"].backward()  # the contrastive terms alone
    assert model.head.slot_attention.q.weight.grad is None or not model.head.slot_attention.q.weight.grad.any()
    assert model.head.gather_q.weight.grad.abs().sum() > 0


def test_mask_is_the_min_max_normalised_map_thresholded_at_half():
    out = _tiny()(_images(2), TEXTS[:2])
    m = torch.sigmoid(out["prior_logits"]).flatten(1)  # the normalised map on the grid
    assert torch.allclose(m.amin(1), torch.zeros(2), atol=1e-3)
    assert torch.allclose(m.amax(1), torch.ones(2), atol=1e-3)
    expected = torch.einsum("bk,bkhw->bhw", out["relevance"], out["slot_attn"])  # images are 0, 1
    lo, hi = expected.flatten(1).amin(1), expected.flatten(1).amax(1)
    expected = (expected - lo[:, None, None]) / (hi - lo)[:, None, None]
    assert torch.allclose(m.view(2, S // 16, S // 16), expected, atol=1e-3)
    up = torch.nn.functional.interpolate(expected[:, None], size=(S, S), mode="bilinear", align_corners=False)
    assert torch.equal(out["mask_logits"] > 0, up > 0.5)


# ---- loss -----------------------------------------------------------------------------


def _loss_out(e, g, scale=1.0, hard_weight=1.0):
    B, M = g.shape[:2]
    return {"text_embedding": e, "gathered": g, "logit_scale": torch.tensor(scale),
            "recon_mse": torch.zeros(M), "no_target_logits": torch.full((B,), -30.0),
            "hard_negative_weight": torch.tensor(hard_weight)}


def test_infonce_hand_computed_2x2():
    # two sentences, two images, unit embeddings e_0 = (1, 0), e_1 = (0, 1), scale 1
    e = torch.eye(2)
    batch = {"image_index": torch.tensor([0, 1]), "ref_id": torch.tensor([10, 11])}
    # aligned: each sentence gathers e_j from image j -> logits [[1, 0], [0, 1]]:
    # -log(e^1 / (e^1 + e^0)) = log(1 + e^-1) = 0.313262 per row
    aligned = e[None].expand(2, 2, 2)  # gathered[t, j] = e_j
    # shuffled: images swapped -> logits [[0, 1], [1, 0]]: log(1 + e^1) = 1.313262
    shuffled = e.flip(0)[None].expand(2, 2, 2)
    a = sag_text_loss(_loss_out(e, aligned), batch)
    s = sag_text_loss(_loss_out(e, shuffled), batch)
    assert a["infonce"].item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert s["infonce"].item() == pytest.approx(math.log(1 + math.exp(1)), rel=1e-6)
    assert a["infonce"] < s["infonce"]
    assert (a["acc_image"].item(), s["acc_image"].item()) == (1.0, 0.0)
    assert a["hard"].item() == 0.0  # different images: no same-image hard negatives
    assert a["loss"].item() == pytest.approx(a["infonce"].item() + 0.1 * math.log(1 + math.exp(-30)), rel=1e-6)
    # the helper on its own, scale 2: rows [2, 0] and [0, 2] -> log(1 + e^-2)
    assert info_nce(2 * torch.eye(2), torch.tensor([0, 1])).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_hard_negatives_hand_computed():
    # two sentences about different objects of the same image (one image in the batch)
    e = torch.eye(2)
    batch = {"image_index": torch.tensor([0, 0]), "ref_id": torch.tensor([1, 2])}
    # each query gathers what its own text embedding describes: g[t, 0] = e_t
    # row t: positive e_t . g[t, 0] = 1, negative e_t . g[t', 0] = 0 -> log(1 + e^-1)
    specific = e[:, None, :]  # (B=2, B_img=1, D=2)
    out = sag_text_loss(_loss_out(e, specific), batch)
    assert out["hard"].item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert out["infonce"].item() == pytest.approx(0.0, abs=1e-7)  # one image: nothing to tell apart
    # both queries gather the same mixture: positive == negative -> log 2, whatever it is
    same = torch.nn.functional.normalize(torch.ones(2, 1, 2), dim=-1)
    assert sag_text_loss(_loss_out(e, same), batch)["hard"].item() == pytest.approx(math.log(2), rel=1e-6)
    # sentences of the same ref are not negatives of each other
    assert sag_text_loss(_loss_out(e, same), {**batch, "ref_id": torch.tensor([1, 1])})["hard"].item() == 0.0
    # a no-target sentence is neither an anchor nor a negative
    nt = sag_text_loss(_loss_out(e, specific), {**batch, "no_target": torch.tensor([False, True])})
    assert nt["hard"].item() == 0.0
    # the flag: hard_negative_weight 0 leaves the term out of the total (it is still logged)
    off = sag_text_loss(_loss_out(e, specific, hard_weight=0.0), batch)
    assert off["hard"].item() == pytest.approx(out["hard"].item())
    assert off["loss"].item() == pytest.approx(out["loss"].item() - out["hard"].item(), rel=1e-6)
    assert _tiny(hard_negatives=0.0)(_images(1), TEXTS[:1])["hard_negative_weight"].item() == 0.0


def test_agree_hand_computed():
    # three sentences: 0 and 1 about one object of image 0, 2 about another object of image 0; 3 on image 1
    e = torch.eye(4)
    g = e[:, None, :].expand(4, 2, 4).contiguous()
    rel = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.0, 0.8], [1.0, 0.0, 0.0]])
    batch = {"image_index": torch.tensor([0, 0, 0, 1]), "ref_id": torch.tensor([7, 7, 8, 9])}
    out = {**_loss_out(e, g), "relevance": rel}
    got = sag_text_loss(out, batch, w_agree=1.0)
    eps = 1e-6
    # pairs (ordered) within image 0: (0,1) same ref a = 0.5; (0,2) other ref a = 0.1; (1,2) other ref a = 0.2
    expected = 2 * (-math.log(0.5 + eps) - math.log(0.9 + eps) - math.log(0.8 + eps)) / 6
    assert got["agree"].item() == pytest.approx(expected, rel=1e-5)
    base = sag_text_loss(out, batch)  # w_agree 0 by default: logged, not in the total
    assert base["agree"].item() == pytest.approx(expected, rel=1e-5)
    assert got["loss"].item() == pytest.approx(base["loss"].item() + expected, rel=1e-5)
    # agreeing selections cost nothing: same ref picks the same entity, other refs others
    sharp = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert sag_text_loss({**out, "relevance": sharp}, batch, w_agree=1.0)["agree"].item() == pytest.approx(
        -math.log(1 + eps), abs=1e-5)
    # the gradient reaches the relevance
    r = rel.clone().requires_grad_(True)
    sag_text_loss({**out, "relevance": r}, batch, w_agree=1.0)["loss"].backward()
    assert r.grad.abs().sum() > 0 and (r.grad[3] == 0).all()  # sentence 3 has no partner in its image


def test_distill_hand_computed():
    # image 0: sentences 0 and 1 name one object (ref 7), sentence 2 another (ref 8); 3 is alone on image 1
    e = torch.eye(4)
    g = e[:, None, :].expand(4, 2, 4).contiguous()
    rel = torch.tensor([[0.9, 0.1, 0.0], [0.4, 0.3, 0.3], [0.0, 0.05, 0.95], [1.0, 0.0, 0.0]])
    batch = {"image_index": torch.tensor([0, 0, 0, 1]), "ref_id": torch.tensor([7, 7, 8, 9])}
    out = {**_loss_out(e, g), "relevance": rel}
    eps = 1e-6
    # same ref: 0 (max 0.9) teaches 1 (max 0.4)
    pos = -(0.9 * math.log(0.4 + eps) + 0.1 * math.log(0.3 + eps))
    # other ref: 2 (max 0.95) teaches 1 (overlap 0.3 * 0.05 + 0.3 * 0.95 = 0.3) and 0 (overlap 0.1 * 0.05)
    neg = (-math.log(1 - 0.3 + eps) - math.log(1 - 0.005 + eps)) / 2
    base = sag_text_loss(out, batch)
    got = sag_text_loss(out, batch, w_distill=1.0, w_distill_neg=0.5)
    assert got["distill"].item() == pytest.approx(pos, rel=1e-5)
    assert got["distill_neg"].item() == pytest.approx(neg, rel=1e-5)
    assert base["distill"].item() == 0.0  # off by default: not computed
    assert got["loss"].item() == pytest.approx(base["loss"].item() + pos + 0.5 * neg, rel=1e-5)
    # the teacher gets no gradient: sentence 2 is the sharpest of its image, 3 has no partner
    r = rel.clone().requires_grad_(True)
    sag_text_loss({**out, "relevance": r}, batch, w_distill=1.0, w_distill_neg=1.0)["loss"].backward()
    assert (r.grad[2] == 0).all() and (r.grad[3] == 0).all()
    assert r.grad[1].abs().sum() > 0 and r.grad[0].abs().sum() > 0  # 0 learns from 2 (another ref)
    # a sharpened teacher: T ~ rel^(1/tau), tau 0.5 -> row 0 is (0.81, 0.01, 0) / 0.82
    hot = sag_text_loss(out, batch, w_distill=1.0, distill_temperature=0.5)
    sharp = -(0.81 * math.log(0.4 + eps) + 0.01 * math.log(0.3 + eps)) / 0.82
    assert hot["distill"].item() == pytest.approx(sharp, rel=1e-5)
    # a student that already picks its teacher's entity, and nothing of the other ref's, pays ~nothing
    agreed = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.01, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    done = sag_text_loss({**out, "relevance": agreed}, batch, w_distill=1.0, w_distill_neg=1.0)
    assert done["distill"].item() == pytest.approx(-math.log(0.99 + eps), abs=1e-5)
    assert done["distill_neg"].item() == pytest.approx(0.0, abs=1e-5)


def test_word_swaps_by_hand():
    from refseg.data.word_negatives import COLOURS, word_negatives, word_swaps

    others = [c for c in COLOURS if c != "purple"]
    assert word_swaps("the purple hexagon") == [f"the {c} hexagon" for c in others]
    assert word_swaps("The leftmost star") == ["The rightmost star"]
    assert word_swaps("Left of it") == ["Right of it"]  # the first letter's case is kept
    # every replaceable word, in order: size, colour, relation
    swaps = word_swaps("the small red star left of the cross")
    assert swaps[0] == "the large red star left of the cross"
    assert swaps[-1] == "the small red star right of the cross"
    assert len(swaps) == 1 + (len(COLOURS) - 1) + 1
    assert word_swaps("the gray ship") == [f"the {c} ship" for c in COLOURS if c != "grey"]  # gray = grey
    assert word_swaps("the hexagon") == [] and word_swaps("") == []
    assert word_swaps("redo the bluebird") == []  # whole words only
    # draws: distinct, from the swaps, at most n, reproducible from the generator
    negs = word_negatives("the small red star", 3, torch.Generator().manual_seed(0))
    assert len(negs) == 3 == len(set(negs)) and set(negs) <= set(word_swaps("the small red star"))
    assert negs == word_negatives("the small red star", 3, torch.Generator().manual_seed(0))
    assert word_negatives("the leftmost star", 5) == ["the rightmost star"]
    assert word_negatives("the star", 2) == [] and word_negatives("the red star", 0) == []


def test_word_negative_loss_hand_computed():
    # sentences 0, 1 on image 0, sentence 2 on image 1; scale 2; own gathered g[t, own image]
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 0.0]], [[0.0, 1.0], [0.8, 0.6]]])
    batch = {"image_index": torch.tensor([0, 0, 1]), "ref_id": torch.tensor([1, 2, 3])}
    en = torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])  # negatives 0, 1 of sentence 0; 2 of sentence 2
    out = {**_loss_out(e, g, scale=2.0), "word_negative_embedding": en, "word_negative_of": torch.tensor([0, 0, 2])}
    # sentence 0 (own g (1, 0)): positive 2 * 1, negatives 2 * 0 and 2 * 0.6
    t0 = math.log(math.exp(2.0) + math.exp(0.0) + math.exp(1.2)) - 2.0
    # sentence 2 (own g = g[2, 1] = (0.8, 0.6)): positive 2 * 0.8, negative 2 * (0.64 + 0.36) = 2
    t2 = math.log(math.exp(1.6) + math.exp(2.0)) - 1.6
    got = sag_text_loss(out, batch)
    assert got["word"].item() == pytest.approx((t0 + t2) / 2, rel=1e-5)
    assert got["acc_word"].item() == pytest.approx(0.5)  # sentence 0 wins, sentence 2 loses
    base = sag_text_loss(_loss_out(e, g, scale=2.0), batch)
    assert base["word"].item() == 0.0 and base["acc_word"].item() == 0.0  # no negatives: no term
    half = sag_text_loss(out, batch, w_word=0.5)
    assert half["loss"].item() == pytest.approx(base["loss"].item() + 0.5 * (t0 + t2) / 2, rel=1e-5)
    # a no-target sentence is no anchor; its negatives are ignored
    nt = sag_text_loss(out, {**batch, "no_target": torch.tensor([False, False, True])})
    assert nt["word"].item() == pytest.approx(t0, rel=1e-5)


def test_word_negatives_reach_the_head():
    model = _tiny(word_negatives=2)
    batch = {"text": ["the large red star", "the star", "the blue circle on the left"],
             "no_target": torch.tensor([False, False, True])}
    extra = teacher_forcing(model, batch)
    of = extra["word_negative_of"].tolist()
    assert of == [0, 0]  # 2 for the first; "the star" has no word to swap; the no-target one gets none
    assert extra["word_negatives"].tokens.shape[0] == 2
    with torch.no_grad():
        vis = model.encode_image(_images(2))
        txt = model.encode_text(batch["text"])
        out = model.decode(vis, txt, torch.tensor([0, 0, 1]), **extra)
        plain = model.decode(vis, txt, torch.tensor([0, 0, 1]))
    assert out["word_negative_embedding"].shape == (2, TINY_SAG["dim"])
    assert torch.allclose(out["word_negative_embedding"].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(out["mask_logits"], plain["mask_logits"])  # no effect on prediction
    # embedded exactly as the sentence the swap came from would be
    neg = model.encode_text(["the small red star"])
    as_negative = model.decode(vis, txt, torch.tensor([0, 0, 1]), word_negatives=neg, word_negative_of=torch.tensor([0]))
    as_sentence = model.decode(vis, neg, torch.tensor([0]))
    assert torch.allclose(as_negative["word_negative_embedding"][0], as_sentence["text_embedding"][0], atol=1e-5)
    assert teacher_forcing(_tiny(), batch) == {}  # off by default
    assert teacher_forcing(model, {"no_target": batch["no_target"]}) == {}  # no texts
    with pytest.raises(ValueError, match="word_negatives"):
        _tiny(word_negatives=-1)


# ---- training from text alone -----------------------------------------------------------


def _strip_locations(src, dst):
    """Copy a SynthRef folder, then delete every train annotation's segmentation (left as an
    empty polygon list: the key is part of the format) and bbox, and every ref's clicks."""
    shutil.copytree(src, dst)
    with open(dst / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)  # written by refseg make-data in this session
    train_anns = {r["ann_id"] for r in refs if r["split"] == "train"}
    for r in refs:
        r.pop("click_center", None)
        r.pop("click_corners", None)
    with open(dst / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    inst = json.loads((dst / "instances.json").read_text())
    for a in inst["annotations"]:
        if a["id"] in train_anns:
            a["segmentation"] = []
            a.pop("bbox", None)
    (dst / "instances.json").write_text(json.dumps(inst))
    return train_anns


def _read_log(run):
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return {tag: [float(r["value"]) for r in rows if r["tag"] == tag] for tag in {r["tag"] for r in rows}}


OBJECT_CENTRIC = dict(rgb=True, slot_init="gaussian", iters=3, pretrain_steps=2, detach_slots=True)


DISTILL = ["--group-refs", "--loss-kwargs", json.dumps({"w_distill": 1.0, "w_distill_neg": 1.0})]


@pytest.mark.parametrize("extra, args", [({}, []), (OBJECT_CENTRIC, []), ({"gather": "relational"}, DISTILL),
                                         ({"gather": "relational", "word_negatives": 2}, [])],
                         ids=["default", "object-centric", "relational-distill", "word-negatives"])
def test_trains_from_text_alone_through_the_engine(synthref_tiny, tmp_path, monkeypatch, extra, args):
    from refseg.cli import main as cli
    from refseg.data.refer import ReferData

    data = tmp_path / "textonly"
    train_anns = _strip_locations(synthref_tiny, data)
    # and nothing may even try to read a train mask or any click
    get_mask = ReferData.get_mask

    def guarded_get_mask(self, ann_id, image_id=None):
        assert ann_id not in train_anns, f"text-only training read the mask of train annotation {ann_id}"
        return get_mask(self, ann_id, image_id=image_id)

    def no_clicks(self, ref_id):
        raise AssertionError("text-only training read clicks")

    monkeypatch.setattr(ReferData, "get_mask", guarded_get_mask)
    monkeypatch.setattr(ReferData, "clicks", no_clicks)
    run = tmp_path / "run"
    rc = cli(["train", "--data", str(data), "--model", "sag", "--supervision", "text",
              "--model-kwargs", json.dumps({**TINY_SAG, **extra}), "--size", str(S), "--batch-size", "8",
              "--images-per-batch", "2", "--max-steps", "3", "--warmup-steps", "1", "--log-every", "1",
              "--val-max-samples", "16", "--threads", "1", "--no-progress", "--out", str(run), *args])
    assert rc == 0
    log = _read_log(run)
    if args:  # the ref-grouped batches hold pairs of one ref's expressions, so the term is live
        assert max(log["train/distill"]) > 0 and all(math.isfinite(v) for v in log["train/distill_neg"])
    if extra.get("word_negatives"):  # SynthRef expressions have colour / place words: the term is live
        assert min(log["train/word"]) > 0 and all(math.isfinite(v) for v in log["train/acc_word"])
    else:
        assert max(log["train/word"]) == 0.0
    assert len(log["train/loss"]) == 3 and all(math.isfinite(v) for v in log["train/loss"])
    assert {"train/infonce", "train/hard", "train/recon", "train/acc_hard"} <= set(log)
    assert "val/mIoU" in log and "val/PointM" in log  # validation reads val masks only
    assert (run / "last").is_dir()


def test_text_only_loss_falls(synthref_tiny):
    """A few Adam steps on one batch of SynthRef tiny (text supervision: image + text only)."""
    from refseg.data.dataset import RefSegDataset, collate
    from refseg.data.refer import load_refer
    from refseg.engine.evaluate_core import unique_images

    ds = RefSegDataset(load_refer(synthref_tiny), "train", S, "text")
    items = collate([ds[i] for i in range(16)])  # the sentences of the first 2-3 images
    assert "mask" not in items and "click_center" not in items
    images, index = unique_images(items)
    model = _tiny()
    with torch.no_grad():
        vis, txt = model.encode_image(images), model.encode_text(items["text"])
    batch = {"image_index": index, "ref_id": items["ref_id"], "no_target": items["no_target"]}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        out = sag_text_loss(model.decode(vis, txt, index), batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_levels_choose_the_maps_kept_and_grouped():
    model = _tiny(levels=(8, 16))
    vis = model.encode_image(_images(1))
    assert [m.shape[-1] for m in vis] == [S // 8, S // 16]
    out = model.decode(vis, model.encode_text(TEXTS[:1]), torch.tensor([0]))
    assert out["mask_logits"].shape == (1, 1, S, S) and torch.isfinite(out["recon_mse"]).all()
    with pytest.raises(ValueError, match="other `levels`"):  # e.g. a feature cache built for the default levels
        model.decode(_tiny().encode_image(_images(1)), model.encode_text(TEXTS[:1]), torch.tensor([0]))


# ---- the colour shatter (fixed entities) ------------------------------------------------


def test_colour_segments_split_clusters_into_connected_regions():
    from refseg.methods.sag.model import colour_segments

    grey, red, blue = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    c = grey.view(1, 3, 1, 1).repeat(2, 1, 4, 5)  # (2, 3, 4, 5)
    c[0, :, 0, 0] = red
    c[0, :, 3, 4] = red  # a second red cell, not touching the first (and not across the wrap-around)
    c[0, :, 1:3, 2] = blue[:, None]
    c[1, :, :, 4] = blue[:, None]  # image 1: a blue column on the right edge only
    seg, count = colour_segments(c, clusters=3)
    assert count.tolist() == [4, 2]
    expected0 = [[0, 1, 1, 1, 1],
                 [1, 1, 2, 1, 1],
                 [1, 1, 2, 1, 1],
                 [1, 1, 1, 1, 3]]
    assert seg[0].view(4, 5).tolist() == expected0
    assert seg[1].view(4, 5).tolist() == [[0, 0, 0, 0, 1]] * 4
    # one cluster for everything: the whole grid is one region
    seg1, count1 = colour_segments(c, clusters=1)
    assert count1.tolist() == [1, 1] and (seg1 == 0).all()


def test_colour_shatter_gives_one_hot_entities_and_masks_the_padding():
    model = _tiny(rgb=True, shatter="colour", colour_clusters=4)
    images = _images(2)
    images[1] = 128  # a flat image: one entity only
    vis = model.encode_image(images)
    out = model.decode(vis, model.encode_text(TEXTS), torch.tensor([0, 0, 1, 1]))
    attn = out["slot_attn"].flatten(2)  # (2, K, N)
    K = attn.shape[1]
    assert K > 1 and torch.equal(attn.sum(1), torch.ones(2, attn.shape[-1]))  # every cell in exactly one entity
    assert set(attn.unique().tolist()) <= {0.0, 1.0}
    assert (attn[1, 1:] == 0).all()  # the flat image's padding entities
    rel = out["relevance"]
    assert torch.allclose(rel.sum(-1), torch.ones(4)) and (rel[2:, 1:] == 0).all()  # padding gets no relevance
    assert (out["recon_mse"] == 0).all()  # nothing to reconstruct
    # the response map is constant over each entity (an entity is selected whole or not at all)
    prior = out["prior_logits"][0].flatten()  # (N,), sentence 0 is about image 0
    for k in range(K):
        cells = prior[attn[0, k] > 0]
        assert len(cells) == 0 or torch.allclose(cells, cells[0].expand_as(cells))
    losses = sag_text_loss(out, {"image_index": torch.tensor([0, 0, 1, 1]), "ref_id": torch.tensor([1, 2, 3, 4]),
                                 "no_target": torch.zeros(4, dtype=torch.bool)})
    losses["loss"].backward()
    assert model.head.size_in.weight.grad is not None and model.head.gather_q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shatter"):
        _tiny(shatter="colour")  # needs the colour map
    with pytest.raises(ValueError, match="shatter"):
        _tiny(rgb=True, shatter="kmeans")
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    assert rebuilt.head.shatter_mode == "colour"


def test_grid_stride_8_gives_a_finer_map_and_keeps_the_prior_contract():
    from refseg.engine.cache import encoder_fingerprint

    model = _tiny(rgb=True, shatter="colour", grid_stride=8, levels=[8, 16, 32])
    images = _images(2)
    vis = model.encode_image(images)
    assert vis[-1].shape == (2, 3, S // 8, S // 8)  # the colour map at the grid's stride
    assert torch.allclose(vis[-1], torch.nn.functional.avg_pool2d(images.float() / 255, 8), atol=1e-5)
    out = model.decode(vis, model.encode_text(TEXTS[:2]), torch.tensor([0, 1]))
    assert out["slot_attn"].shape[-2:] == (S // 8, S // 8)
    assert out["prior_logits"].shape == (2, 1, S // 16, S // 16) and out["mask_logits"].shape == (2, 1, S, S)
    # the prior is the 2 x 2 max of the fine map (min-max normalised): the fine map's peak cell lies
    # in the prior's peak cell
    fine = (out["relevance"][:, :, None] * out["slot_attn"].flatten(2)).sum(1).view(2, S // 8, S // 8)
    for b in range(2):
        y, x = divmod(int(fine[b].argmax()), S // 8)
        assert out["prior_logits"][b, 0, y // 2, x // 2] == out["prior_logits"][b].max()
    assert encoder_fingerprint(model) != encoder_fingerprint(_tiny(rgb=True, shatter="colour", levels=[8, 16, 32]))
    with pytest.raises(ValueError, match="grid_stride"):
        _tiny(grid_stride=8)  # the stride-8 map is not among the levels


def test_entity_colour_reads_each_entity_s_mean_colour():
    model = _tiny(rgb=True, shatter="colour", colour_clusters=4, entity_colour=True)
    vis = model.encode_image(_images(2))
    head = model.head
    with torch.no_grad():
        slots, attn, _, _ = head.shatter(vis)
        head.colour_in.weight.zero_()
        plain = head.shatter(vis)[0]
        head.colour_in.weight.copy_(torch.eye(3).repeat(head.dim // 3 + 1, 1)[: head.dim])
        with_colour = head.shatter(vis)[0]
    assert not torch.allclose(slots, plain)
    # with colour_in = identity on the first 3 channels, the slots move by each entity's mean colour (scaled)
    colour = ((vis[-1] - 0.5) / 0.25).flatten(2).transpose(1, 2)  # (2, N, 3)
    size = attn.sum(-1, keepdim=True).clamp(min=1)
    expected = (attn @ colour) / size  # (2, K, 3)
    assert torch.allclose((with_colour - plain)[..., :3], expected, atol=1e-5)
    with pytest.raises(ValueError, match="entity_colour"):
        _tiny(rgb=True, entity_colour=True)


# ---- mask refinement and the relational gather ----------------------------------------


def test_refine_entities_follows_colour_edges_inside_the_grid_cells():
    from refseg.methods.sag.model import refine_entities

    # a red rectangle on blue, its edges inside grid cells: rows 6..21, columns 10..25 of a 32 x 32
    # picture whose grid is 4 x 4 (cells of 8 x 8 pixels); a third, padding entity holds nothing
    image = torch.zeros(1, 3, 32, 32)
    image[0, 2] = 1.0
    truth = torch.zeros(32, 32, dtype=torch.bool)
    truth[6:22, 10:26] = True
    image[0, :, truth] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    red_share = truth.float().view(4, 8, 4, 8).mean((1, 3))  # (4, 4) share of each cell
    attn = torch.zeros(1, 3, 4, 4)
    attn[0, 0] = (red_share > 0.5).float()  # the grid's assignment: by majority
    attn[0, 1] = 1 - attn[0, 0]
    post = refine_entities(attn, image, sigma=0.1, iters=2)
    assert post.shape == (1, 3, 32, 32)
    assert torch.allclose(post.sum(1), torch.ones(1, 32, 32), atol=1e-5)
    assert (post[0, 2] == 0).all()  # the padding entity claims nothing
    assert torch.equal(post[0, 0] > 0.5, truth)  # pixel-exact, where the grid is off by up to 4 pixels
    assert not torch.equal(torch.nn.functional.interpolate(attn, size=(32, 32))[0, 0] > 0.5, truth)


def test_mask_refine_draws_the_mask_edge_at_the_colour_edge():
    from refseg.engine.cache import encoder_fingerprint

    model = _tiny(rgb=True, shatter="colour", colour_clusters=4, mask_refine=4).eval()
    image = torch.zeros(1, 3, S, S, dtype=torch.uint8)
    image[0, 0, :, :24] = 220  # left: red up to x = 24 (inside the second 16-px cell), right: blue
    image[0, 2, :, 24:] = 220
    vis = model.encode_image(image)
    assert vis[-1].shape == (1, 3, S // 4, S // 4)  # the fine colour map, after the grid's
    with torch.no_grad():
        out = model.decode(vis, model.encode_text(TEXTS), torch.zeros(4, dtype=torch.long))
    for b in range(4):  # whichever side a sentence picks, the mask ends at x = 24 (+- 1 px: bilinear upsampling)
        pred = out["mask_logits"][b, 0] > 0
        side = bool(pred[0, 0])
        assert (pred[:, :23] == side).all() and (pred[:, 25:] == (not side)).all(), b
        y, x = divmod(int(out["mask_logits"][b, 0].argmax()), S)
        assert pred[y, x]  # the point lies in the mask
    assert out["prior_logits"].shape == (4, 1, S // 16, S // 16)
    assert encoder_fingerprint(model) != encoder_fingerprint(_tiny(rgb=True, shatter="colour", colour_clusters=4))
    with pytest.raises(ValueError, match="mask_refine"):
        _tiny(rgb=True, shatter="colour", mask_refine=16)
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    assert rebuilt.head.mask_refine == 4


def test_relation_features_hand_made_row_of_three():
    from refseg.methods.sag.model import relation_features

    # image 0: entities at x = 0.2, 0.5, 0.8 on one row (sizes 1, 2, 3 cells of 100), a padding 4th
    centre = torch.tensor([[[0.2, 0.5], [0.5, 0.5], [0.8, 0.5], [0.0, 0.0]]])
    logsize = torch.log(torch.tensor([[1.0, 2.0, 3.0, 1.0]]) / 100)
    valid = torch.tensor([[True, True, True, False]])
    member = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])  # every entity of the kind (the padding one ignored)
    anchor = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]])  # the anchor is the right one
    f = relation_features(member, anchor, centre, logsize, valid, tau=0.01)[0, 0]  # (4, 16)
    assert f.shape == (4, 16)
    assert torch.allclose(f[:3, :2], centre[0, :3]) and torch.allclose(f[:3, 2], logsize[0, :3])
    e = torch.exp(torch.tensor([0.0, -1.0, -2.0]))
    # members left of each: 0, 1, 2 -> exp(-n) = 1, e^-1, e^-2; right of: the reverse
    assert torch.allclose(f[:3, 3], e, atol=1e-3) and torch.allclose(f[:3, 4], e.flip(0), atol=1e-3)
    # above / below: none on the same row is clearly above or below: 0.5 each of 2 others -> exp(-1)
    assert torch.allclose(f[:3, 5], torch.full((3,), math.exp(-1)), atol=1e-3)
    # larger than each: 2, 1, 0 (sizes 1, 2, 3)
    assert torch.allclose(f[:3, 7], e.flip(0), atol=1e-3) and torch.allclose(f[:3, 8], e, atol=1e-3)
    # the anchor (entity 2) is right of entities 0 and 1, and not its own anchor
    assert torch.allclose(f[:3, 9], torch.tensor([1.0, 1.0, 0.0]), atol=1e-3)
    assert torch.allclose(f[:3, 10], torch.zeros(3), atol=1e-3)
    assert torch.allclose(f[:3, 13], torch.tensor([-0.6, -0.3, 0.0]), atol=1e-5)  # x offset from the anchor
    assert torch.allclose(f[:3, 15], torch.tensor([0.6, 0.3, 0.0]), atol=1e-3)  # distance


def test_relational_gather_starts_as_the_single_gather_and_learns_its_parts():
    kw = dict(rgb=True, shatter="colour", colour_clusters=4)
    rel, single = _tiny(**kw, gather="relational"), _tiny(**kw)
    missing, unexpected = single.load_state_dict(rel.state_dict(), strict=False)
    assert not missing and unexpected  # the relational parts are extra
    vis = rel.encode_image(_images(2))
    txt = rel.encode_text(TEXTS)
    index = torch.tensor([0, 0, 1, 1])
    a, b = rel.decode(vis, txt, index), single.decode(vis, txt, index)
    assert torch.allclose(a["relevance"], b["relevance"], atol=1e-6)  # q of the relation term starts at 0
    assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-4)
    losses = sag_text_loss(a, {"image_index": index, "ref_id": torch.tensor([1, 2, 3, 4]),
                               "no_target": torch.zeros(4, dtype=torch.bool)})
    losses["loss"].backward()
    head = rel.head
    for p in (head.relation_in.fc1.weight, head.relation_q.weight, head.relation_v.weight, head.anchor_q.weight,
              head.member_log_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gather"):
        _tiny(gather="pairs")
