"""The coordinator: what learner rank 0 does between updates (rollouts, rewards, validation).

One iteration's data path: pick images (``DataOrder``) -> rollout actors sample K masks each with adapter
version N -> the reward pool scores every mask -> rewards (with the current, possibly adaptive, weights) and
sample metrics -> a batch for the learner ranks. Rollout requests that die with their actor are redone (a
request is self-contained and seeded, so the redo gives the same masks); masks whose scoring fails are kept
out of the update and counted. With ``placement=hybrid`` the learner ranks themselves sample (``local``, a
``rl_seg.roles.hybrid.HybridRollout``): same draw, same seeds, same scoring, no actors.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from rewards.metrics import MaskPair, Target

from ..ppo.config import TrainConfig
from ..ppo.states import DataOrder, dihedral_view, draw_views, undo_dihedral_view
from ..run_outcome import RestartBudgetExhausted

__all__ = ["Coordinator", "RolloutBatch", "reward_weights", "LOGGED_COMPONENTS"]

log = logging.getLogger(__name__)

#: Scored for every mask (weight 0 when not in the reward) so each iteration logs them.
LOGGED_COMPONENTS = ("dice", "recall", "precision", "cldice")
MAX_REDO = 3


def reward_weights(cfg: TrainConfig) -> tuple[dict[str, float], bool]:
    """The reward's component weights and whether the total is normalized (presets as in rewards.composite)."""
    from rewards.composite import PRESETS

    if cfg.reward.weights:
        return dict(cfg.reward.weights), True
    if cfg.reward.preset not in PRESETS:
        raise ValueError(f"reward.preset: unknown preset {cfg.reward.preset!r}; presets: {sorted(PRESETS)}")
    return dict(PRESETS[cfg.reward.preset]), cfg.reward.preset != "seed"


@dataclass
class RolloutBatch:
    """One iteration's samples, grouped by image; everything numpy so it travels through the object store."""

    ids: list[str]
    images: list[np.ndarray]
    gts: list[np.ndarray]
    fovs: list[np.ndarray | None]
    actions: list[tuple[np.ndarray, tuple]]  # per image: K x H x W masks, bit-packed, with their shape
    rewards: list[np.ndarray]  # per image: K float (NaN where scoring failed)
    components: list[dict[str, np.ndarray]]
    ok: list[np.ndarray]  # per image: K bool
    weights: dict[str, float]
    version: int
    stats: dict = field(default_factory=dict)
    #: per image: the frozen towers' outputs the rollout sent (``rollout.ship_frozen``), else None
    frozen: list | None = None

    def unpack_actions(self, j: int) -> np.ndarray:
        bits, shape = self.actions[j]
        return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def total_reward(components: dict[str, float], weights: dict[str, float], normalize: bool) -> float:
    total = sum(w * components[k] for k, w in weights.items())
    return total / sum(abs(w) for w in weights.values()) if normalize else total


def _peak_memory(replies) -> dict:
    """The largest rollout process's peak GPU memory among these replies (absent on CPUs)."""
    peaks = [r["peak_memory_gib"] for r in replies if r.get("peak_memory_gib") is not None]
    return {"memory/rollout_peak_gib": max(peaks)} if peaks else {}


class Coordinator:
    def __init__(self, cfg: TrainConfig, rollout_workers: list, pool, train_states: list[tuple[str, list]],
                 val_states: list[tuple[str, list]], difficulty: list[float], local=None):
        self.cfg = cfg
        self.workers = rollout_workers
        self.local = local
        self.pool = pool
        self.train_states = train_states
        self.val_states = val_states
        datasets = [state_id.split("/", 1)[0] for state_id, _ in train_states]
        self.order = DataOrder(difficulty, cfg.seed, cfg.data.curriculum,
                               groups=datasets if cfg.data.balance_datasets else None)
        self.weights, self.normalize = reward_weights(cfg)
        self.incarnations: dict[int, str] = {}
        self.worker_restarts = [0] * len(rollout_workers)
        self.worker_last_reply = [0.0] * len(rollout_workers)
        self.worker_alive = [True] * len(rollout_workers)
        #: called with health() when a rollout actor dies or returns, so the service sees it mid-iteration
        self.health_sink = None
        # One thread: the pool is driven by one caller at a time, in order.
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-scoring")
        self.counters = {"rollout_restarts": 0, "rollout_redone": 0, "reward_failures": 0, "masks": 0}

    # --- state that checkpoints carry ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "weights": dict(self.weights), "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.weights = dict(state["weights"])
        self.counters.update(state["counters"])

    # --- rollouts -----------------------------------------------------------------------------------------
    def _note_incarnation(self, worker: int, incarnation: str) -> None:
        seen = self.incarnations.get(worker)
        if seen is not None and seen != incarnation:
            self.counters["rollout_restarts"] += 1
            self.worker_restarts[worker] += 1
            log.warning("rollout worker %d was restarted (restarts so far: %d)", worker,
                        self.counters["rollout_restarts"])
        self.incarnations[worker] = incarnation

    def _wait_until_back(self, worker: int, timeout_s: float = 300.0) -> None:
        """Block while Ray restarts a dead rollout actor (it reloads the policy); fail if it stays dead."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(self.workers[worker].ready.remote(), timeout=10)
                return
            except ActorDiedError as exc:  # out of restarts: no point waiting
                raise RestartBudgetExhausted(
                    f"restart budget exhausted: rollout worker {worker} died more often than rollout.max_restarts="
                    f"{self.cfg.rollout.max_restarts} allows") from exc
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rollout worker {worker} did not come back within {timeout_s:.0f} s") from None
                time.sleep(0.5)

    def _call(self, worker: int, method: str, *args):
        return getattr(self.workers[worker], method).remote(*args)

    def _gather(self, requests: dict[int, tuple[int, str, tuple]], on_reply=None) -> dict[int, dict]:
        """Run requests {key: (worker, method, args)}, redoing any whose actor died, until all are answered.
        ``on_reply(key, reply)`` sees each answer once, as it arrives (a redone request only when it succeeds)."""
        pending = {self._call(w, m, *a): key for key, (w, m, a) in requests.items()}
        results, attempts = {}, {key: 1 for key in requests}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            worker, method, args = requests[key]
            try:
                reply = ray.get(ready[0])
            except RayActorError as exc:
                if attempts[key] >= MAX_REDO:
                    raise RuntimeError(f"rollout request {key} failed {MAX_REDO} times: {exc}") from exc
                attempts[key] += 1
                self.counters["rollout_redone"] += 1
                self._set_alive(worker, False)
                log.warning("rollout worker %d died during %s; redoing the request (attempt %d)", worker, method,
                            attempts[key])
                self._wait_until_back(worker)
                pending[self._call(worker, method, *args)] = key
                continue
            self._note_incarnation(worker, reply["incarnation"])
            self.worker_last_reply[worker] = time.time()
            self._set_alive(worker, True)
            results[key] = reply
            if on_reply is not None:
                on_reply(key, reply)
        return results

    def rollout(self, iteration: int, version: int, weights_box: list) -> RolloutBatch:
        cfg = self.cfg
        k = cfg.rollout.samples_per_image
        t0 = time.perf_counter()
        picks = self.order.next_batch(cfg.data.images_per_iteration)
        ids = [self.train_states[i][0] for i in picks]
        states = [ray.get(self.train_states[i][1][0]) for i in picks]
        boxes = [self.train_states[i] for i in picks]
        views = [0] * len(picks)
        if cfg.data.augment:
            # Rollout and learner see the image in its drawn view; the reward pool holds each target by id in the
            # image's own orientation, so masks are turned back before scoring (skeleton-based terms such as clDice
            # are not exactly invariant to the turn; pixel counts are, so the learner's credit can use the view).
            views = draw_views(cfg.seed, iteration, len(picks))
            states = [tuple(None if a is None else dihedral_view(a, v) for a in state)
                      for state, v in zip(states, views)]
            boxes = [(state_id, [ray.put(state)]) for state_id, state in zip(ids, states)]
        seeds = [cfg.seed * 1_000_003 + iteration * 10_007 + int(i) for i in picks]
        n = len(self.workers)
        # One request per image, spread over the actors: replies stream back image by image and a scoring
        # thread sends whatever has arrived to the reward pool in one call (several images at once when they
        # arrive together), so scoring runs while later images are still sampled and only the last arrivals'
        # scoring is left after the rollout.
        requests = {pos: (pos % n, "sample", (version, weights_box, [boxes[pos]], k, cfg.rollout.temperature,
                                              [seeds[pos]], cfg.ships_frozen))
                    for pos in range(len(picks))} if n else {}
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        actions: dict[int, np.ndarray] = {}

        def score_arrivals() -> dict[int, list]:
            scored: dict[int, list] = {}
            while len(scored) < len(picks):
                batch = [arrived.get()]
                while not arrived.empty():
                    batch.append(arrived.get())
                if None in batch:  # the rollout failed: nothing more will arrive
                    return scored
                outcomes = self.pool.score([(ids[pos], undo_dihedral_view(m, views[pos]) if views[pos] else m)
                                            for pos in batch for m in actions[pos]])
                for n_, pos in enumerate(batch):
                    scored[pos] = outcomes[n_ * k:(n_ + 1) * k]
            return scored

        def on_reply(pos: int, reply: dict) -> None:
            sample = reply["samples"][0]
            masks = np.unpackbits(sample["bits"], count=int(np.prod(sample["shape"]))).reshape(sample["shape"])
            actions[pos] = masks.astype(bool)
            arrived.put(pos)

        scoring = self._scorer.submit(score_arrivals)
        try:
            if self.local is not None:
                replies = self.local.lead(version, [(pos, int(i), seeds[pos], views[pos])
                                                    for pos, i in enumerate(picks)], states, ids, on_reply)
            else:
                replies = self._gather(requests, on_reply=on_reply)
        except BaseException:
            arrived.put(None)
            raise
        t_rollout = time.perf_counter() - t0
        samples = {pos: reply["samples"][0] for pos, reply in replies.items()}  # by position: ids can repeat
        t1 = time.perf_counter()
        scored = scoring.result()
        outcomes = [o for pos in range(len(picks)) for o in scored[pos]]
        t_reward = time.perf_counter() - t1  # the scoring the rollout did not hide
        actions = [actions[pos] for pos in range(len(picks))]

        self._adapt_weights(outcomes)
        rewards, components, oks = [], [], []
        names = sorted(set(self.weights) | set(LOGGED_COMPONENTS))
        for j in range(len(ids)):
            group = outcomes[j * k:(j + 1) * k]
            ok = np.array([o.ok for o in group])
            comp = {c: np.array([o.components.get(c, np.nan) if o.ok else np.nan for o in group]) for c in names}
            tot = np.array([total_reward(o.components, self.weights, self.normalize) if o.ok else np.nan
                            for o in group])
            rewards.append(tot)
            components.append(comp)
            oks.append(ok)
        failed = sum(int((~ok).sum()) for ok in oks)
        self.counters["reward_failures"] += failed
        self.counters["masks"] += len(ids) * k

        lags = [version - r["version"] for r in replies.values()]
        valid_frac = []
        for (_, gt, fov), acts in zip(states, actions):
            area = acts.reshape(k, -1).sum(1) / (fov.sum() if fov is not None else gt.size)
            valid_frac.extend(area.tolist())
        valid_frac = np.array(valid_frac)
        stats = {
            "reward": float(np.nanmean(np.concatenate(rewards))) if rewards else float("nan"),
            **{f"reward/{c}": float(np.nanmean(np.concatenate([cm[c] for cm in components]))) for c in names},
            "reward_failures": failed,
            "empty_mask_fraction": float((valid_frac == 0).mean()),
            "full_mask_fraction": float((valid_frac > 0.9).mean()),
            "adapter_version_lag": int(max(lags) if lags else 0),
            "rollout_version": int(min(r["version"] for r in replies.values())),
            "time/rollout": t_rollout, "time/reward": t_reward,
            "time/sync": max(r["sync_s"] for r in replies.values()),
            **_peak_memory(replies.values()),
            "masks_per_s": len(ids) * k / max(t_rollout + t_reward, 1e-9),
            **{f"weight/{c}": w for c, w in self.weights.items()},
            **self.counters,
        }
        if cfg.data.augment:
            stats["batch_views"] = views
        stats["collapsed"] = bool(stats["empty_mask_fraction"] > 0.5 or stats["full_mask_fraction"] > 0.5)
        if stats["collapsed"]:
            log.warning("iteration %d: masks collapsed (empty %.0f%%, near-full %.0f%%)", iteration,
                        100 * stats["empty_mask_fraction"], 100 * stats["full_mask_fraction"])
        packed = [(samples[pos]["bits"], tuple(samples[pos]["shape"])) for pos in range(len(picks))]
        frozen = [samples[pos].get("frozen") for pos in range(len(picks))]
        return RolloutBatch(ids=ids, images=[s[0] for s in states], gts=[s[1] for s in states],
                            fovs=[s[2] for s in states], actions=packed, rewards=rewards, components=components,
                            ok=oks, weights=dict(self.weights), version=version, stats=stats,
                            frozen=frozen if any(f is not None for f in frozen) else None)

    def _adapt_weights(self, outcomes) -> None:
        """Raise the recall weight while the batch's recall is under the bound (original plan's extra)."""
        ar = self.cfg.reward.adaptive_recall
        if not ar.enabled:
            return
        recalls = [o.components["recall"] for o in outcomes if o.ok]
        if recalls and float(np.mean(recalls)) < ar.bound:
            self.weights["recall"] = min(ar.max_weight, self.weights.get("recall", 0.0) + ar.step)

    def _set_alive(self, worker: int, alive: bool) -> None:
        changed = self.worker_alive[worker] != alive
        self.worker_alive[worker] = alive
        if changed and self.health_sink is not None:
            self.health_sink(self.health())

    def health(self) -> dict:
        """What the status service shows as worker health: written to health.json every iteration."""
        return {
            "rollout": [{"index": w, "alive": self.worker_alive[w], "restarts": self.worker_restarts[w],
                         "last_reply": self.worker_last_reply[w] or None,
                         "incarnation": self.incarnations.get(w)} for w in range(len(self.workers))],
            "rollout_redone": self.counters["rollout_redone"],
            "reward_pool": {"actors": self.pool.num_actors, **self.pool.stats.as_dict()},
        }

    # --- validation ----------------------------------------------------------------------------------------
    def validate(self, version: int, weights_box: list) -> dict:
        if not self.val_states:
            return {}
        probs = {}
        if self.local is not None:
            probs = self.local.predict([(state_id, ray.get(box[0])) for state_id, box in self.val_states])
        else:
            n = len(self.workers)
            requests = {w: (w, "predict", (version, weights_box, self.val_states[w::n])) for w in range(n)
                        if self.val_states[w::n]}
            for reply in self._gather(requests).values():
                probs.update(reply["probs"])
        rows = []
        for state_id, box in self.val_states:
            _, gt, fov = ray.get(box[0])
            pair = MaskPair(probs[state_id].astype(np.float32) > 0.5, Target(gt, fov))
            rows.append({m: getattr(pair, m)() for m in ("dice", "recall", "precision", "cldice")})
        return {f"val/{m}": float(np.mean([r[m] for r in rows])) for m in rows[0]}
