"""The PPO data order: epochs, curriculum, dataset balance, save/restore mid-epoch, and augmented views."""

from collections import Counter

import numpy as np
import pytest

from rewards.metrics import compute_metrics
from rl_seg.ppo.states import VIEWS, DataOrder, dihedral_view, draw_views, undo_dihedral_view


def draws(order: DataOrder, batches: int, size: int) -> list[int]:
    return [i for _ in range(batches) for i in order.next_batch(size)]


def test_ungrouped_order_draws_every_image_once_per_epoch():
    order = DataOrder([0.0] * 10, seed=3)
    first, second = draws(order, 5, 2), draws(order, 5, 2)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # a fresh permutation each epoch
    assert order.epoch == 1


def test_curriculum_sorts_the_first_epoch_easy_first_then_shuffles():
    difficulty = [0.9, 0.1, 0.5, 0.3, 0.7]
    order = DataOrder(difficulty, seed=0, curriculum=True)
    assert order.next_batch(5) == [1, 3, 2, 4, 0]
    assert sorted(order.next_batch(5)) == list(range(5))


def test_groups_are_drawn_equally_often_whatever_their_size():
    groups = ["drive"] * 4 + ["arcade"] * 40
    order = DataOrder([0.0] * 44, seed=1, groups=groups)
    picked = draws(order, 10, 8)
    counts = Counter(groups[i] for i in picked)
    assert counts == {"drive": 40, "arcade": 40}
    # each group still cycles through all its members: DRIVE's 4 images ten times each, ARCADE's 40 once each
    assert Counter(i for i in picked if groups[i] == "drive") == {0: 10, 1: 10, 2: 10, 3: 10}
    assert sorted(i for i in picked if groups[i] == "arcade") == list(range(4, 44))
    # ungrouped, the small dataset is drawn in proportion to its size
    plain = draws(DataOrder([0.0] * 44, seed=1), 10, 8)
    assert sum(groups[i] == "drive" for i in plain) < 20


def test_one_group_draws_exactly_the_ungrouped_order():
    assert draws(DataOrder([0.0] * 7, seed=5, groups=["a"] * 7), 6, 3) == draws(DataOrder([0.0] * 7, seed=5), 6, 3)


def test_save_and_restore_mid_epoch_continue_identically():
    groups = ["drive"] * 3 + ["arcade"] * 11
    order = DataOrder(list(range(14)), seed=2, curriculum=True, groups=groups)
    draws(order, 3, 5)  # 15 draws: mid-epoch in ARCADE, a few epochs into DRIVE
    state = order.state_dict()
    expected = draws(order, 6, 5)
    rebuilt = DataOrder(list(range(14)), seed=99, curriculum=False, groups=groups)
    rebuilt.load_state_dict(state)
    assert draws(rebuilt, 6, 5) == expected


def test_a_checkpoint_from_before_groups_restores_as_one_group():
    order = DataOrder([0.0] * 6, seed=4)
    order.next_batch(4)
    legacy = {"epoch": order.epoch, "cursor": 4, "seed": 4, "curriculum": False}
    expected = order.next_batch(5)
    rebuilt = DataOrder([0.0] * 6, seed=4)
    rebuilt.load_state_dict(legacy)
    assert rebuilt.next_batch(5) == expected


def test_restoring_with_other_groups_is_a_clear_error():
    state = DataOrder([0.0] * 4, seed=0, groups=["a", "a", "b", "b"]).state_dict()
    with pytest.raises(ValueError, match="1 groups.*2|2 groups.*1"):
        DataOrder([0.0] * 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="3 labels for 4 states"):
        DataOrder([0.0] * 4, seed=0, groups=["a", "a", "b"])


# --- data.augment: the eight views of an image -------------------------------------------------------------------

def test_views_are_the_eight_symmetries_and_undo_inverts_each():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # not square: quarter turns swap H and W
    views = [dihedral_view(image, v) for v in range(VIEWS)]
    assert len({v.tobytes() + bytes(v.shape) for v in views}) == VIEWS
    assert views[0].shape == (5, 7, 3) and views[1].shape == (7, 5, 3)
    masks = rng.random((4, 5, 7)) > 0.5  # K masks: the spatial axes are 1 and 2
    for v in range(VIEWS):
        np.testing.assert_array_equal(undo_dihedral_view(dihedral_view(image, v), v), image)
        turned = dihedral_view(masks, v, axes=(1, 2))
        # the same view of each mask, whether the stack or one mask is turned, and of the image's pixels
        np.testing.assert_array_equal(turned[2], dihedral_view(masks[2], v))
        np.testing.assert_array_equal(dihedral_view(image, v)[..., 1], dihedral_view(image[..., 1], v))
        np.testing.assert_array_equal(undo_dihedral_view(turned, v, axes=(1, 2)), masks)


def test_pixel_count_metrics_of_a_view_are_those_of_the_original_skeleton_ones_not_exactly():
    """Why the reward pool scores masks turned back to the image's own orientation: skeletonization thins in a
    fixed raster order, so clDice of a turned pair can differ from the original's; the counts the learner's
    per-pixel credit uses (Dice, recall, precision) are the same in every view."""
    rng = np.random.default_rng(1)
    gt = np.zeros((24, 30), bool)
    gt[4:6, 2:28] = gt[4:20, 14:16] = gt[18:20, 5:25] = True  # thin branches, one component
    pred = gt ^ (rng.random(gt.shape) > 0.93)
    fov = np.ones_like(gt)
    fov[:, :3] = False
    original = compute_metrics(pred, gt, fov)
    cldice = set()
    for v in range(VIEWS):
        seen = compute_metrics(dihedral_view(pred, v), dihedral_view(gt, v), dihedral_view(fov, v))
        for name in ("dice", "iou", "recall", "precision"):
            assert seen[name] == pytest.approx(original[name], abs=1e-12), (v, name)
        cldice.add(round(seen["cldice"], 12))
        back = compute_metrics(undo_dihedral_view(dihedral_view(pred, v), v), gt, fov)
        assert back == original
    assert len(cldice) > 1


def test_views_are_drawn_from_seed_and_iteration():
    assert draw_views(3, 7, 16) == draw_views(3, 7, 16)  # what a resumed run draws again
    assert draw_views(3, 7, 16) != draw_views(3, 8, 16)
    assert set(draw_views(0, 0, 400)) == set(range(VIEWS))
