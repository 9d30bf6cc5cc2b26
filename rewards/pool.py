"""The reward pool: CPU Ray actors that score batches of masks in parallel.

Scoring is CPU work (skeletons, component labels) that would otherwise sit on the rollout's critical path, so
a pool of single-CPU actors takes it. The pool promises that every submitted mask comes back with an outcome,
in order:

* a mask whose scoring raises becomes a failed :class:`ScoreOutcome` carrying the error;
* a chunk that runs past its deadline (``timeout_s`` per mask) has its actor killed and replaced, and its masks
  are retried one at a time, so the one mask that hangs is the one recorded as a timeout;
* a dead actor is replaced and its chunk is retried the same way; a mask that kills an actor on every
  attempt (``max_attempts``) becomes a failure, never a crashed run.

``actor_setup(role)`` runs first in every scoring actor (``role`` is ``reward-<slot>``): the training job
passes the hook that sends the actor's output to the run folder's logs. Failures and restarts are counted in :attr:`RewardPool.stats` and the last failures are kept in
:attr:`RewardPool.failures`, so a caller (the training driver, the status service) can show them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError

from .composite import CompositeReward, get_reward
from .scoring import PackedMask, ScoreOutcome, TargetCache, pack_mask, score_items

__all__ = ["RewardPool", "RewardScorer", "PoolStats", "Failure"]

log = logging.getLogger(__name__)


@ray.remote(max_restarts=0, max_concurrency=1)
class RewardScorer:
    """One scoring actor: holds the reward and a cache of prepared ground truths."""

    def __init__(self, reward: CompositeReward, cache_capacity: int = 512, role: str = "reward",
                 setup: Callable[[str], None] | None = None):
        self.role = role
        if setup is not None:
            setup(role)
        self.reward = reward
        self.targets = TargetCache(cache_capacity)

    def __repr__(self) -> str:  # Ray names the actor's log lines and errors by it
        return self.role

    def ready(self) -> bool:
        return True

    def score(self, target_refs: Mapping[str, list], items: Sequence[tuple[str, PackedMask]]) -> list[ScoreOutcome]:
        # Refs arrive wrapped in a list so Ray does not resolve them eagerly: a cached target is never fetched.
        return score_items(self.reward, items, self.targets, lambda tid: ray.get(target_refs[tid][0]))


@dataclass
class Failure:
    index: int
    target_id: str
    error: str
    attempts: int


@dataclass
class PoolStats:
    scored: int = 0
    failed: int = 0
    timeouts: int = 0
    actor_restarts: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Chunk:
    indices: list[int]
    attempts: int = 0
    started: float = 0.0


class RewardPool:
    """Score ``(target_id, mask)`` items on ``num_actors`` Ray actors; call :meth:`add_targets` first."""

    def __init__(
        self,
        reward: str | Mapping[str, float] | CompositeReward = "default",
        num_actors: int = 2,
        *,
        num_cpus_per_actor: float = 1.0,
        timeout_s: float = 30.0,
        max_attempts: int = 2,
        chunk_size: int | None = None,
        keep_failures: int = 100,
        actor_setup: Callable[[str], None] | None = None,
    ):
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {num_actors}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.reward = get_reward(reward)
        self.num_cpus_per_actor = num_cpus_per_actor
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.chunk_size = chunk_size
        self.stats = PoolStats()
        self.failures: deque[Failure] = deque(maxlen=keep_failures)
        self._target_refs: dict[str, list] = {}
        self._reward_ref = ray.put(self.reward)
        self._actor_setup = actor_setup
        self._actors = [self._new_actor(slot) for slot in range(num_actors)]
        ray.get([a.ready.remote() for a in self._actors])

    # --- set-up ----------------------------------------------------------------------------------------

    def _new_actor(self, slot: int):
        return RewardScorer.options(num_cpus=self.num_cpus_per_actor).remote(
            self._reward_ref, role=f"reward-{slot}", setup=self._actor_setup)

    def add_targets(self, targets: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Put ground truths (and FOVs) into the object store once; actors fetch and cache them on first use."""
        for target_id, (gt, fov) in targets.items():
            gt = np.asarray(gt, dtype=bool)
            fov = None if fov is None else np.asarray(fov, dtype=bool)
            self._target_refs[str(target_id)] = [ray.put((gt, fov))]

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    # --- scoring ---------------------------------------------------------------------------------------

    def score(self, items: Iterable[tuple[str, np.ndarray | PackedMask]]) -> list[ScoreOutcome]:
        """One outcome per item, in order. Never raises for a bad sample: failures are outcomes, counted."""
        start = time.perf_counter()
        items = [(str(t), m if isinstance(m, PackedMask) else pack_mask(m)) for t, m in items]
        missing = sorted({t for t, _ in items} - set(self._target_refs))
        if missing:
            raise KeyError(f"no ground truth added for target id(s) {missing[:5]}: call add_targets first")
        outcomes: list[ScoreOutcome | None] = [None] * len(items)
        size = self.chunk_size or max(1, min(16, math.ceil(len(items) / (4 * self.num_actors))))
        queue = deque(_Chunk(list(range(i, min(i + size, len(items))))) for i in range(0, len(items), size))
        idle = list(range(self.num_actors))
        running: dict = {}  # object ref -> (actor slot, chunk)

        while queue or running:
            while queue and idle:
                slot, chunk = idle.pop(), queue.popleft()
                chunk.attempts += 1
                chunk.started = time.monotonic()
                refs = {items[i][0]: self._target_refs[items[i][0]] for i in chunk.indices}
                ref = self._actors[slot].score.remote(refs, [items[i] for i in chunk.indices])
                running[ref] = (slot, chunk)
            deadline = min(c.started + self.timeout_s * len(c.indices) for _, c in running.values())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if ready:
                ref = ready[0]
                slot, chunk = running.pop(ref)
                try:
                    results = ray.get(ref)
                except RayActorError as exc:
                    self._replace(slot)
                    self._retry(chunk, queue, outcomes, f"reward actor died: {type(exc).__name__}")
                else:
                    for i, outcome in zip(chunk.indices, results):
                        outcome.attempts = chunk.attempts
                        outcomes[i] = outcome
                idle.append(slot)
                continue
            now = time.monotonic()
            for ref, (slot, chunk) in list(running.items()):
                limit = self.timeout_s * len(chunk.indices)
                if now - chunk.started >= limit:
                    del running[ref]
                    self._replace(slot)
                    self._retry(chunk, queue, outcomes, f"scoring timed out after {limit:.1f} s", timeout=True)
                    idle.append(slot)

        for i, outcome in enumerate(outcomes):
            if outcome.ok:
                self.stats.scored += 1
            else:
                self.stats.failed += 1
                self.failures.append(Failure(i, items[i][0], outcome.error or "", outcome.attempts))
                log.warning("reward failed for item %d (target %s): %s", i, items[i][0], outcome.error)
        self.stats.seconds += time.perf_counter() - start
        return outcomes  # type: ignore[return-value]

    def _retry(self, chunk: _Chunk, queue: deque, outcomes: list, error: str, timeout: bool = False) -> None:
        """Re-run a lost chunk one item at a time, so that only the culprit fails. A lone item that timed out
        fails at once (waiting again would only double the stall); one whose actor died is retried up to
        ``max_attempts`` times."""
        if len(chunk.indices) > 1:
            queue.extend(_Chunk([i]) for i in chunk.indices)
        elif not timeout and chunk.attempts < self.max_attempts:
            queue.append(chunk)
        else:
            self.stats.timeouts += int(timeout)
            outcomes[chunk.indices[0]] = ScoreOutcome.failure(error, attempts=chunk.attempts)

    def _replace(self, slot: int) -> None:
        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is the common case
            pass
        self._actors[slot] = self._new_actor(slot)
        self.stats.actor_restarts += 1
        log.warning("replaced reward actor %d (restarts so far: %d)", slot, self.stats.actor_restarts)

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

