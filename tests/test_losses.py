"""Losses on cases whose values are computed by hand in the comments."""

import math

import pytest
import torch

from refseg.losses import area_downsample, bce_loss, dice_loss, heatmap_focal_loss, sigmoid_focal_loss
from refseg.methods.lts.loss import locate_kl, lts_loss


def test_dice_perfect_logits_is_zero():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    logits = (target * 2 - 1) * 30  # +30 inside, -30 outside
    per_sample = dice_loss(logits, target, reduction="none")
    assert per_sample.shape == (2,)
    assert torch.allclose(per_sample, torch.zeros(2), atol=1e-6)  # the empty target counts as perfect too


def test_dice_hand_computed():
    # p = 0.5 everywhere, P = 4 pixels, 2 of them target:
    # 1 - (2 * 0.5 * 2 + 1) / (0.5 * 4 + 2 + 1) = 1 - 3 / 5 = 0.4
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(torch.zeros(1, 4), target).item() == pytest.approx(0.4)
    # smooth = 0, p = sigmoid(0) everywhere, all target: 1 - 2*0.5*4 / (2 + 4) = 1/3
    assert dice_loss(torch.zeros(1, 4), torch.ones(1, 4), smooth=0.0).item() == pytest.approx(1 / 3)


def test_bce_hand_computed():
    # -log(sigmoid(2)) = log(1 + e^-2) = 0.126928; -log(1 - sigmoid(-1)) = log(1 + e^-1) = 0.313262
    logits = torch.tensor([[2.0, -1.0]])
    target = torch.tensor([[1.0, 0.0]])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert bce_loss(torch.zeros(3, 5), torch.ones(3, 5)).item() == pytest.approx(math.log(2), rel=1e-6)


def test_sigmoid_focal_hand_computed():
    # logit 0, t = 1: ce = ln 2, p_t = 0.5, (1 - p_t)^2 = 0.25, alpha_t = 0.25 -> 0.0625 ln 2
    loss = sigmoid_focal_loss(torch.zeros(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.0625 * math.log(2), rel=1e-6)
    # t = 0 uses alpha_t = 0.75 -> 0.1875 ln 2; gamma = 0, alpha off -> plain BCE
    assert sigmoid_focal_loss(torch.zeros(1, 1), torch.zeros(1, 1)).item() == pytest.approx(0.1875 * math.log(2))
    logits, t = torch.tensor([[1.5, -0.3]]), torch.tensor([[1.0, 0.0]])
    assert sigmoid_focal_loss(logits, t, alpha=-1, gamma=0).item() == pytest.approx(bce_loss(logits, t).item())


def test_heatmap_focal_hand_computed():
    # one peak (y = 1, logit 0): (1 - 0.5)^2 ln 2 = 0.25 ln 2
    # one neighbour (y = 0.5, logit 0): (1 - 0.5)^4 * 0.5^2 * ln 2 = 0.015625 ln 2
    # one far cell (y = 0, logit -inf-ish): ~0. Divided by 1 peak.
    heat = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    logits = torch.tensor([0.0, 0.0, -40.0]).view(1, 1, 1, 3)
    assert heatmap_focal_loss(logits, heat).item() == pytest.approx((0.25 + 0.015625) * math.log(2), rel=1e-5)
    # no peak anywhere: negatives only, divided by 1
    none = heatmap_focal_loss(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert none.item() == pytest.approx(2 * 0.25 * math.log(2), rel=1e-5)  # p^2 ln 2 per cell


def test_area_downsample_is_covered_fraction():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1  # the whole top-left cell
    mask[0, 0, 3, 3] = 1  # one pixel of the bottom-right cell
    assert area_downsample(mask, (2, 2))[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.25]]


def _out(mask_logits, prior_logits, nt_logits):
    return {"mask_logits": mask_logits, "prior_logits": prior_logits, "no_target_logits": nt_logits}


def test_lts_loss_terms_and_weights():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1
    out = _out(torch.zeros(2, 1, 4, 4, requires_grad=True), torch.zeros(2, 1, 2, 2), torch.zeros(2))
    batch = {"mask": mask, "no_target": torch.tensor([False, True])}
    losses = lts_loss(out, batch, w_bce=1, w_dice=2, w_prior=3, w_no_target=4, w_locate=0)
    ln2 = math.log(2)
    assert losses["mask_bce"].item() == pytest.approx(ln2)  # all logits 0
    # dice over sample 0 only: 1 - (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1) = 1 - 5 / 13
    assert losses["mask_dice"].item() == pytest.approx(8 / 13)
    assert losses["prior_bce"].item() == pytest.approx(ln2)
    assert losses["no_target"].item() == pytest.approx(ln2)
    total = ln2 + 2 * 8 / 13 + 3 * ln2 + 4 * ln2
    assert losses["loss"].item() == pytest.approx(total)
    losses["loss"].backward()
    assert out["mask_logits"].grad.abs().sum() > 0
    assert not losses["mask_dice"].requires_grad  # logged parts are detached


def test_lts_loss_no_target_samples():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1
    batch = {"mask": mask, "no_target": torch.tensor([False, True])}
    logits = torch.zeros(2, 1, 4, 4)
    other = logits.clone()
    other[1] = 5.0  # the no-target sample predicts a full mask
    a = lts_loss(_out(logits, torch.zeros(2, 1, 2, 2), torch.zeros(2)), batch)
    b = lts_loss(_out(other, torch.zeros(2, 1, 2, 2), torch.zeros(2)), batch)
    assert a["mask_dice"].item() == pytest.approx(b["mask_dice"].item())  # dice ignores it
    assert b["mask_bce"] > a["mask_bce"]  # BCE pushes its mask empty
    only_nt = {"mask": torch.zeros(1, 1, 4, 4), "no_target": torch.tensor([True])}
    c = lts_loss(_out(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2), torch.zeros(1)), only_nt)
    assert c["mask_dice"].item() == 0 and torch.isfinite(c["loss"])
    # without a no_target key every sample is a target
    d = lts_loss(_out(logits, torch.zeros(2, 1, 2, 2), torch.zeros(2)), {"mask": mask})
    assert d["no_target"].item() == pytest.approx(math.log(2))


def test_locate_kl_hand_computed():
    # 4 x 4 mask on a 2 x 2 prior grid: sample 0 covers the top-left cell fully -> q = (1, 0, 0, 0);
    # sample 1 covers half of the top-left and half of the top-right cell -> q = (0.5, 0.5, 0, 0)
    mask = torch.zeros(3, 1, 4, 4)
    mask[0, 0, :2, :2] = 1
    mask[1, 0, :2, 1:3] = 1
    uniform = torch.zeros(3, 1, 2, 2)
    weight = torch.tensor([1.0, 1.0, 0.0])  # sample 2: no referent, left out
    # KL(q || uniform) = sum q log(q / 0.25): sample 0 log 4, sample 1 log 2; mean over the two
    assert locate_kl(uniform, mask, weight).item() == pytest.approx((math.log(4) + math.log(2)) / 2)
    # logits equal to log q (up to a constant) give 0
    exact = torch.full((3, 1, 2, 2), -30.0)
    exact[0, 0, 0, 0] = 0
    exact[1, 0, 0, :] = 0
    assert locate_kl(exact, mask, weight).item() == pytest.approx(0, abs=1e-6)
    # the wrong cell is penalised; an empty mask contributes nothing even with weight 1
    wrong = exact.clone()
    wrong[0, 0] = torch.tensor([[-30.0, -30.0], [-30.0, 0.0]])
    assert locate_kl(wrong, mask, weight).item() > 10
    assert locate_kl(uniform, mask[2:], torch.ones(1)).item() == 0


def test_lts_loss_locate_term_is_weighted_and_can_be_turned_off():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1
    out = _out(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2, requires_grad=True), torch.zeros(2))
    batch = {"mask": mask, "no_target": torch.tensor([False, True])}
    base = lts_loss(out, batch, w_locate=0)
    assert "locate" not in base
    assert lts_loss(out, batch)["locate"].item() == pytest.approx(math.log(4))  # on by default (0.5)
    with_locate = lts_loss(out, batch, w_locate=2.0)
    # only sample 0 has a referent: q = (1, 0, 0, 0) against a uniform prior -> log 4
    assert with_locate["locate"].item() == pytest.approx(math.log(4))
    assert with_locate["loss"].item() == pytest.approx(base["loss"].item() + 2 * math.log(4))
    with_locate["loss"].backward()
    assert out["prior_logits"].grad[0].abs().sum() > 0
