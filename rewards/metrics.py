"""Per-image metrics of a predicted vessel mask against its ground truth.

Conventions (shared with every report of the project, see DESIGN.md):

* Inputs are boolean 2-D arrays of one shape; a field-of-view (FOV) mask, where given, restricts every metric to
  the pixels inside it. Masks of different shapes are a ``ValueError``, never broadcast.
* A ratio whose denominator is zero scores 1.0 (nothing to find, or nothing claimed): two empty masks have
  Dice = IoU = 1, recall with an empty ground truth is 1, precision with an empty prediction is 1. An empty
  ground truth with a non-empty prediction has Dice 0.
* clDice follows Shit et al., "clDice - a novel topology-preserving loss function for tubular structure
  segmentation", CVPR 2021, on scikit-image skeletons: Tprec = |S(pred) & gt| / |S(pred)|,
  Tsens = |S(gt) & pred| / |S(gt)|, clDice = 2 Tprec Tsens / (Tprec + Tsens). Two empty masks score 1, an empty
  and a non-empty one 0.
* Connectivity is 8-neighbourhood everywhere (a diagonal step continues a 1-pixel vessel).

Everything derived from a mask (counts, skeletons, component labels) is computed once per mask by
:class:`Target` / :class:`MaskPair` and shared by all metrics and reward components, so scoring K sampled masks
against one ground truth skeletonizes the ground truth once.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable, Mapping

import numpy as np
from scipy import ndimage
from skimage.measure import label
from skimage.morphology import skeletonize

__all__ = [
    "Target",
    "MaskPair",
    "METRICS",
    "compute_metrics",
    "as_mask",
    "dice",
    "iou",
    "recall",
    "precision",
    "cldice",
    "betti0_error",
    "length_ratio",
]

_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.uint8)


def as_mask(array, name: str = "mask") -> np.ndarray:
    """Return ``array`` as a 2-D boolean array, or raise naming ``name`` and what is wrong with it.

    Integer arrays are accepted when they hold only 0 and 1; floating-point arrays are refused because a
    probability map needs an explicit threshold first.
    """
    a = np.asarray(array)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D mask, got shape {a.shape}")
    if a.dtype == bool:
        # scikit-image's Cython kernels refuse read-only buffers (arrays fresh from Ray's object store)
        return a if a.flags.writeable else a.copy()
    if np.issubdtype(a.dtype, np.integer):
        values = np.unique(a)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError(f"{name}: integer mask must hold only 0 and 1, found values {values[:5].tolist()}")
        return a.astype(bool)
    raise TypeError(f"{name}: expected a boolean mask, got dtype {a.dtype} (threshold probabilities first)")


def _ratio(numerator: float, denominator: float) -> float:
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def _skeleton(mask: np.ndarray) -> np.ndarray:
    return skeletonize(mask) if mask.any() else np.zeros_like(mask)


def _component_count(mask: np.ndarray) -> int:
    return int(label(mask, connectivity=2).max()) if mask.any() else 0


class Target:
    """A ground-truth mask (inside its FOV) with its derived quantities, computed lazily and cached."""

    def __init__(self, gt, fov=None):
        gt = as_mask(gt, "gt")
        if fov is not None:
            fov = as_mask(fov, "fov")
            if fov.shape != gt.shape:
                raise ValueError(f"fov shape {fov.shape} differs from gt shape {gt.shape}")
            gt = gt & fov
        self.mask = gt
        self.fov = fov

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    @cached_property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @cached_property
    def skeleton(self) -> np.ndarray:
        return _skeleton(self.mask)

    @cached_property
    def skeleton_length(self) -> int:
        return int(np.count_nonzero(self.skeleton))

    @cached_property
    def components(self) -> int:
        return _component_count(self.mask)

    def restrict(self, pred: np.ndarray) -> np.ndarray:
        """Validate a prediction against this target and clip it to the FOV."""
        pred = as_mask(pred, "pred")
        if pred.shape != self.mask.shape:
            raise ValueError(f"pred shape {pred.shape} differs from gt shape {self.mask.shape}")
        return pred & self.fov if self.fov is not None else pred


class MaskPair:
    """A prediction scored against a :class:`Target`; every derived quantity is computed at most once."""

    def __init__(self, pred, target: Target):
        self.target = target
        self.pred = target.restrict(pred)

    @classmethod
    def of(cls, pred, gt, fov=None) -> "MaskPair":
        return cls(pred, Target(gt, fov))

    @cached_property
    def tp(self) -> int:
        return int(np.count_nonzero(self.pred & self.target.mask))

    @cached_property
    def pred_area(self) -> int:
        return int(np.count_nonzero(self.pred))

    @property
    def fp(self) -> int:
        return self.pred_area - self.tp

    @property
    def fn(self) -> int:
        return self.target.area - self.tp

    @cached_property
    def pred_skeleton(self) -> np.ndarray:
        return _skeleton(self.pred)

    @cached_property
    def pred_skeleton_length(self) -> int:
        return int(np.count_nonzero(self.pred_skeleton))

    @cached_property
    def pred_components(self) -> int:
        return _component_count(self.pred)

    @cached_property
    def pred_skeleton_components(self) -> int:
        return _component_count(self.pred_skeleton)

    @cached_property
    def pred_skeleton_junctions(self) -> int:
        """Skeleton pixels with three or more skeleton neighbours (branch points)."""
        skel = self.pred_skeleton
        if not skel.any():
            return 0
        neighbours = ndimage.convolve(skel.astype(np.uint8), _NEIGHBOURS, mode="constant")
        return int(np.count_nonzero(skel & (neighbours >= 3)))

    # --- metrics -------------------------------------------------------------------------------------------

    def dice(self) -> float:
        return _ratio(2 * self.tp, self.pred_area + self.target.area)

    def iou(self) -> float:
        return _ratio(self.tp, self.pred_area + self.target.area - self.tp)

    def recall(self) -> float:
        return _ratio(self.tp, self.target.area)

    def precision(self) -> float:
        return _ratio(self.tp, self.pred_area)

    def cldice(self) -> float:
        pred_empty, gt_empty = self.pred_area == 0, self.target.area == 0
        if pred_empty and gt_empty:
            return 1.0
        if pred_empty or gt_empty:
            return 0.0
        t_prec = _ratio(np.count_nonzero(self.pred_skeleton & self.target.mask), self.pred_skeleton_length)
        t_sens = _ratio(np.count_nonzero(self.target.skeleton & self.pred), self.target.skeleton_length)
        if t_prec + t_sens == 0:
            return 0.0
        return 2.0 * t_prec * t_sens / (t_prec + t_sens)

    def betti0_error(self) -> float:
        """|b0(pred) - b0(gt)| / max(b0(pred), b0(gt), 1): 0 when the component counts agree, at most 1."""
        a, b = self.pred_components, self.target.components
        return abs(a - b) / max(a, b, 1)

    def length_ratio(self) -> float:
        """Skeleton length of the prediction over that of the ground truth (1.0 where the latter is 0)."""
        return _ratio(self.pred_skeleton_length, self.target.skeleton_length)


MetricFn = Callable[[MaskPair], float]

#: Every per-image metric by name, in report order.
METRICS: Mapping[str, MetricFn] = {
    "dice": MaskPair.dice,
    "iou": MaskPair.iou,
    "recall": MaskPair.recall,
    "precision": MaskPair.precision,
    "cldice": MaskPair.cldice,
    "betti0_error": MaskPair.betti0_error,
    "length_ratio": MaskPair.length_ratio,
}


def compute_metrics(pred, gt, fov=None, names=None) -> dict[str, float]:
    """All (or the named) metrics of one prediction, sharing the derived quantities between them."""
    pair = MaskPair.of(pred, gt, fov)
    unknown = set(names or ()) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {list(METRICS)}")
    return {name: METRICS[name](pair) for name in (names or METRICS)}


def _single(name: str) -> Callable[..., float]:
    def metric(pred, gt, fov=None) -> float:
        return METRICS[name](MaskPair.of(pred, gt, fov))

    metric.__name__ = name
    metric.__doc__ = f"{name} of boolean ``pred`` against ``gt`` inside ``fov`` (see the module conventions)."
    return metric


dice = _single("dice")
iou = _single("iou")
recall = _single("recall")
precision = _single("precision")
cldice = _single("cldice")
betti0_error = _single("betti0_error")
length_ratio = _single("length_ratio")
