"""Hybrid placement: rollouts sampled inside the learner ranks, on the weights they train (verl's hybrid engine).

With ``placement=hybrid`` there are no rollout actors: each Ray Train worker samples the images of its own shard
with its DeepSpeed engine's module, so a GPU holds one copy of the model and no adapter is ever exported or loaded.
The forward that draws the masks is the old policy's (the same network on the same input in the same process, in
the same autocast), so its logits and values are kept and the learner does not recompute them; it also keeps the
frozen towers' outputs (``SegPolicy.encode_frozen``) for the reference pass and every PPO epoch. Per image and
iteration the frozen towers then run once, and the trainable path once plus once per epoch and reference pass.

Rank 0's coordinator still draws the images (``DataOrder``), seeds the draws exactly as for rollout actors and
scores every mask in the CPU reward pool: rank 0's own images are scored while it samples the next ones; the other
ranks' masks reach it through one gather. Positions are sharded as the learner shards them (position % world), so
each rank learns on the images it sampled.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch
import torch.distributed as dist

from ..policy.base import autocast_for
from ..policy.distribution import sample_masks
from ..ppo.config import TrainConfig
from ..ppo.states import dihedral_view
from .rollout import packed_sample, peak_memory_gib

__all__ = ["HybridRollout", "frozen_kwargs", "cat_frozen"]


def frozen_kwargs(frozen) -> dict:
    """``forward`` keyword for frozen-tower features (none for policies that have no frozen tower)."""
    return {} if frozen is None else {"frozen": frozen}


def cat_frozen(items: list):
    """Frozen-tower features of several images as one batch; None unless every image has them."""
    if not items or any(f is None for f in items):
        return None
    return type(items[0]).cat(items)


class HybridRollout:
    """The sampling side of one learner rank. ``engine``: its DeepSpeed engine (whose module is a ``PPOModule``)."""

    def __init__(self, engine, cfg: TrainConfig, rank: int, world: int, train_states: list | None = None):
        self.engine = engine
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.train_states = train_states
        self.device = engine.device
        self.cache: dict[int, dict] = {}

    @property
    def policy(self):
        return self.engine.module.policy

    # --- one rank's work ----------------------------------------------------------------------------------------
    def forward_old(self, images: list[np.ndarray]) -> list[dict]:
        """Preprocess, frozen towers, logits and value of images with the current weights (no gradient), one
        forward for the trainable path: what the learner would compute as the old policy, image by image (logits
        cropped to each image's size)."""
        policy = self.policy
        inputs = [policy.preprocess([image]) for image in images]
        with torch.no_grad(), autocast_for(self.device):
            frozen = [policy.encode_frozen(x) if self.cfg.learner.reuse_frozen_towers else None for x in inputs]
            logits, value = self.engine(policy.collate(inputs), **frozen_kwargs(cat_frozen(frozen)))
        out = []
        for n, (x, f, image) in enumerate(zip(inputs, frozen, images)):
            h, w = policy.output_size(image.shape[:2])
            out.append({"inputs": x, "frozen": f, "logits": logits[n:n + 1, :h, :w].float(),
                        "value": value[n:n + 1].float()})
        return out

    def sample(self, items: list[tuple[int, str, np.ndarray, np.ndarray | None, int]], version: int,
               on_reply=None) -> dict:
        """K masks for each ``(position, id, image, fov, seed)``, cached for this rank's update; replies shaped as
        a rollout actor's (``on_reply(position, reply)`` as each micro-batch is ready, so that the reward pool
        scores it while the next one is sampled)."""
        cfg = self.cfg
        replies = {}
        step = cfg.learner.micro_batch_images
        for first in range(0, len(items), step):
            group = items[first:first + step]
            start = time.perf_counter()
            olds = self.forward_old([image for _, _, image, _, _ in group])
            for (pos, state_id, image, fov, seed), old in zip(group, olds):
                valid = None if fov is None else torch.from_numpy(np.array(fov))
                masks = sample_masks(old["logits"], cfg.rollout.samples_per_image, cfg.rollout.temperature, seed,
                                     valid)
                self.cache[pos] = old
                replies[pos] = {"version": version, "incarnation": f"learner-rank-{self.rank}", "sync_s": 0.0,
                                "sample_s": (time.perf_counter() - start) / len(group),
                                "samples": [packed_sample(state_id, masks.cpu().numpy())],
                                "peak_memory_gib": peak_memory_gib(self.device)}
            if on_reply is not None:
                for pos, *_ in group:
                    on_reply(pos, replies[pos])
        return replies

    def take(self) -> dict[int, dict]:
        """This iteration's cached rollouts (by batch position), handed to ``learn`` once."""
        cache, self.cache = self.cache, {}
        return cache

    def predict(self, states: list[tuple[str, tuple]]) -> dict[str, np.ndarray]:
        """Vessel probabilities (float16) for validation states ``(id, (image, gt, fov))`` with the current weights."""
        probs = {}
        for state_id, (image, _, _) in states:
            inputs = self.policy.preprocess([image])
            with torch.no_grad(), autocast_for(self.device):
                logits, _ = self.engine(inputs)
            probs[state_id] = torch.sigmoid(logits.float())[0].cpu().numpy().astype(np.float16)
        return probs

    # --- the ranks together ---------------------------------------------------------------------------------------
    def lead(self, version: int, plan: list[tuple[int, int, int, int]], states: list[tuple], ids: list[str],
             on_reply) -> dict:
        """Rank 0 (the coordinator's side): ``plan`` is ``(position, state index, seed, view)`` per image, ``states``
        the drawn states in their views. Every rank samples its positions with adapter ``version``."""
        if self.world > 1:
            dist.broadcast_object_list([(version, plan)], src=0)
        mine = [(pos, ids[pos], states[pos][0], states[pos][2], seed) for pos, _, seed, _ in plan
                if pos % self.world == 0]
        replies = self.sample(mine, version, on_reply)
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.gather_object(None, gathered, dst=0)
            for others in gathered[1:]:
                for pos, reply in others.items():
                    replies[pos] = reply
                    on_reply(pos, reply)
        return replies

    def follow(self) -> None:
        """Ranks > 0: receive rank 0's plan, sample this rank's positions, send the masks to rank 0."""
        box = [None]
        dist.broadcast_object_list(box, src=0)
        version, plan = box[0]
        mine = []
        for pos, index, seed, view in plan:
            if pos % self.world != self.rank:
                continue
            state_id, refs = self.train_states[index]
            image, _, fov = ray.get(refs[0])
            if view:
                image, fov = dihedral_view(image, view), None if fov is None else dihedral_view(fov, view)
            mine.append((pos, state_id, image, fov, seed))
        dist.gather_object(self.sample(mine, version), None, dst=0)
