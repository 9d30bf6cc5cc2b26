"""PPO states: the training images (resized once), their order, and the curriculum.

The order of images is part of a run's state: it is saved with every checkpoint, so a resumed run draws exactly
the batch the stopped run would have drawn next.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data import Sample, load_dataset

__all__ = ["State", "load_states", "thin_vessel_fraction", "DataOrder", "VIEWS", "draw_views", "dihedral_view",
           "undo_dihedral_view"]


@dataclass
class State:
    id: str  # "<dataset>/<sample id>", unique across datasets
    image: np.ndarray  # uint8 H x W x 3
    gt: np.ndarray  # bool H x W
    fov: np.ndarray | None  # bool H x W


def _resize(sample: Sample, size: int | None,
            label_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    image = np.array(sample.image) if size is None else \
        np.asarray(Image.fromarray(sample.image).resize((size, size), Image.BILINEAR))
    label_size = label_size or size
    if label_size is None:
        return image, np.array(sample.mask), None if sample.fov is None else np.array(sample.fov)

    # Masks by area: a vessel pixel survives when it covers at least half of the output pixel, so thin vessels
    # thin out rather than vanish at random (nearest-neighbour would drop them by sampling phase).
    def area(mask: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((label_size, label_size),
                                                                                Image.BOX)) >= 128

    return image, area(sample.mask), None if sample.fov is None else area(sample.fov)


def load_states(datasets: Sequence[str], split: str, size: int | None, limit: int | None = None,
                label_size: int | None = None) -> list[State]:
    """The split's images as PPO states; ``size`` resizes images and targets, ``label_size`` only the targets
    (a policy that acts on its own coarser grid, e.g. Sa2VA's ``action_resolution=native``)."""
    states = []
    for name in datasets:
        dataset = load_dataset(name, split, limit=limit)
        for sample in dataset:
            image, gt, fov = _resize(sample, size, label_size)
            states.append(State(f"{dataset.name}/{sample.id}", image, gt, fov))
    return states


VIEWS = 8  # the symmetries of the pixel grid: 4 quarter turns, each with or without a mirror


def draw_views(seed: int, iteration: int, n: int) -> list[int]:
    """The views of one iteration's n images: a function of seed and iteration, so a resumed run repeats them."""
    return [int(v) for v in np.random.default_rng([seed, iteration]).integers(VIEWS, size=n)]


def dihedral_view(array: np.ndarray, view: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """``view % 4`` quarter turns in the plane of ``axes``, then a mirror when ``view >= 4``.

    Exact on the pixel grid (no interpolation): masks stay binary and pixel counts (Dice, recall, precision)
    are those of the original. Skeletons are not exactly turned with the image (thinning runs in raster order),
    so masks are scored after ``undo_dihedral_view``, in the orientation their targets are held in.
    """
    out = np.rot90(array, view % 4, axes=axes)
    if view >= 4:
        out = np.flip(out, axis=axes[1])
    return np.ascontiguousarray(out)


def undo_dihedral_view(array: np.ndarray, view: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The inverse of ``dihedral_view``: back to the image's own orientation."""
    out = np.flip(array, axis=axes[1]) if view >= 4 else array
    return np.ascontiguousarray(np.rot90(out, -(view % 4), axes=axes))


def thin_vessel_fraction(mask: np.ndarray, max_width: float = 2.0) -> float:
    """Fraction of vessel pixels on vessels at most ``max_width`` px wide (distance to background <= width/2+0.5)."""
    if not mask.any():
        return 0.0
    depth = ndimage.distance_transform_edt(mask)
    return float((depth[mask] <= max_width / 2 + 0.5).mean())


class DataOrder:
    """Epoch-wise permutations of state indices; with ``curriculum`` the first epoch is sorted easy-first.

    With ``groups`` (one label per state, e.g. its dataset) the groups take turns, one image each, so every
    group is drawn equally often whatever its size - as ``rl-seg sft`` samples datasets - and each group runs
    through its own epoch-wise permutations (a 16-image DRIVE beside 300 ARCADE images would otherwise be 5% of
    every batch). Without groups, or with one, every image is drawn once per epoch.
    """

    def __init__(self, difficulty: Sequence[float], seed: int, curriculum: bool = False,
                 groups: Sequence[str] | None = None):
        self.difficulty = list(difficulty)
        self.seed = seed
        self.curriculum = curriculum
        labels = list(groups) if groups is not None else [""] * len(self.difficulty)
        if len(labels) != len(self.difficulty):
            raise ValueError(f"groups has {len(labels)} labels for {len(self.difficulty)} states")
        if not labels:
            raise ValueError("no training states to draw from")
        names = list(dict.fromkeys(labels))  # first-seen order: stable across runs of the same data
        self.members = [[i for i, g in enumerate(labels) if g == name] for name in names]
        self.slot = 0  # images drawn so far: which group draws next
        self.epochs = [0] * len(self.members)
        self.cursors = [0] * len(self.members)
        self._orders = [self._make_order(g) for g in range(len(self.members))]

    def _make_order(self, g: int) -> list[int]:
        members = self.members[g]
        if self.curriculum and self.epochs[g] == 0:
            return sorted(members, key=lambda i: (self.difficulty[i], i))
        order = list(members)
        # Group 0 keeps the ungrouped seed, so one group draws exactly the plain order.
        random.Random(self.seed * 100_003 + self.epochs[g] + 7_919 * g).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        batch = []
        for _ in range(size):
            g = self.slot % len(self.members)
            self.slot += 1
            if self.cursors[g] >= len(self._orders[g]):
                self.epochs[g] += 1
                self.cursors[g] = 0
                self._orders[g] = self._make_order(g)
            batch.append(self._orders[g][self.cursors[g]])
            self.cursors[g] += 1
        return batch

    @property
    def epoch(self) -> int:
        """Completed passes over the smallest group (over all images when ungrouped)."""
        return min(self.epochs)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "curriculum": self.curriculum, "slot": self.slot,
                "epochs": list(self.epochs), "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.curriculum = state["seed"], state["curriculum"]
        if "epochs" not in state:  # checkpoints written before groups existed: one group
            state = {**state, "slot": 0, "epochs": [state["epoch"]], "cursors": [state["cursor"]]}
        if len(state["epochs"]) != len(self.members):
            raise ValueError(f"the checkpoint's data order has {len(state['epochs'])} groups, this run's data "
                             f"{len(self.members)}: resume with the same data.datasets and balance_datasets")
        self.slot, self.epochs, self.cursors = state["slot"], list(state["epochs"]), list(state["cursors"])
        self._orders = [self._make_order(g) for g in range(len(self.members))]
