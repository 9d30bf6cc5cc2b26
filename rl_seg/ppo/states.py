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

__all__ = ["State", "load_states", "thin_vessel_fraction", "DataOrder"]


@dataclass
class State:
    id: str  # "<dataset>/<sample id>", unique across datasets
    image: np.ndarray  # uint8 H x W x 3
    gt: np.ndarray  # bool H x W
    fov: np.ndarray | None  # bool H x W


def _resize(sample: Sample, size: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if size is None:
        return np.array(sample.image), np.array(sample.mask), None if sample.fov is None else np.array(sample.fov)
    image = np.asarray(Image.fromarray(sample.image).resize((size, size), Image.BILINEAR))
    # Masks by area: a vessel pixel survives when it covers at least half of the output pixel, so thin vessels
    # thin out rather than vanish at random (nearest-neighbour would drop them by sampling phase).
    def area(mask: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BOX)) >= 128

    return image, area(sample.mask), None if sample.fov is None else area(sample.fov)


def load_states(datasets: Sequence[str], split: str, size: int | None, limit: int | None = None) -> list[State]:
    states = []
    for name in datasets:
        dataset = load_dataset(name, split, limit=limit)
        for sample in dataset:
            image, gt, fov = _resize(sample, size)
            states.append(State(f"{dataset.name}/{sample.id}", image, gt, fov))
    return states


def thin_vessel_fraction(mask: np.ndarray, max_width: float = 2.0) -> float:
    """Fraction of vessel pixels on vessels at most ``max_width`` px wide (distance to background <= width/2+0.5)."""
    if not mask.any():
        return 0.0
    depth = ndimage.distance_transform_edt(mask)
    return float((depth[mask] <= max_width / 2 + 0.5).mean())


class DataOrder:
    """Epoch-wise permutations of state indices; with ``curriculum`` the first epoch is sorted easy-first."""

    def __init__(self, difficulty: Sequence[float], seed: int, curriculum: bool = False):
        self.difficulty = list(difficulty)
        self.seed = seed
        self.curriculum = curriculum
        self.epoch = 0
        self.cursor = 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        n = len(self.difficulty)
        if self.curriculum and self.epoch == 0:
            return sorted(range(n), key=lambda i: (self.difficulty[i], i))
        order = list(range(n))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        batch = []
        while len(batch) < size:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._make_order()
            batch.append(self._order[self.cursor])
            self.cursor += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "curriculum": self.curriculum}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.curriculum = state["seed"], state["curriculum"]
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._make_order()
