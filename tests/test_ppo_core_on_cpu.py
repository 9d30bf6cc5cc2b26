"""The PPO math of ``rl_seg.ppo.core`` against independent references, on CPU.

* count metrics and confusion counts against the numpy metrics of ``rewards.metrics`` (FOV, empty-mask conventions);
* per-pixel credit against brute force: every valid pixel actually flipped and the mask re-scored in numpy;
* unbiasedness of the local-expectation estimator, exactly, by enumerating every mask of a 2 x 3 image, and its
  variance against REINFORCE with a baseline (also exact);
* group normalization, the advantage registry, and the clipped PPO loss (hand computations and autograd);
* one tiny learning-direction check: a free logit map trained with pixel advantages and ``ppo_loss`` on Dice.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rewards.composite import CompositeReward
from rewards.metrics import METRICS, MaskPair
from rl_seg.policy.distribution import MaskDistribution
from rl_seg.ppo.core import (
    ADVANTAGES,
    COUNT_METRICS,
    AdvantageInputs,
    PPOLossConfig,
    compute_advantages,
    confusion_counts,
    count_metric,
    count_reward,
    group_normalize,
    pixel_credit,
    ppo_loss,
)

DTYPE = torch.float64


def _disk_fov(h, w):
    yy, xx = np.mgrid[:h, :w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    return ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1.0


def _np_reward(pred, gt, fov, weights):
    pair = MaskPair.of(pred, gt, fov)
    return sum(w * METRICS[k](pair) for k, w in weights.items())


def _t(x, dtype=torch.bool):
    return torch.as_tensor(np.array(x)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# 1. count metrics and confusion counts
# ----------------------------------------------------------------------------------------------------------------


def _metric_cases():
    """(pred, gt, fov) triples: random masks with and without a FOV, and every empty-mask convention."""
    rng = np.random.default_rng(0)
    h, w = 9, 11
    fov = _disk_fov(h, w)
    cases = []
    for i in range(8):
        pred, gt = rng.random((h, w)) < 0.1 + 0.1 * i, rng.random((h, w)) < 0.35 - 0.04 * i
        cases.append((pred, gt, fov if i % 2 else None))
    empty, full = np.zeros((h, w), bool), np.ones((h, w), bool)
    one = empty.copy()
    one[4, 5] = True
    outside = ~fov  # non-empty, but entirely outside the FOV
    cases += [
        (empty, empty, None),  # nothing to find, nothing claimed: all 1
        (one, empty, None),  # empty truth, non-empty prediction: dice = iou = precision = 0, recall = 1
        (empty, one, None),  # empty prediction, non-empty truth: dice = iou = recall = 0, precision = 1
        (outside, outside, fov),  # both non-empty only outside the FOV: both empty inside -> all 1
        (outside | one, outside, fov),  # truth only outside the FOV: empty inside
        (outside, one, fov),  # prediction only outside the FOV: empty inside
        (full, full, empty),  # an empty FOV: every count 0 -> all 1
        (full, one, None),
        (one, one, None),
    ]
    return cases


def test_count_metrics_equal_numpy_metrics_with_fov_and_empty_conventions():
    cases = _metric_cases()
    h, w = cases[0][0].shape
    pred = torch.stack([_t(p) for p, _, _ in cases])
    gt = torch.stack([_t(g) for _, g, _ in cases])
    valid = torch.stack([_t(np.ones((h, w), bool) if f is None else f) for _, _, f in cases])
    tp, fp, fn = confusion_counts(pred, gt, valid)
    assert tp.dtype == fp.dtype == fn.dtype == torch.float64
    for name in COUNT_METRICS:
        got = count_metric(name, tp, fp, fn)
        want = [METRICS[name](MaskPair.of(p, g, f)) for p, g, f in cases]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12, err_msg=name)

    # the conventions themselves, stated explicitly (not only "agrees with numpy")
    first = len(cases) - 9
    as_dict = {name: count_metric(name, tp, fp, fn)[first:first + 7].tolist() for name in COUNT_METRICS}
    assert as_dict["dice"] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert as_dict["iou"] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert as_dict["recall"] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert as_dict["precision"] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]

    # a weighted count reward is the weighted sum of the numpy metrics
    weights = {"dice": 0.4, "recall": 0.15, "precision": 0.2, "iou": 0.1}
    np.testing.assert_allclose(count_reward(weights, tp, fp, fn).numpy(),
                               [_np_reward(p, g, f, weights) for p, g, f in cases], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cldice"):
        count_metric("cldice", tp, fp, fn)


def test_confusion_counts_only_count_inside_the_valid_mask():
    rng = np.random.default_rng(1)
    n, h, w = 5, 8, 10
    fov = _disk_fov(h, w)
    pred, gt = rng.random((n, h, w)) < 0.4, rng.random((n, h, w)) < 0.3
    tp, fp, fn = confusion_counts(_t(pred), _t(gt), _t(np.broadcast_to(fov, (n, h, w))))
    for k in range(n):
        p, g = pred[k] & fov, gt[k] & fov
        assert (tp[k].item(), fp[k].item(), fn[k].item()) == (
            float((p & g).sum()), float((p & ~g).sum()), float((~p & g).sum()))
        pair = MaskPair.of(pred[k], gt[k], fov)
        assert (tp[k].item(), fp[k].item(), fn[k].item()) == (pair.tp, pair.fp, pair.fn)
    # whatever lies outside the valid region changes no count
    pred2, gt2 = pred.copy(), gt.copy()
    pred2[:, ~fov] = rng.random((n, int((~fov).sum()))) < 0.5
    gt2[:, ~fov] = rng.random((n, int((~fov).sum()))) < 0.5
    again = confusion_counts(_t(pred2), _t(gt2), _t(np.broadcast_to(fov, (n, h, w))))
    for a, b in zip((tp, fp, fn), again):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# 2. per-pixel credit against brute-force pixel flips
# ----------------------------------------------------------------------------------------------------------------

CREDIT_WEIGHTS = [
    {"dice": 1.0},
    {"recall": 1.0},
    {"precision": 1.0},
    {"iou": 1.0},
    {"dice": 0.4, "recall": 0.15, "precision": 0.2, "iou": 0.1},
    {"dice": -0.5, "iou": 2.0},
]


def _credit_masks():
    rng = np.random.default_rng(2)
    h, w = 6, 7
    fov = _disk_fov(h, w)
    preds = [rng.random((h, w)) < 0.4, rng.random((h, w)) < 0.6, rng.random((h, w)) < 0.2]
    gts = [rng.random((h, w)) < 0.3, rng.random((h, w)) < 0.5, rng.random((h, w)) < 0.3]
    # flips that cross the 0/0 conventions: empty truth with a single predicted pixel, empty prediction,
    # a prediction equal to the truth, a single-pixel truth
    one = np.zeros((h, w), bool)
    one[2, 3] = True
    preds += [one, np.zeros((h, w), bool), gts[0].copy(), np.zeros((h, w), bool)]
    gts += [np.zeros((h, w), bool), gts[1].copy(), gts[0].copy(), one]
    return np.stack(preds), np.stack(gts), fov


@pytest.mark.parametrize("weights", CREDIT_WEIGHTS, ids=lambda w: "+".join(w))
def test_pixel_credit_equals_brute_force_pixel_flips(weights):
    preds, gts, fov = _credit_masks()
    n, h, w = preds.shape
    valid = np.broadcast_to(fov, (n, h, w))
    brute = np.zeros((n, h, w))
    for k in range(n):
        r = _np_reward(preds[k], gts[k], fov, weights)
        for i, j in zip(*np.nonzero(fov)):
            flipped = preds[k].copy()
            flipped[i, j] = ~flipped[i, j]
            brute[k, i, j] = r - _np_reward(flipped, gts[k], fov, weights)
    a, g, v = _t(preds), _t(gts), _t(valid)
    credit = pixel_credit(a, g, v, torch.zeros(n, h, w, dtype=DTYPE), weights)
    assert credit.dtype == DTYPE and credit.shape == (n, h, w)
    np.testing.assert_allclose(credit.numpy(), brute, rtol=0, atol=1e-9)
    assert (credit[~v] == 0).all()

    # with the policy's probability of the action taken: the factor (1 - pi(a_i))
    prob_taken = torch.rand(n, h, w, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    credit_p = pixel_credit(a, g, v, prob_taken, weights)
    np.testing.assert_allclose(credit_p.numpy(), (1 - prob_taken.numpy()) * brute, rtol=0, atol=1e-9)
    assert (credit_p[~v] == 0).all()


def test_pixel_credit_ignores_actions_and_truth_outside_the_valid_region():
    preds, gts, fov = _credit_masks()
    n, h, w = preds.shape
    v = _t(np.broadcast_to(fov, (n, h, w)))
    weights = {"dice": 0.4, "recall": 0.15, "precision": 0.2, "iou": 0.1}
    p0 = torch.full((n, h, w), 0.3, dtype=DTYPE)
    base = pixel_credit(_t(preds), _t(gts), v, p0, weights)
    preds2, gts2 = preds.copy(), gts.copy()
    preds2[:, ~fov], gts2[:, ~fov] = True, True
    assert torch.equal(base, pixel_credit(_t(preds2), _t(gts2), v, p0, weights))


# ----------------------------------------------------------------------------------------------------------------
# 3. unbiasedness and variance of the local-expectation estimator, by exact enumeration
# ----------------------------------------------------------------------------------------------------------------

TINY_P = torch.tensor([[0.2, 0.7, 0.5], [0.9, 0.35, 0.6]], dtype=DTYPE)
TINY_GT = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)


def _enumerate(weights):
    """All 64 masks of the 2 x 3 problem: probabilities, rewards (numpy), scores, pixel estimator, exact grad."""
    h, w = TINY_P.shape
    masks = np.array(list(itertools.product([0, 1], repeat=h * w)), dtype=bool).reshape(-1, h, w)
    m = len(masks)
    logits = torch.logit(TINY_P).clone().requires_grad_(True)
    a = _t(masks, DTYPE)
    # exact E[R] and its gradient, from probabilities written out by hand
    p = torch.sigmoid(logits)
    prob = (a * p + (1 - a) * (1 - p)).flatten(1).prod(1)
    rewards = torch.tensor([_np_reward(mk, TINY_GT, None, weights) for mk in masks], dtype=DTYPE)
    (exact,) = torch.autograd.grad((prob * rewards).sum(), logits)
    prob = prob.detach()
    # d log pi(a_i) / d logit_i for every mask and pixel, by autograd through MaskDistribution
    rep = torch.logit(TINY_P).expand(m, h, w).clone().requires_grad_(True)
    (score,) = torch.autograd.grad(MaskDistribution(rep).log_prob(_t(masks)).sum(), rep)
    np.testing.assert_allclose(score.numpy(), (a - TINY_P).numpy(), rtol=0, atol=1e-12)
    prob_taken = torch.where(_t(masks), TINY_P, 1 - TINY_P)
    credit = pixel_credit(_t(masks), _t(np.broadcast_to(TINY_GT, masks.shape)), torch.ones(m, h, w, dtype=torch.bool),
                          prob_taken, weights)
    return prob, rewards, score, credit * score, exact


def _trace_var(prob, g):
    mean = torch.einsum("m,mij->ij", prob, g)
    return (torch.einsum("m,mij->ij", prob, g ** 2) - mean ** 2).sum().item(), mean


@pytest.mark.parametrize("weights", [{"dice": 1.0}, {"dice": 0.4, "recall": 0.15, "precision": 0.2, "iou": 0.1}],
                         ids=["dice", "mix"])
def test_pixel_credit_estimator_is_unbiased_exactly(weights):
    prob, _, _, g_pixel, exact = _enumerate(weights)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    expected = torch.einsum("m,mij->ij", prob, g_pixel)
    assert exact.abs().max() > 1e-3  # a non-trivial gradient
    np.testing.assert_allclose(expected.numpy(), exact.numpy(), rtol=0, atol=1e-9)


def test_pixel_credit_has_lower_variance_than_unbiased_reinforce_with_group_baseline():
    prob, rewards, score, g_pixel, exact = _enumerate({"dice": 1.0})
    m = len(prob)

    # REINFORCE, one sample, with the exact mean reward as baseline (what a group mean estimates)
    baseline = (prob * rewards).sum()
    g_reinforce = (rewards - baseline).reshape(-1, 1, 1) * score
    var_reinforce, mean_reinforce = _trace_var(prob, g_reinforce)
    var_pixel, mean_pixel = _trace_var(prob, g_pixel)
    np.testing.assert_allclose(mean_reinforce.numpy(), exact.numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(mean_pixel.numpy(), exact.numpy(), rtol=0, atol=1e-9)

    # a real group of K = 2 masks with a leave-one-out group baseline (unbiased): every pair enumerated
    pair_prob = (prob[:, None] * prob[None, :]).reshape(-1)
    d = rewards[:, None] - rewards[None, :]  # R(a) - R(a')
    g_group = 0.5 * (d[:, :, None, None] * score[:, None] - d[:, :, None, None] * score[None, :])
    g_group_pixel = 0.5 * (g_pixel[:, None] + g_pixel[None, :])
    var_group, mean_group = _trace_var(pair_prob, g_group.reshape(m * m, *score.shape[1:]))
    var_group_pixel, mean_group_pixel = _trace_var(pair_prob, g_group_pixel.reshape(m * m, *score.shape[1:]))
    np.testing.assert_allclose(mean_group.numpy(), exact.numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(mean_group_pixel.numpy(), exact.numpy(), rtol=0, atol=1e-9)
    assert var_group_pixel == pytest.approx(var_pixel / 2, rel=1e-9)

    assert var_pixel < var_reinforce
    assert var_group_pixel < var_group
    assert var_pixel < 0.8 * var_reinforce, (var_pixel, var_reinforce)  # by a margin, not a rounding


# ----------------------------------------------------------------------------------------------------------------
# 4. group normalization
# ----------------------------------------------------------------------------------------------------------------


def test_group_normalize_per_group_zero_mean_unit_std_singletons_zero_groups_independent():
    rewards = torch.tensor([0.1, 0.5, 0.3, 2.0, -1.0, 4.0, 0.0, 7.0, 0.25, 3.0, 3.0], dtype=DTYPE)
    groups = torch.tensor([4, 4, 4, 1, 1, 1, 1, 9, 2, 6, 6])
    out = group_normalize(rewards, groups)
    assert out.shape == rewards.shape
    for g in (4, 1):
        x = out[groups == g].double()
        assert x.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
        r = rewards[groups == g]
        np.testing.assert_allclose(x.numpy(), ((r - r.mean()) / r.std(unbiased=False)).numpy(), atol=1e-4)
    assert out[groups == 9].item() == 0.0 and out[groups == 2].item() == 0.0  # singletons
    assert (out[groups == 6] == 0).all()  # a group of equal rewards carries no signal

    # groups are independent: changing (even shifting and scaling) one group's rewards moves nobody else
    changed = rewards.clone()
    changed[groups == 1] = changed[groups == 1] * 10 + 100
    changed[groups == 9] = -50.0
    out2 = group_normalize(changed, groups)
    assert torch.equal(out2[groups != 1], out[groups != 1])
    torch.testing.assert_close(out2[groups == 1], out[groups == 1], atol=1e-5, rtol=0)
    # and the order of the samples does not matter
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(group_normalize(rewards[perm], groups[perm]), out[perm])


# ----------------------------------------------------------------------------------------------------------------
# 5. the advantage registry
# ----------------------------------------------------------------------------------------------------------------


def _adv_inputs(weights, seed=5, values=None, prob_taken=None):
    rng = np.random.default_rng(seed)
    n, h, w = 6, 7, 8
    fov = _disk_fov(h, w)
    valid = np.broadcast_to(fov, (n, h, w)).copy()
    actions = (rng.random((n, h, w)) < 0.4) & valid
    gt = np.repeat(rng.random((2, h, w)) < 0.3, 3, axis=0)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    components = {}
    for k in range(n):
        pair = MaskPair.of(actions[k], gt[k], fov)
        for name in ("dice", "iou", "recall", "precision", "cldice"):
            components.setdefault(name, []).append(METRICS[name](pair))
    components = {k: torch.tensor(v, dtype=torch.float32) for k, v in components.items()}
    rewards = sum(w * components[k] for k, w in weights.items())
    if prob_taken is None:
        prob_taken = torch.from_numpy(rng.uniform(0.05, 0.95, (n, h, w))).float()
    return AdvantageInputs(actions=_t(actions), gt=_t(gt), valid=_t(valid), prob_taken=prob_taken,
                           rewards=rewards, components=components, weights=dict(weights), groups=groups,
                           values=values)


def test_registry_has_the_four_modes_and_unknown_mode_names_them():
    assert {"pixel", "topology", "group", "value"} <= set(ADVANTAGES)
    x = _adv_inputs({"dice": 1.0})
    with pytest.raises(ValueError) as err:
        compute_advantages("gae", x)
    msg = str(err.value)
    assert "gae" in msg and all(mode in msg for mode in ("pixel", "group", "value"))


def test_group_advantage_broadcasts_normalized_reward_over_valid_pixels_only():
    x = _adv_inputs({"dice": 0.7, "cldice": 0.3})
    adv = compute_advantages("group", x)
    assert adv.shape == x.actions.shape
    norm = group_normalize(x.rewards, x.groups)
    assert norm.abs().max() > 0.5
    for k in range(len(norm)):
        assert (adv[k][x.valid[k]] == norm[k]).all()
        assert (adv[k][~x.valid[k]] == 0).all()


def test_value_advantage_uses_rewards_minus_values_and_needs_values():
    x = _adv_inputs({"dice": 1.0})
    with pytest.raises(ValueError, match="value"):
        compute_advantages("value", x)
    values = torch.tensor([0.1, 0.9, 0.3, 0.5, 0.2, 0.6])
    x.values = values
    adv = compute_advantages("value", x)
    diff = x.rewards - values
    per_sample = adv.flatten(1).sum(1) / x.valid.flatten(1).sum(1)
    # r - V whitened over the batch (centred and scaled), as PPO normalizes advantages
    expected = (diff - diff.mean()) / (diff.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(per_sample, expected.float(), rtol=1e-5, atol=1e-6)
    assert per_sample.mean().abs() < 1e-5
    for k in range(len(values)):
        assert (adv[k][x.valid[k]] == adv[k][x.valid[k]][0]).all() and (adv[k][~x.valid[k]] == 0).all()
    # the value head is a baseline: the samples' groups play no part
    x.groups = torch.arange(6)
    torch.testing.assert_close(compute_advantages("value", x), adv)
    # a larger value for one sample lowers exactly that sample's advantage relative to the others
    x.values = values.clone()
    x.values[2] += 0.3
    adv2 = compute_advantages("value", x)
    assert adv2[2][x.valid[2]][0] < adv[2][x.valid[2]][0]


def test_value_advantage_stays_bounded_when_reward_minus_value_is_constant():
    x = _adv_inputs({"dice": 1.0})
    x.values = x.rewards - 0.5  # the value head is off by the same 0.5 for every sample
    adv = compute_advantages("value", x)
    assert torch.isfinite(adv).all()
    assert adv.abs().max() <= 2.0, adv.abs().max()  # unit scale (RMS) or whitened (0): either is bounded


def _rms_scaled(credit, valid):
    rms = math.sqrt(float((credit.double() ** 2).sum()) / int(valid.sum()))
    return credit.double() / rms


def test_pixel_advantage_with_count_terms_only_is_rms_scaled_pixel_credit():
    weights = {"dice": 0.4, "recall": 0.15, "precision": 0.2, "iou": 0.1}
    x = _adv_inputs(weights)
    adv = compute_advantages("pixel", x)
    credit = pixel_credit(x.actions, x.gt, x.valid, x.prob_taken.double(), weights)
    want = _rms_scaled(credit, x.valid)
    np.testing.assert_allclose(adv.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    assert (adv[~x.valid] == 0).all()
    # unit RMS over valid pixels, and no centring (credit is not moved between pixels)
    assert float(adv.double().pow(2).sum() / x.valid.sum()) == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(torch.sign(adv), torch.sign(credit.float()))
    # the reward's overall scale does not matter
    x2 = _adv_inputs({k: 3 * w for k, w in weights.items()})
    torch.testing.assert_close(compute_advantages("pixel", x2), adv, rtol=1e-5, atol=1e-6)


def test_pixel_advantage_with_non_count_terms_only_is_the_group_advantage():
    x = _adv_inputs({"cldice": 1.0})
    assert x.rewards.unique().numel() > 2
    adv = compute_advantages("pixel", x)
    assert torch.equal(adv, compute_advantages("group", x))
    assert adv.abs().max() > 0.5


def test_pixel_advantage_mixes_the_parts_by_weight_share():
    weights = {"dice": 0.45, "recall": 0.15, "cldice": -0.4}  # count share 0.6, other share 0.4 (by |w|)
    x = _adv_inputs(weights)
    adv = compute_advantages("pixel", x)
    count_only = compute_advantages("pixel", _adv_inputs({"dice": 0.45, "recall": 0.15}))
    other_only = compute_advantages("pixel", _adv_inputs({"cldice": -0.4}))
    assert count_only.abs().max() > 0.5 and other_only.abs().max() > 0.5
    torch.testing.assert_close(adv, 0.6 * count_only + 0.4 * other_only, rtol=1e-5, atol=1e-6)

    # zero count part (pi(a_i) = 1 everywhere makes every (1 - pi(a_i)) factor 0): the other part, times 0.4
    x0 = _adv_inputs(weights, prob_taken=torch.ones(6, 7, 8))
    assert pixel_credit(x0.actions, x0.gt, x0.valid, x0.prob_taken, {"dice": 0.45}).abs().max() == 0
    torch.testing.assert_close(compute_advantages("pixel", x0), 0.4 * other_only, rtol=1e-5, atol=1e-6)

    # zero other part (clDice equal within every group): the RMS-scaled credit, times 0.6
    x1 = _adv_inputs(weights)
    x1.components["cldice"] = torch.tensor([0.3, 0.3, 0.3, 0.8, 0.8, 0.8])
    torch.testing.assert_close(compute_advantages("pixel", x1), 0.6 * count_only, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 6. the PPO loss
# ----------------------------------------------------------------------------------------------------------------


def _loss_setup(seed=7, n=3, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    fov = _t(np.broadcast_to(_disk_fov(h, w), (n, h, w)).copy())
    logits = (torch.randn(n, h, w, generator=g, dtype=DTYPE) * 1.5).requires_grad_(True)
    actions = torch.rand(n, h, w, generator=g, dtype=DTYPE) < 0.5
    adv = torch.randn(n, h, w, generator=g, dtype=DTYPE)
    return logits, actions, adv, fov, g


def _vmean(x, valid):
    return x[valid].mean()


def test_ppo_loss_at_the_old_policy_ratio_is_one_and_nothing_is_clipped():
    logits, actions, adv, fov, _ = _loss_setup()
    dist = MaskDistribution(logits, valid=fov)
    old_logp = dist.log_prob(actions).detach()
    loss, stats = ppo_loss(dist, actions, old_logp, adv, PPOLossConfig(clip=0.2))
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0
    assert loss.item() == pytest.approx(-_vmean(adv, fov).item(), abs=1e-12)
    assert stats["policy_loss"] == pytest.approx(loss.item(), abs=1e-12)
    loss.backward()
    p = torch.sigmoid(logits.detach())
    want = -adv * (actions.double() - p) * fov / fov.sum()  # d/dlogit of -mean(A * log pi(a))
    torch.testing.assert_close(logits.grad, want, rtol=1e-10, atol=1e-12)


def test_ppo_clipped_surrogate_matches_hand_computation_and_clipped_pixels_get_no_gradient():
    # five valid pixels with chosen ratios and advantages, one invalid pixel that must not count
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, 3.0], dtype=DTYPE)
    advs = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0, 100.0], dtype=DTYPE)
    valid = torch.tensor([[[True, True, True, True, True, False]]])
    logits = torch.tensor([[[0.3, -1.2, 2.0, 0.1, -0.4, 0.8]]], dtype=DTYPE, requires_grad=True)
    actions = torch.tensor([[[True, False, True, True, False, True]]])
    dist = MaskDistribution(logits, valid=valid)
    old_logp = (dist.log_prob(actions) - torch.log(ratios).reshape(1, 1, 6)).detach()
    clip = 0.2
    loss, stats = ppo_loss(dist, actions, old_logp, advs.reshape(1, 1, 6), PPOLossConfig(clip=clip))
    # by hand: min(r A, clip(r) A) per pixel
    #   r=1.5, A=+1 -> min(1.5, 1.2) = 1.2 (clipped)      r=0.5, A=-1 -> min(-0.5, -0.8) = -0.8 (clipped)
    #   r=1.5, A=-1 -> min(-1.5, -1.2) = -1.5             r=0.5, A=+1 -> min(0.5, 0.8) = 0.5
    #   r=1.1, A=+2 -> 2.2 (inside the range)
    hand = -(1.2 - 0.8 - 1.5 + 0.5 + 2.2) / 5
    assert loss.item() == pytest.approx(hand, abs=1e-12)
    assert stats["clip_fraction"] == pytest.approx(4 / 5, abs=1e-7)
    r5 = ratios[:5]
    assert stats["approx_kl"] == pytest.approx(((r5 - 1) - torch.log(r5)).mean().item(), abs=1e-12)
    loss.backward()
    grad = logits.grad[0, 0]
    # clipped in the direction of the advantage: exactly zero gradient; the invalid pixel: zero too
    assert grad[0] == 0 and grad[1] == 0 and grad[5] == 0
    p = torch.sigmoid(logits.detach()[0, 0])
    a = actions[0, 0].double()
    want = -advs * ratios * (a - p) / 5  # d(-r A / n)/dlogit = -A r (a - p) / n
    torch.testing.assert_close(grad[2:5], want[2:5], rtol=1e-10, atol=1e-12)
    assert (grad[2:5].abs() > 1e-3).all()


def test_ppo_loss_is_a_mean_over_valid_pixels_only():
    logits, actions, adv, fov, g = _loss_setup(seed=8)
    dist = MaskDistribution(logits, valid=fov)
    old_logp = (dist.log_prob(actions) + 0.3 * torch.randn(adv.shape, generator=g, dtype=DTYPE) * fov).detach()
    cfg = PPOLossConfig(clip=0.2, entropy_coef=0.05)
    loss, stats = ppo_loss(dist, actions, old_logp, adv, cfg)
    (grad,) = torch.autograd.grad(loss, logits)

    # by hand over the valid pixels
    logp = dist.log_prob(actions).detach()
    r = torch.exp(logp - old_logp)[fov]
    a = adv[fov]
    surr = torch.minimum(r * a, r.clamp(0.8, 1.2) * a)
    assert stats["policy_loss"] == pytest.approx(-surr.mean().item(), abs=1e-12)

    # anything outside the valid region (advantages, actions, old log-probs) changes nothing
    off = ~fov
    adv2, actions2, old2 = adv.clone(), actions.clone(), old_logp.clone()
    adv2[off] = 1e3
    actions2[off] = ~actions2[off]
    old2[off] = -1e3  # exp(+1e3) overflows unless the log-ratio is masked first
    dist2 = MaskDistribution(logits, valid=fov)
    loss2, stats2 = ppo_loss(dist2, actions2, old2, adv2, cfg)
    (grad2,) = torch.autograd.grad(loss2, logits)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-12)
    assert stats2 == pytest.approx(stats, abs=1e-12)
    torch.testing.assert_close(grad2, grad, rtol=0, atol=1e-14)
    assert (grad[off] == 0).all()


def test_ppo_loss_kl_entropy_and_value_terms():
    logits, actions, adv, fov, g = _loss_setup(seed=9)
    ref_logits = logits.detach() + torch.randn(logits.shape, generator=g, dtype=DTYPE)
    old_logp = MaskDistribution(logits.detach(), valid=fov).log_prob(actions)

    def run(cfg, ref=None, values=None, returns=None):
        dist = MaskDistribution(logits, valid=fov)
        ref_dist = None if ref is None else MaskDistribution(ref, valid=fov)
        return ppo_loss(dist, actions, old_logp, adv, cfg, ref_dist=ref_dist, values=values, returns=returns)

    base, base_stats = run(PPOLossConfig())
    p, q = torch.sigmoid(logits.detach()), torch.sigmoid(ref_logits)
    kl_hand = _vmean(p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)), fov).item()
    ent_hand = _vmean(-(p * torch.log(p) + (1 - p) * torch.log(1 - p)), fov).item()
    assert kl_hand > 0.05

    # KL: + kl_coef * mean valid closed-form KL(pi || pi_ref); reported as kl_ref
    with_kl, kl_stats = run(PPOLossConfig(kl_coef=0.3), ref=ref_logits)
    assert kl_stats["kl_ref"] == pytest.approx(kl_hand, abs=1e-12)
    assert (with_kl - base).item() == pytest.approx(0.3 * kl_hand, abs=1e-12)
    # ... and 0 (with zero gradient) when the reference is the current policy
    same, same_stats = run(PPOLossConfig(kl_coef=0.3), ref=logits.detach().clone())
    assert same_stats["kl_ref"] == pytest.approx(0.0, abs=1e-15)
    assert same.item() == pytest.approx(base.item(), abs=1e-15)
    (g_same,) = torch.autograd.grad(same, logits)
    (g_base,) = torch.autograd.grad(run(PPOLossConfig())[0], logits)
    torch.testing.assert_close(g_same, g_base, rtol=0, atol=1e-14)

    # entropy bonus: - entropy_coef * mean valid entropy
    with_ent, ent_stats = run(PPOLossConfig(entropy_coef=0.07))
    assert ent_stats["entropy"] == pytest.approx(ent_hand, abs=1e-12)
    assert base_stats["entropy"] == pytest.approx(ent_hand, abs=1e-12)
    assert (base - with_ent).item() == pytest.approx(0.07 * ent_hand, abs=1e-12)

    # value loss: + value_coef * MSE(values, returns), with its gradient reaching the values
    values = torch.tensor([0.2, 0.9, -0.1], dtype=DTYPE, requires_grad=True)
    returns = torch.tensor([0.5, 0.4, 0.3], dtype=DTYPE)
    mse = ((values.detach() - returns) ** 2).mean().item()
    with_v, v_stats = run(PPOLossConfig(value_coef=0.5), values=values, returns=returns)
    assert v_stats["value_loss"] == pytest.approx(mse, rel=1e-6)  # computed in float32
    assert (with_v - base).item() == pytest.approx(0.5 * mse, rel=1e-6)
    (gv,) = torch.autograd.grad(with_v, values)
    torch.testing.assert_close(gv, 0.5 * 2 * (values.detach() - returns) / 3, rtol=1e-6, atol=1e-8)
    assert "value_loss" not in base_stats and "kl_ref" not in base_stats


@pytest.mark.parametrize("seed", range(5))
def test_ppo_approx_kl_is_non_negative(seed):
    logits, actions, adv, fov, g = _loss_setup(seed=20 + seed, n=4, h=6, w=6)
    old_logits = logits.detach() + 2.0 * torch.randn(logits.shape, generator=g, dtype=DTYPE)
    old_logp = MaskDistribution(old_logits, valid=fov).log_prob(actions)
    dist = MaskDistribution(logits, valid=fov)
    _, stats = ppo_loss(dist, actions, old_logp, adv, PPOLossConfig())
    r = torch.exp(dist.log_prob(actions).detach() - old_logp)[fov]
    assert stats["approx_kl"] >= 0.0
    assert stats["approx_kl"] == pytest.approx(((r - 1) - torch.log(r)).mean().item(), rel=1e-10)
    assert stats["clip_fraction"] == pytest.approx(((r - 1).abs() > 0.2).double().mean().item(), abs=1e-12)


def test_mask_distribution_invalid_pixels_are_not_actions():
    g = torch.Generator().manual_seed(12)
    n, h, w = 400, 4, 5
    fov = _t(np.broadcast_to(_disk_fov(h, w), (n, h, w)).copy())
    logits = torch.randn(1, h, w, generator=g, dtype=DTYPE).expand(n, h, w) + 3.0  # mostly "vessel"
    dist = MaskDistribution(logits, valid=fov)
    masks = dist.sample(generator=g)
    assert not masks[~fov].any()  # never sampled as vessel outside the FOV
    freq = masks.double().mean(0)
    p = torch.sigmoid(logits[0])
    assert ((freq - p).abs()[fov[0]] < 4 * torch.sqrt(p * (1 - p) / n)[fov[0]] + 1e-3).all()
    other = MaskDistribution(logits - 1.0, valid=fov)
    for t in (dist.log_prob(~masks), dist.entropy(), dist.kl(other)):
        assert (t[~fov] == 0).all() and (t[fov] != 0).any()


# ----------------------------------------------------------------------------------------------------------------
# 7. learning direction, end to end
# ----------------------------------------------------------------------------------------------------------------


def _dice(pred, gt):
    return METRICS["dice"](MaskPair.of(pred, gt))


def _train_free_logit_map(seed, mode="pixel", iterations=15):
    """A 1 x 8 x 8 logit map as the whole policy: K = 16 masks per step, ``mode`` advantages, 2 PPO epochs."""
    g = torch.Generator().manual_seed(seed)
    h = w = 8
    gt = np.zeros((h, w), bool)
    gt[2:6, 1:7] = True  # a bar ...
    gt[0:8, 3] = True  # ... and a vessel across it
    gt_t = _t(gt)
    logits = torch.nn.Parameter(0.5 * torch.randn(1, h, w, generator=g))
    opt = torch.optim.Adam([logits], lr=0.1)
    reward = CompositeReward({"dice": 1.0}, normalize=True)
    k = 16
    valid = torch.ones(k, h, w, dtype=torch.bool)
    start = _dice((torch.sigmoid(logits) > 0.5)[0].numpy(), gt)
    sampled_means = []
    for _ in range(iterations):
        with torch.no_grad():
            dist_old = MaskDistribution(logits.detach().expand(k, h, w), valid=valid)
            actions = dist_old.sample(generator=g)
            old_logp = dist_old.log_prob(actions)
            p = torch.sigmoid(logits.detach()).expand(k, h, w)
            prob_taken = torch.where(actions, p, 1 - p)
            scores = [reward(a.numpy(), gt) for a in actions]
            rewards = torch.tensor([s.total for s in scores])
            components = {"dice": torch.tensor([s.components["dice"] for s in scores])}
            x = AdvantageInputs(actions=actions, gt=gt_t.expand(k, h, w), valid=valid, prob_taken=prob_taken,
                                rewards=rewards, components=components, weights={"dice": 1.0},
                                groups=torch.zeros(k, dtype=torch.long))
            adv = compute_advantages(mode, x)
        sampled_means.append(rewards.mean().item())
        for _ in range(2):  # two PPO epochs on the same samples
            dist = MaskDistribution(logits.expand(k, h, w), valid=valid)
            loss, stats = ppo_loss(dist, actions, old_logp, adv, PPOLossConfig(clip=0.2))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert math.isfinite(loss.item())
    end = _dice((torch.sigmoid(logits) > 0.5)[0].detach().numpy(), gt)
    return start, end, sampled_means


def test_pixel_advantages_and_ppo_loss_improve_dice_of_a_free_logit_map():
    start, end, sampled_means = _train_free_logit_map(seed=11)
    assert end > start + 0.15 and end > 0.9, (start, end)
    assert np.mean(sampled_means[-3:]) > np.mean(sampled_means[:3]) + 0.1, sampled_means


@pytest.mark.parametrize("mode", ["pixel", "topology", "group", "value"])
def test_sharded_advantages_with_summed_statistics_equal_the_whole_batch(mode):
    """Two shards (one image each, as two data-parallel ranks see them) whose batch statistics are summed over
    both give every sample the advantage of the whole batch; without the sum, pixel and value would not."""
    import dataclasses

    weights = {"dice": 0.4, "recall": 0.2, "cldice": 0.4}
    x = _adv_inputs(weights, values=torch.linspace(0.1, 0.6, 6))
    whole = compute_advantages(mode, x)

    def shard(s):
        rows = slice(3 * s, 3 * s + 3)
        return dataclasses.replace(
            x, actions=x.actions[rows], gt=x.gt[rows], valid=x.valid[rows], prob_taken=x.prob_taken[rows],
            rewards=x.rewards[rows], components={k: v[rows] for k, v in x.components.items()},
            groups=x.groups[rows] - x.groups[rows].min(), values=x.values[rows])

    # The "all-reduce": a first pass records each shard's statistics (each mode reduces once, if at all), the
    # second pass is given their sum, as dist.all_reduce would give every rank.
    recorded = {0: [], 1: []}
    for s in (0, 1):
        compute_advantages(mode, dataclasses.replace(shard(s), reduce_sum=lambda t, s=s: recorded[s].append(t) or t))
    assert len(recorded[0]) == len(recorded[1]) == (0 if mode == "group" else 1)

    def summed(t):
        return recorded[0][0] + recorded[1][0]

    sharded = torch.cat([compute_advantages(mode, dataclasses.replace(shard(s), reduce_sum=summed))
                         for s in (0, 1)])
    torch.testing.assert_close(sharded, whole, rtol=1e-5, atol=1e-6)
    if mode != "group":  # the shards' own statistics differ from the batch's: the sum is what makes them equal
        alone = torch.cat([compute_advantages(mode, shard(s)) for s in (0, 1)])
        assert not torch.allclose(alone, whole, rtol=1e-3, atol=1e-4)
