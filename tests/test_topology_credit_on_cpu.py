"""Per-pixel flip counterfactuals of the topology terms (``rl_seg.ppo.topology``) against brute force, on CPU.

Brute force: every valid pixel of a small vessel-like mask actually flipped and the mask re-scored with
``rewards`` (skeletonize, label). Where the module says "exact", every pixel must agree; where it says
"approximate", it must agree wherever its assumption holds and stay on the right side where it does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import line
from skimage.morphology import skeletonize

from rewards.composite import COMPONENTS
from rewards.metrics import MaskPair
from rl_seg.ppo.core import AdvantageInputs, compute_advantages
from rl_seg.ppo.topology import (
    TOPOLOGY_METRICS,
    GroundTruthTopology,
    _ring_groups_table,
    flip_counterfactuals,
    local_reward_flips,
)

SIZE = 28


def _vessels(rng, n_lines=4, width=1) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    for _ in range(n_lines):
        r0, c0, r1, c1 = rng.integers(0, SIZE, 4)
        rr, cc = line(r0, c0, r1, c1)
        for d in range(width):
            mask[np.clip(rr + d, 0, SIZE - 1), cc] = True
    return mask


def _case(seed: int, fov: bool = True):
    """A truth of a few vessels, a prediction that misses some of it, has gaps, specks and a spur."""
    rng = np.random.default_rng(seed)
    gt = _vessels(rng, 4, width=2)
    pred = gt & (rng.random(gt.shape) > 0.12)  # gaps
    pred |= _vessels(rng, 1)  # a false vessel
    pred |= rng.random(gt.shape) < 0.03  # specks
    valid = np.ones_like(gt)
    if fov:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        valid = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (0.47 * SIZE) ** 2
    return pred, gt, valid


def _component(name: str, pair: MaskPair) -> float:
    return COMPONENTS[name].fn(pair)


def _brute_force(pred, gt, valid, name):
    out = np.zeros(pred.shape)
    for y, x in zip(*np.nonzero(valid)):
        flipped = pred.copy()
        flipped[y, x] = ~flipped[y, x]
        out[y, x] = _component(name, MaskPair.of(flipped, gt, valid))
    return out


def test_ring_table_counts_groups_of_neighbours_connected_through_the_ring():
    table = _ring_groups_table()
    bit = {pos: 1 << n for n, pos in enumerate(((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1),
                                                (0, -1)))}
    assert table[0] == 0 and table[255] == 1
    assert table[bit[(-1, 0)] | bit[(1, 0)]] == 2  # above and below: removing the centre splits them
    assert table[bit[(-1, -1)] | bit[(-1, 1)]] == 2  # two corners of one side are not neighbours
    assert table[bit[(-1, -1)] | bit[(-1, 0)] | bit[(-1, 1)]] == 1
    assert table[bit[(-1, 0)] | bit[(0, 1)]] == 1  # diagonal neighbours touch (8-connectivity)
    assert table[bit[(-1, 0)] | bit[(1, 0)] | bit[(0, -1)] | bit[(0, 1)]] == 1
    assert table[bit[(-1, -1)] | bit[(1, 1)] | bit[(-1, 1)] | bit[(1, -1)]] == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_of_the_mask_itself_equal_the_reward_components(seed):
    pred, gt, valid = _case(seed)
    out = flip_counterfactuals(pred, GroundTruthTopology(gt, valid))
    pair = MaskPair.of(pred, gt, valid)
    for name in TOPOLOGY_METRICS:
        assert out[name][0] == pytest.approx(_component(name, pair), abs=1e-12), name


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_betti0_is_exact_for_switching_on_and_an_upper_bound_for_switching_off(seed):
    pred, gt, valid = _case(seed)
    target = GroundTruthTopology(gt, valid)
    _, approx = flip_counterfactuals(pred, target, ("betti0",))["betti0"]
    # Compare component counts (agreement is monotone in |C - B| but not in C): recover them by brute force.
    from skimage.measure import label

    pred = pred & valid
    exact_on = exact_off = bound_off = 0
    for y, x in zip(*np.nonzero(valid)):
        flipped = pred.copy()
        flipped[y, x] = ~flipped[y, x]
        true_c = label(flipped, connectivity=2).max()
        true_agree = _component("betti0", MaskPair.of(flipped, gt, valid))
        if not pred[y, x]:
            assert approx[y, x] == pytest.approx(true_agree, abs=1e-12), (y, x)
            exact_on += 1
        else:
            ring = flipped[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
            if ring.sum() <= 1 or approx[y, x] == pytest.approx(true_agree, abs=1e-12):
                assert approx[y, x] == pytest.approx(true_agree, abs=1e-12), (y, x)
                exact_off += 1
            else:  # its neighbour groups meet elsewhere: the module over-counts, C <= C' <= C + G - 1
                c_count = label(pred, connectivity=2).max()
                groups = label(ring, connectivity=2).max()  # the ring with the centre already off
                assert c_count <= true_c < c_count + groups - 1, (y, x)
                bound_off += 1
    assert exact_on > 0 and exact_off > 0
    assert bound_off <= 0.1 * (exact_off + bound_off), (exact_off, bound_off)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cldice_is_exact_wherever_a_flip_leaves_the_predicted_skeleton_alone(seed):
    pred, gt, valid = _case(seed)
    pred = pred & valid
    target = GroundTruthTopology(gt, valid)
    value, approx = flip_counterfactuals(pred, target, ("cldice",))["cldice"]
    truth = _brute_force(pred, gt, valid, "cldice")
    skel = skeletonize(pred)
    lone = np.pad(pred, 1)
    exact = 0
    for y, x in zip(*np.nonzero(valid)):
        flipped = pred.copy()
        flipped[y, x] = ~flipped[y, x]
        assumed = skel.copy()  # the module's model: a pixel without predicted neighbours is its own skeleton
        if lone[y:y + 3, x:x + 3].sum() - pred[y, x] == 0:
            assumed[y, x] = flipped[y, x]
        if np.array_equal(skeletonize(flipped), assumed):
            assert approx[y, x] == pytest.approx(truth[y, x], abs=1e-12), (y, x)
            exact += 1
    assert exact > 0.5 * valid.sum()
    # Elsewhere the module gives no credit rather than a guess: where it gives some, the sign is right.
    credited = valid & (np.abs(approx - value) > 1e-12)
    assert credited.mean() > 0.3
    agree = np.sign(value - approx[credited]) == np.sign(value - truth[credited])
    assert agree.mean() > 0.95, agree.mean()
    # A missed centreline pixel with predicted neighbours: switching it on can only help (sensitivity rises).
    credit = value - approx
    missed = target.skeleton & valid & ~pred
    assert missed.any() and (credit[missed] < 0).all()


def test_pixels_outside_the_valid_region_get_the_masks_own_value():
    pred, gt, valid = _case(5)
    out = flip_counterfactuals(pred, GroundTruthTopology(gt, valid))
    for name, (value, flipped) in out.items():
        assert (flipped[~valid] == value).all(), name


def test_unknown_terms_are_named():
    pred, gt, valid = _case(0)
    with pytest.raises(ValueError, match="'dice'"):
        flip_counterfactuals(pred, GroundTruthTopology(gt, valid), ("dice",))


def test_a_speck_and_a_gap_get_the_credit_a_topology_reward_implies():
    """A vessel with a one-pixel gap and one speck: switching the gap pixel on joins two components (betti0 and
    clDice improve), switching the speck off removes a false component; both flips raise the reward."""
    gt = np.zeros((9, 15), dtype=bool)
    gt[4, 1:14] = True
    pred = gt.copy()
    pred[4, 7] = False  # gap
    pred[1, 2] = True  # speck
    valid = np.ones_like(gt)
    delta = local_reward_flips(pred, GroundTruthTopology(gt, valid), {"cldice": 0.5, "betti0": 0.5})
    assert delta[4, 7] < 0 and delta[1, 2] < 0  # R(a) - R(flipped) < 0: the flip would help
    # a background pixel far from everything: switching it on adds a speck, which hurts
    assert delta[8, 13] > 0


def _inputs(weights, k=3, seed=0):
    pred, gt, valid = _case(seed)
    rng = np.random.default_rng(seed + 10)
    actions = np.stack([pred ^ (rng.random(pred.shape) < 0.05) for _ in range(k)]) & valid
    t = torch.from_numpy
    gts, valids = t(np.stack([gt] * k)), t(np.stack([valid] * k))
    prob_taken = torch.from_numpy(rng.uniform(0.2, 0.95, actions.shape)).float()
    comps = {name: torch.tensor([_component(name, MaskPair.of(a, gt, valid)) for a in actions],
                                dtype=torch.float64) for name in weights}
    rewards = sum(w * comps[n] for n, w in weights.items())
    return AdvantageInputs(actions=t(actions), gt=gts, valid=valids, prob_taken=prob_taken, rewards=rewards,
                           components=comps, weights=dict(weights), groups=torch.zeros(k, dtype=torch.long))


def test_topology_advantage_with_count_terms_only_equals_pixel_advantage():
    x = _inputs({"dice": 0.6, "recall": 0.4})
    torch.testing.assert_close(compute_advantages("topology", x), compute_advantages("pixel", x))


def test_topology_advantage_gives_topology_terms_per_pixel_credit_instead_of_a_group_baseline():
    x = _inputs({"cldice": 0.6, "betti0": 0.4})
    adv = compute_advantages("topology", x)
    group = compute_advantages("pixel", x)  # pixel mode: the group baseline, one value per mask
    assert group[0][x.valid[0]].unique().numel() == 1  # one value per mask
    assert adv[0][x.valid[0]].unique().numel() > 10  # per-pixel, not per-mask
    assert (adv[~x.valid] == 0).all()
    # unit RMS over valid pixels, like pixel mode's count part
    assert float(adv.double().pow(2).sum() / x.valid.sum()) == pytest.approx(1.0, abs=1e-3)
    # its sign follows the flip deltas: (1 - pi) > 0 never changes it
    deltas = np.stack([local_reward_flips(a, GroundTruthTopology(g, v), x.weights)
                       for a, g, v in zip(x.actions.numpy(), x.gt.numpy(), x.valid.numpy())])
    assert torch.equal(torch.sign(adv), torch.sign(torch.from_numpy(deltas).float() * x.valid))


def _train_free_logit_map(mode: str, seed: int, iterations: int = 25):
    """A 16 x 16 logit map as the whole policy, trained on a topology-only reward; returns the mean sampled
    reward per iteration."""
    from rewards.composite import CompositeReward
    from rl_seg.policy.distribution import MaskDistribution
    from rl_seg.ppo.core import PPOLossConfig, ppo_loss

    g = torch.Generator().manual_seed(seed)
    h = w = 16
    gt = np.zeros((h, w), bool)
    gt[7:9, :] = True  # a vessel with a branch
    gt[:8, 5] = True
    weights = {"cldice": 0.5, "betti0": 0.5}
    reward = CompositeReward(weights, normalize=True)
    logits = torch.nn.Parameter(torch.full((1, h, w), -1.0) + 0.3 * torch.randn(1, h, w, generator=g))
    opt = torch.optim.Adam([logits], lr=0.1)
    k = 16
    valid = torch.ones(k, h, w, dtype=torch.bool)
    means = []
    for _ in range(iterations):
        with torch.no_grad():
            old = MaskDistribution(logits.detach().expand(k, h, w), valid=valid)
            actions = old.sample(generator=g)
            p = torch.sigmoid(logits.detach()).expand(k, h, w)
            scores = [reward(a.numpy(), gt) for a in actions]
            x = AdvantageInputs(actions=actions, gt=torch.from_numpy(gt).expand(k, h, w), valid=valid,
                                prob_taken=torch.where(actions, p, 1 - p),
                                rewards=torch.tensor([s.total for s in scores]),
                                components={n: torch.tensor([s.components[n] for s in scores]) for n in weights},
                                weights=weights, groups=torch.zeros(k, dtype=torch.long))
            adv = compute_advantages(mode, x)
            old_logp = old.log_prob(actions)
        means.append(x.rewards.mean().item())
        for _ in range(2):
            loss, _ = ppo_loss(MaskDistribution(logits.expand(k, h, w), valid=valid), actions, old_logp, adv,
                               PPOLossConfig(clip=0.2))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return means


def test_per_pixel_topology_credit_learns_a_topology_reward_faster_than_the_group_baseline():
    """Same seeds, same samples budget: per-pixel credit for clDice and Betti-0 ('topology') against the group
    baseline they get in 'pixel' mode, on a reward made of those two terms only."""
    topo = np.mean([_train_free_logit_map("topology", s)[-5:] for s in range(3)])
    group = np.mean([_train_free_logit_map("pixel", s)[-5:] for s in range(3)])
    start = np.mean([_train_free_logit_map("topology", s, iterations=1)[0] for s in range(3)])
    assert topo > start + 0.2, (start, topo)
    assert topo > group + 0.05, (topo, group)
