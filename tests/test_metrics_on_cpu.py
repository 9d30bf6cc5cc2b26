"""Per-image metrics against independent implementations (MONAI, torchmetrics, a direct clDice) and properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from monai.metrics import compute_iou, compute_dice
from scipy import ndimage
from skimage.morphology import skeletonize
from conftest import stubs_hidden
from rewards import metrics as M

with stubs_hidden():
    from torchmetrics.functional.classification import binary_precision, binary_recall


def random_masks(seed, shape=(64, 64), density=0.3):
    rng = np.random.default_rng(seed)
    return rng.random(shape) < density, rng.random(shape) < density


def monai_onehot(mask):
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.cat([1 - t, t], dim=1)


@pytest.mark.parametrize("seed", range(8))
def test_dice_and_iou_match_monai(seed):
    pred, gt = random_masks(seed, density=0.05 + 0.1 * seed)
    ref_dice = compute_dice(monai_onehot(pred), monai_onehot(gt), include_background=False).item()
    ref_iou = compute_iou(monai_onehot(pred), monai_onehot(gt), include_background=False).item()
    assert M.dice(pred, gt) == pytest.approx(ref_dice, abs=1e-6)
    assert M.iou(pred, gt) == pytest.approx(ref_iou, abs=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_recall_and_precision_match_torchmetrics(seed):
    pred, gt = random_masks(100 + seed, density=0.02 + 0.1 * seed)
    p, g = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64))
    assert M.recall(pred, gt) == pytest.approx(binary_recall(p, g).item(), abs=1e-6)
    assert M.precision(pred, gt) == pytest.approx(binary_precision(p, g).item(), abs=1e-6)


def direct_cldice(pred, gt):
    sp, sg = skeletonize(pred), skeletonize(gt)
    tprec = (sp & gt).sum() / sp.sum()
    tsens = (sg & pred).sum() / sg.sum()
    return 2 * tprec * tsens / (tprec + tsens)


def vessel_like(seed, shape=(96, 96), n=6):
    """Random thick line segments: masks with real skeletons (noise masks skeletonize to specks)."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        (y0, x0), (y1, x1) = rng.integers(0, shape[0], 2), rng.integers(0, shape[1], 2)
        width = rng.uniform(0.8, 3)
        d = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / max(np.hypot(y1 - y0, x1 - x0), 1)
        inside = ((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0) >= 0) & ((xx - x1) * (x0 - x1) + (yy - y1) * (y0 - y1) >= 0)
        m |= (d < width) & inside
    return m


@pytest.mark.parametrize("seed", range(6))
def test_cldice_matches_direct_formula(seed):
    pred, gt = vessel_like(seed), vessel_like(seed + 50)
    pred |= gt & (np.random.default_rng(seed).random(gt.shape) < 0.7)  # overlap so the value is not trivial
    value = M.cldice(pred, gt)
    assert 0 < value < 1
    assert value == pytest.approx(direct_cldice(pred, gt), abs=1e-9)


def test_betti0_error_counts_8_connected_components():
    gt = np.zeros((20, 20), bool)
    gt[2, 2:10] = True  # one component
    pred = gt.copy()
    pred[10, 10] = pred[11, 11] = True  # diagonal pair: one 8-connected component
    pred[15, 2] = True
    n_pred = ndimage.label(pred, structure=np.ones((3, 3)))[1]
    assert n_pred == 3
    assert M.betti0_error(pred, gt) == pytest.approx((3 - 1) / 3)
    assert M.betti0_error(gt, gt) == 0


def test_length_ratio_is_skeleton_length_ratio():
    gt = np.zeros((40, 40), bool)
    gt[10:13, 5:35] = True
    pred = np.zeros_like(gt)
    pred[10:13, 5:20] = True
    expected = skeletonize(pred).sum() / skeletonize(gt).sum()
    assert M.length_ratio(pred, gt) == pytest.approx(expected)
    assert 0.4 < M.length_ratio(pred, gt) < 0.6


def test_empty_conventions():
    empty = np.zeros((8, 8), bool)
    full = np.ones((8, 8), bool)
    both_empty = M.compute_metrics(empty, empty)
    assert both_empty["dice"] == both_empty["iou"] == both_empty["recall"] == both_empty["precision"] == 1
    assert both_empty["cldice"] == 1 and both_empty["betti0_error"] == 0 and both_empty["length_ratio"] == 1
    assert M.dice(full, empty) == 0 and M.iou(full, empty) == 0
    assert M.recall(full, empty) == 1  # nothing to find
    assert M.precision(empty, full) == 1  # nothing claimed
    assert M.recall(empty, full) == 0
    assert M.cldice(full, empty) == 0 and M.cldice(empty, full) == 0


def test_fov_excludes_outside_pixels():
    pred, gt = random_masks(7, shape=(32, 32))
    fov = np.zeros_like(pred)
    fov[8:24, 8:24] = True
    noisy = pred.copy()
    noisy[~fov] = ~noisy[~fov]  # change every pixel outside the FOV
    assert M.compute_metrics(pred, gt, fov) == M.compute_metrics(noisy, gt, fov)
    assert M.dice(pred, gt, fov) == pytest.approx(M.dice(pred[8:24, 8:24], gt[8:24, 8:24]))


def test_shape_and_dtype_errors_name_the_problem():
    a = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match=r"pred shape \(4, 5\) differs from gt shape \(4, 4\)"):
        M.dice(np.zeros((4, 5), bool), a)
    with pytest.raises(ValueError, match="fov shape"):
        M.dice(a, a, np.zeros((3, 3), bool))
    with pytest.raises(TypeError, match="threshold probabilities first"):
        M.dice(np.zeros((4, 4), np.float32), a)
    with pytest.raises(ValueError, match="only 0 and 1"):
        M.dice(np.full((4, 4), 255, np.uint8), a)
    with pytest.raises(ValueError, match="2-D"):
        M.dice(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute_metrics(a, a, names=["dice", "hausdorff"])


masks = arrays(bool, (12, 12))
BOUNDED = ["dice", "iou", "recall", "precision", "cldice", "betti0_error"]


@settings(max_examples=150, deadline=None)
@given(masks, masks)
def test_bounds_and_symmetry(pred, gt):
    m = M.compute_metrics(pred, gt)
    for name in BOUNDED:
        assert 0.0 <= m[name] <= 1.0, name
    assert m["length_ratio"] >= 0
    swapped = M.compute_metrics(gt, pred)
    for name in ("dice", "iou", "cldice", "betti0_error"):
        assert m[name] == pytest.approx(swapped[name]), name
    assert m["recall"] == pytest.approx(swapped["precision"])
    assert m["iou"] <= m["dice"] + 1e-12  # IoU = D / (2 - D) <= D


@settings(max_examples=100, deadline=None)
@given(masks)
def test_perfect_prediction_scores_one(gt):
    m = M.compute_metrics(gt, gt)
    assert m["dice"] == m["iou"] == m["recall"] == m["precision"] == m["cldice"] == m["length_ratio"] == 1.0
    assert m["betti0_error"] == 0.0
