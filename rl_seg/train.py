"""The training job (`rl-seg train`): the driver that sets up the Ray roles and runs the learner group.

It runs the same on a cluster (``ray job submit --working-dir . -- rl-seg train --config FILE``) and locally
(a local Ray instance on 127.0.0.1 when no address is given). The driver owns the rollout actors and the reward
pool, so they outlive a learner-group restart; the learner group is a Ray Train ``TorchTrainer`` whose rank 0
coordinates each iteration (``rl_seg.roles.learner``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from functools import partial

import ray

from rewards.composite import CompositeReward
from rewards.pool import RewardPool

from .config import to_dict
from .console import LOG_DIR, announce, driver_session
from .policy.sa2va.core import SAM2_NATIVE_GRID
from .ppo.config import TrainConfig
from .ppo.states import State, load_states, thin_vessel_fraction
from .ray_env import init_ray
from .roles.coordinator import LOGGED_COMPONENTS, reward_weights
from .roles.learner import NON_FINITE, START_FAILED, raise_if_non_finite, raise_if_start_failed
from .roles.placement import RolloutPlacement
from .roles.rollout import RolloutWorker
from .run_checkpoints import TRAIN_DIR, latest_checkpoint
from .run_files import HEALTH, read_json, stop_requested
from .run_outcome import RunFailed, RunInterrupted, failure_message
from .run_session import RunSession
from .validation import resume_changes, validate_train_config

__all__ = ["run_training", "latest_checkpoint", "pool_reward", "put_states", "RunFailed", "RunInterrupted"]

log = logging.getLogger(__name__)


def pool_reward(cfg: TrainConfig) -> CompositeReward:
    """The pool scores the reward's components plus the logged ones (weight 0): totals are formed by the
    coordinator with the current weights, which the adaptive-recall option changes during a run."""
    weights, normalize = reward_weights(cfg)
    extra = set(LOGGED_COMPONENTS) | ({"recall"} if cfg.reward.adaptive_recall.enabled else set())
    return CompositeReward({**{c: 0.0 for c in extra}, **weights}, normalize=normalize, name=cfg.reward.preset)


def put_states(states: list[State]) -> list[tuple[str, list]]:
    """``(id, [ref to (image, gt, fov)])`` per state, as the coordinator and rollout actors take them. Refs are
    wrapped in lists so that Ray hands them on unresolved: each actor fetches only what it uses."""
    return [(s.id, [ray.put((s.image, s.gt, s.fov))]) for s in states]


def run_training(cfg: TrainConfig, callbacks: list | None = None, objective: dict | None = None) -> dict:
    """Run the PPO job. ``callbacks`` go to Ray Train's RunConfig (Tune's report bridge); ``objective``
    ({metric, min, objective}) adds a constrained objective to every report (``rl-seg tune``).

    Everything that can be refused is refused before Ray starts and before the run folder is touched: the config
    (``rl_seg.validation``), a resume that would change what the run learns, the data. Then the session takes
    the run folder (``rl_seg.run_session``) and records how the run ends: succeeded, stopped, interrupted
    (``RunInterrupted``), or failed (``RunFailed`` when the cause has a name: a spent restart budget, a full disk)."""
    validate_train_config(cfg)
    changes = resume_changes(cfg)
    # Sa2VA's native grid: masks are sampled and scored on the decoder's own 256 x 256 grid, images stay as they are.
    label_size = SAM2_NATIVE_GRID if cfg.policy.action_resolution == "native" else None
    train = load_states(cfg.data.datasets, cfg.data.train_split, cfg.data.image_size, cfg.data.train_limit,
                        label_size)
    val = load_states(cfg.data.datasets, cfg.data.val_split, cfg.data.image_size, cfg.data.val_limit, label_size)
    session = RunSession(cfg, changes).open()
    for record in (NON_FINITE, START_FAILED):  # how the previous session ended, not this one
        (cfg.run_path / record).unlink(missing_ok=True)
    try:
        try:
            with driver_session(cfg.run_path / LOG_DIR, wait_for="learner-0"):
                summary = _run(cfg, session, train, val, callbacks, objective)
        except RunInterrupted:
            raise  # recorded by the signal handler
        except BaseException as exc:
            named = failure_message(exc, cfg.learner.max_failures) if isinstance(exc, Exception) else None
            text = session.finish("failed", error=named or f"{type(exc).__name__}: {exc}"[:1000])
            if named:
                raise RunFailed(text) from exc
            raise
        stopped = stop_requested(cfg.run_path) and summary["completed"] < cfg.iterations
        summary["outcome"] = session.finish("stopped" if stopped else "succeeded",
                                            reason="stopped through the status service" if stopped else None)
        summary["state"] = session.outcome
        return summary
    finally:
        session.close()


def _run(cfg: TrainConfig, session: RunSession, train: list[State], val: list[State], callbacks, objective) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_path = cfg.run_path
    start = time.time()
    # Ray Train's controller takes one report per poll, every 2 s by default, and a worker's next report
    # waits for it: iterations shorter than that would stall in ray.train.report (measured: 0.8 s of a 1.9 s
    # iteration on the H100). The driver's value reaches the controller (Ray propagates this variable).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(cfg.learner.report_poll_s))
    init_ray(cfg.ray_address, num_cpus=cfg.ray_num_cpus)
    session.catch_signals()  # ray.init installed its own SIGTERM handler
    context = ray.get_runtime_context()
    session.running(context.get_job_id(), context.gcs_address)
    log.info("%d training and %d validation images", len(train), len(val))
    train_states, val_states = put_states(train), put_states(val)

    placement = RolloutPlacement(cfg)
    # Whatever fails below, the actors, the reward pool and the reserved GPUs go back to the cluster.
    rollout_workers: list = []
    pool = None
    try:
        rollout_workers = [
            RolloutWorker.options(**placement.options(i), max_restarts=cfg.rollout.max_restarts, name=None)
            .remote(cfg.policy.name, cfg.policy.lora, cfg.threads_per_worker, cfg.rollout.num_gpus > 0,
                    cfg.policy.load_kwargs(), str(run_path / LOG_DIR), f"rollout-{i}")
            for i in range(0 if cfg.placement == "hybrid" else cfg.rollout.num_workers)  # hybrid: the learners sample
        ]
        # Not waited for here: the actors load their policy while the reward pool and the learner group start, and
        # learner rank 0 waits for them (startup takes the longest of the three, not their sum).
        pool = RewardPool(pool_reward(cfg), num_actors=cfg.reward.num_actors, num_cpus_per_actor=cfg.reward.num_cpus,
                          timeout_s=cfg.reward.timeout_s, actor_setup=partial(announce, str(run_path / LOG_DIR)))
        pool.add_targets({s.id: (s.gt, s.fov) for s in train})

        resources = {"CPU": cfg.learner.cpus_per_worker}
        if cfg.learner.use_gpu:
            resources["GPU"] = cfg.learner.gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker=_train_loop,
            train_loop_config={
                "cfg": to_dict(cfg), "run_path": str(run_path.resolve()),
                "rollout_workers": rollout_workers, "pool": pool,
                "train_states": train_states, "val_states": val_states,
                "difficulty": [thin_vessel_fraction(s.gt) for s in train],
                "objective": objective, "session": session.id,
                "resume_from": str(session.resume_from.resolve()) if session.resume_from else None,
            },
            scaling_config=ScalingConfig(num_workers=cfg.learner.num_workers, use_gpu=cfg.learner.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if cfg.learner.use_gpu else "gloo"),
            # A Train run per session: Ray Train reloads a run's checkpoint list by name, and a session must
            # never start from another's checkpoints unless it resumes (rl_seg.run_checkpoints decides).
            run_config=RunConfig(name=f"{cfg.name}-{session.id}", storage_path=str((run_path / TRAIN_DIR).resolve()),
                                 failure_config=FailureConfig(max_failures=cfg.learner.max_failures),
                                 callbacks=callbacks or []),
        )
        result = _fit(trainer)
        raise_if_start_failed(run_path)
        raise_if_non_finite(run_path)
    except RunInterrupted:
        # Killing the actors now would only make the learner group fail loudly while the driver leaves; the
        # driver's exit ends its job, and with it every actor and reservation the job holds.
        rollout_workers, pool = [], None
        raise
    finally:
        for worker in rollout_workers:
            ray.kill(worker)
        if pool is not None:
            pool.shutdown()
        placement.release()
    completed = int((read_json(run_path / HEALTH) or {}).get("iteration", 0))
    final = run_path / "final_adapter"
    summary = {"run_path": str(run_path), "seconds": time.time() - start, "iterations": cfg.iterations,
               "completed": completed,
               "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "final_adapter": str(final) if (final / "adapter_config.json").is_file() else None,
               "metrics": result.metrics}
    (run_path / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _fit(trainer):
    """``trainer.fit()``, on a thread of its own when called from the main thread: the main thread stays free to
    run the session's SIGINT/SIGTERM handlers (Ray Train would otherwise take SIGINT for its own abort, and the
    run would end looking like a success)."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _train_loop(config: dict) -> None:
    # Imported inside the worker: the driver need not import DeepSpeed.
    from .roles.learner import train_loop

    train_loop(config)
