"""Composite rewards: named, weighted components of one mask's score.

A reward is ``total = sum_i weight_i * component_i(pair)``; every call returns the total and each component's
raw value, so runs can log the breakdown. Components are small pure functions of a :class:`MaskPair`, kept in
the :data:`COMPONENTS` registry; a reward is a mapping from component name to weight.

Two presets:

``seed``
    The original plan, exactly: 0.5 x (10 x dice) + 0.2 x recall_bonus + 0.2 x (2 x topology) + 0.1 x
    length_reward, with recall_bonus = (recall - 0.85) x 5 if recall < 0.85 else 0, topology = -(connected
    components of the predicted skeleton) + 0.1 x (skeleton junctions), length_reward = -3 x |1 - length_ratio|.
    Its topology term looks only at the prediction, so it can be gamed: every spur added to a vessel adds a
    junction and raises it while Dice falls (``tests/test_rewards_composite.py`` shows this).

``default``
    Bounded components, each in [0, 1], with topology measured against the ground truth (clDice, Betti-0
    agreement) so that extra branches or specks can only lower it. The total is normalized by the sum of the
    weights and therefore also lies in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .metrics import MaskPair, Target

__all__ = ["COMPONENTS", "PRESETS", "CompositeReward", "RewardResult", "get_reward", "register_component"]


@dataclass(frozen=True)
class Component:
    fn: Callable[[MaskPair], float]
    bounds: tuple[float, float]
    doc: str


COMPONENTS: dict[str, Component] = {}


def register_component(name: str, bounds: tuple[float, float], doc: str):
    """Register ``fn(pair) -> float`` as a reward component called ``name`` with the given value bounds."""

    def wrap(fn: Callable[[MaskPair], float]):
        if name in COMPONENTS:
            raise ValueError(f"reward component {name!r} is already registered")
        COMPONENTS[name] = Component(fn, bounds, doc)
        return fn

    return wrap


_INF = float("inf")

# --- bounded components (the default reward) -------------------------------------------------------------

register_component("dice", (0, 1), "Dice overlap with the ground truth")(MaskPair.dice)
register_component("iou", (0, 1), "intersection over union")(MaskPair.iou)
register_component("recall", (0, 1), "fraction of vessel pixels found")(MaskPair.recall)
register_component("precision", (0, 1), "fraction of predicted pixels that are vessel")(MaskPair.precision)
register_component("cldice", (0, 1), "centreline Dice (Shit et al. 2021), topology against the ground truth")(
    MaskPair.cldice
)


@register_component("betti0", (0, 1), "1 - betti0_error: agreement of connected-component counts with the truth")
def betti0_agreement(pair: MaskPair) -> float:
    return 1.0 - pair.betti0_error()


@register_component("length", (0, 1), "min(r, 1/r) for the skeleton length ratio r: 1 when lengths agree")
def length_agreement(pair: MaskPair) -> float:
    r = pair.length_ratio()
    return 0.0 if r == 0 else min(r, 1.0 / r)


# --- the original plan's terms (the `seed` preset), unbounded and prediction-only -----------------------


@register_component("seed_dice", (0, 10), "10 x dice")
def seed_dice(pair: MaskPair) -> float:
    return 10.0 * pair.dice()


@register_component("seed_recall_bonus", (-4.25, 0), "(recall - 0.85) x 5 below recall 0.85, else 0")
def seed_recall_bonus(pair: MaskPair) -> float:
    r = pair.recall()
    return (r - 0.85) * 5.0 if r < 0.85 else 0.0


@register_component("seed_topology", (-_INF, _INF), "2 x (-(skeleton components) + 0.1 x skeleton junctions)")
def seed_topology(pair: MaskPair) -> float:
    return 2.0 * (-pair.pred_skeleton_components + 0.1 * pair.pred_skeleton_junctions)


@register_component("seed_length", (-_INF, 0), "-3 x |1 - length_ratio|")
def seed_length(pair: MaskPair) -> float:
    return -3.0 * abs(1.0 - pair.length_ratio())


PRESETS: Mapping[str, Mapping[str, float]] = {
    "seed": {"seed_dice": 0.5, "seed_recall_bonus": 0.2, "seed_topology": 0.2, "seed_length": 0.1},
    "default": {"dice": 0.4, "cldice": 0.3, "recall": 0.15, "betti0": 0.1, "length": 0.05},
}


@dataclass(frozen=True)
class RewardResult:
    total: float
    components: dict[str, float] = field(default_factory=dict)


class CompositeReward:
    """A weighted sum of registered components; ``normalize`` divides by the sum of the weights."""

    def __init__(self, weights: Mapping[str, float], *, normalize: bool = False, name: str = "custom"):
        if not weights:
            raise ValueError("a reward needs at least one component")
        unknown = [k for k in weights if k not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown reward component(s) {unknown}; known: {sorted(COMPONENTS)}")
        bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or w != w}
        if bad:
            raise ValueError(f"reward weights must be numbers, got {bad}")
        self.name = name
        self.weights = {k: float(w) for k, w in weights.items()}
        self.normalize = normalize
        total_weight = sum(abs(w) for w in self.weights.values())
        if normalize and total_weight == 0:
            raise ValueError("a normalized reward needs a non-zero weight")
        self._scale = 1.0 / total_weight if normalize else 1.0
        # Resolved now, so a reward pickled to a Ray actor carries its functions with it.
        self._fns = {k: COMPONENTS[k].fn for k in self.weights}

    def score_pair(self, pair: MaskPair) -> RewardResult:
        components = {k: float(fn(pair)) for k, fn in self._fns.items()}
        total = self._scale * sum(self.weights[k] * v for k, v in components.items())
        return RewardResult(total, components)

    def __call__(self, pred, gt=None, fov=None, *, target: Target | None = None) -> RewardResult:
        """Score ``pred`` against ``gt`` (and ``fov``), or against a prepared ``target`` shared by many calls."""
        if target is None:
            if gt is None:
                raise ValueError("give either gt (and fov) or a prepared target")
            target = Target(gt, fov)
        return self.score_pair(MaskPair(pred, target))

    def spec(self) -> dict:
        return {"name": self.name, "weights": dict(self.weights), "normalize": self.normalize}

    def __repr__(self) -> str:
        return f"CompositeReward({self.spec()})"


def get_reward(spec: str | Mapping[str, float] | CompositeReward) -> CompositeReward:
    """A reward from a preset name, a ``{component: weight}`` mapping (normalized), or a ready reward."""
    if isinstance(spec, CompositeReward):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown reward preset {spec!r}; presets: {sorted(PRESETS)}")
        return CompositeReward(PRESETS[spec], normalize=spec != "seed", name=spec)
    return CompositeReward(spec, normalize=True)
