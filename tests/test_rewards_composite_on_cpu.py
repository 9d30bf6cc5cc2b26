"""Composite rewards: the presets' exact formulas, bounds, and the gaming that `seed` allows and `default` does not."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from rewards import metrics as M
from rewards.composite import COMPONENTS, PRESETS, CompositeReward, get_reward


def vessel_tree(shape=(96, 96)):
    """A 3-px-wide trunk with two branches: a mask with a non-trivial skeleton."""
    gt = np.zeros(shape, bool)
    gt[10:86, 46:49] = True
    gt[30:33, 20:47] = True
    gt[60:63, 48:80] = True
    return gt


def with_spurs(mask, n=12, length=2):
    """Short 1-px spurs sticking out of the trunk into background: each adds a skeleton junction."""
    out = mask.copy()
    for i in range(n):
        row = 14 + 6 * i
        if i % 2 == 0:
            out[row, 49 : 49 + length] = True
        else:
            out[row, 46 - length : 46] = True
    return out


def lattice_speck(mask, top=70, left=8, size=15, step=3):
    """A separate small grid in the background: one component, many junctions."""
    out = mask.copy()
    out[top : top + size : step, left : left + size] = True
    out[top : top + size, left : left + size : step] = True
    return out


def test_seed_preset_is_the_original_formula():
    gt = vessel_tree()
    pred = gt.copy()
    pred[40:86, 46:49] = False  # cut the trunk: recall < 0.85, length ratio < 1
    pair = M.MaskPair.of(pred, gt)
    result = get_reward("seed")(pred, gt)
    dice, recall, lr = pair.dice(), pair.recall(), pair.length_ratio()
    assert recall < 0.85
    topology = -pair.pred_skeleton_components + 0.1 * pair.pred_skeleton_junctions
    expected = 0.5 * (10 * dice) + 0.2 * ((recall - 0.85) * 5) + 0.2 * (2 * topology) + 0.1 * (-3 * abs(1 - lr))
    assert result.total == pytest.approx(expected)
    assert set(result.components) == {"seed_dice", "seed_recall_bonus", "seed_topology", "seed_length"}
    assert result.components["seed_dice"] == pytest.approx(10 * dice)


def test_seed_recall_bonus_is_zero_above_085():
    gt = vessel_tree()
    assert get_reward("seed")(gt, gt).components["seed_recall_bonus"] == 0.0


@pytest.mark.parametrize("gamed", [with_spurs, lattice_speck], ids=["spurs", "lattice-speck"])
def test_seed_can_be_gamed_and_default_cannot(gamed):
    gt = vessel_tree()
    honest = gt.copy()
    honest[70:86, 46:49] = False  # a decent but imperfect prediction
    cheat = gamed(honest)
    seed, default = get_reward("seed"), get_reward("default")
    s_honest, s_cheat = seed(honest, gt), seed(cheat, gt)
    # The gamed mask is worse by the metric that matters ...
    assert M.dice(cheat, gt) < M.dice(honest, gt)
    # ... but the seed preset's topology term, and its total, go up.
    assert s_cheat.components["seed_topology"] > s_honest.components["seed_topology"]
    assert s_cheat.total > s_honest.total
    # The default reward goes down in total and in every topology component.
    d_honest, d_cheat = default(honest, gt), default(cheat, gt)
    assert d_cheat.total < d_honest.total
    assert d_cheat.components["cldice"] < d_honest.components["cldice"]
    assert d_cheat.components["betti0"] <= d_honest.components["betti0"]


masks = arrays(bool, (16, 16))


@settings(max_examples=80, deadline=None)
@given(masks, masks)
def test_default_reward_and_its_components_are_bounded(pred, gt):
    result = get_reward("default")(pred, gt)
    assert 0.0 <= result.total <= 1.0
    for name, value in result.components.items():
        lo, hi = COMPONENTS[name].bounds
        assert lo <= value <= hi, name


def test_default_reward_is_one_only_for_a_perfect_mask():
    gt = vessel_tree()
    assert get_reward("default")(gt, gt).total == pytest.approx(1.0)
    assert get_reward("default")(np.zeros_like(gt), gt).total < 0.2


def test_custom_weights_and_errors():
    reward = get_reward({"dice": 3, "recall": 1})
    gt = vessel_tree()
    pred = gt.copy()
    pred[:50] = False
    pair = M.MaskPair.of(pred, gt)
    assert reward(pred, gt).total == pytest.approx((3 * pair.dice() + pair.recall()) / 4)
    with pytest.raises(ValueError, match="unknown reward component.*'topo'"):
        get_reward({"dice": 1, "topo": 1})
    with pytest.raises(ValueError, match="unknown reward preset 'best'"):
        get_reward("best")
    with pytest.raises(ValueError, match="weights must be numbers"):
        CompositeReward({"dice": "high"})
    with pytest.raises(ValueError, match="non-zero weight"):
        get_reward({"dice": 0})


def test_presets_reference_registered_components():
    for name, weights in PRESETS.items():
        assert set(weights) <= set(COMPONENTS), name
