"""The learner group: Ray Train ``TorchTrainer`` workers running PPO with a DeepSpeed engine on LoRA weights.

Every rank holds the policy with its LoRA adapter and a value head inside one DeepSpeed engine (ZeRO stage,
micro-batch and gradient accumulation from the config; bf16 on GPU, fp32 with gloo on CPU). Rank 0 is also the
coordinator: it drives rollouts and rewards, puts the batch in the object store and broadcasts the reference;
each rank learns on its shard of images and DeepSpeed all-reduces the gradients. After the update rank 0
exports the adapter weights (only those) as version N+1 for the rollout actors.

Old log-probabilities are recomputed by the learner before the first epoch instead of being shipped from the
rollout (the approach verl takes): rollouts are synchronous (they sample with the version the learner holds,
and the lag is logged), so the recomputation is exact and pixels need not travel as floats. With
``placement=hybrid`` the ranks sample themselves (``rl_seg.roles.hybrid``) and keep that forward's logits instead.

Frozen-tower reuse (``learner.reuse_frozen_towers``): where no LoRA layer sits in a tower (InternViT + ``mlp1``,
SAM2's image encoder), its output is computed once per image and iteration (``SegPolicy.encode_frozen``) and handed
to the old-policy, reference and every epoch's forward: the same numbers, without running the tower again. Where
the rollout actors sent it with their masks (``rollout.ship_frozen``) the learner does not compute it at all.

Checkpoints (every ``checkpoint_every`` iterations and at the end) hold the adapter in PEFT format, the value
head, DeepSpeed's optimizer and scheduler state, RNG states, the data order and the iteration; they are
reported to Ray Train, which restarts a failed group from the latest one (``FailureConfig``). Rank 0 then keeps
the newest ``keep_checkpoints`` and the best by validation Dice (``rl_seg.run_checkpoints``). A group that starts
from a checkpoint first drops the metrics of the iterations it will redo (``rl_seg.run_metrics``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from ..config import from_dict
from ..console import LOG_DIR, announce
from ..console import done as console_done
from ..flops import flop_counter
from ..guards import NonFiniteError, non_finite
from ..policy import MaskDistribution, load_policy
from ..policy.base import autocast_for
from ..policy.lora import attach_lora, load_adapter_weights
from ..ppo.config import TrainConfig
from ..ppo.core import AdvantageInputs, compute_advantages, ppo_loss
from ..run_checkpoints import choose_checkpoint, latest_checkpoint, prune_checkpoints
from ..run_files import HEALTH, read_json, stop_requested, write_json_atomic, write_sample_overlay
from ..run_outcome import disk_guard
from .coordinator import Coordinator, RolloutBatch
from .hybrid import HybridRollout, cat_frozen, frozen_kwargs
from .rollout import adapter_state, peak_memory_gib

__all__ = ["PPOModule", "train_loop", "deepspeed_config", "save_checkpoint", "load_checkpoint", "raise_if_non_finite",
           "NON_FINITE"]

log = logging.getLogger(__name__)

#: Written in the run folder when the learner stops a run on a non-finite value (read by the driver).
NON_FINITE = "non_finite.json"
#: Written by rank 0 when a role of the run could not start (``_start_problems``); the driver raises it.
START_FAILED = "start_failed.json"


class PPOModule(nn.Module):
    """The policy (with LoRA) and the value head on its [SEG] hidden state: what DeepSpeed trains."""

    def __init__(self, policy, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))

    def forward(self, pixel_values: torch.Tensor, frozen=None):
        out = self.policy(pixel_values, **frozen_kwargs(frozen))
        return out.logits, self.value_head(out.seg_hidden.float())[:, 0]


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.learner.micro_batch_images,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.ppo.max_grad_norm,
        # torch's AdamW (torch_adam) rather than DeepSpeed's fused Adam: LoRA parameters are a few million, where
        # the fused kernel saves nothing, and it is compiled just in time on each fresh host (about a minute;
        # on an H200 host it did not build at all: DeepSpeed 0.19.8 cannot parse the "9.0a" arch it derives).
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.ppo.lr, "weight_decay": cfg.ppo.weight_decay,
                                                   "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(cfg.optimizer_steps, cfg.ppo.warmup_steps + 1),
            "warmup_num_steps": cfg.ppo.warmup_steps, "warmup_type": "linear"}}
        if cfg.ppo.lr_schedule == "cosine" else {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.ppo.lr, "warmup_num_steps": cfg.ppo.warmup_steps,
            "warmup_type": "linear"}},
        "zero_optimization": {"stage": cfg.learner.zero_stage},
        # bf16 compute through torch autocast inside the engine (DeepSpeed switches an outer autocast off),
        # with fp32 weights: the frozen base keeps full precision and matches the rollout's copy.
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


# --- checkpoints ---------------------------------------------------------------------------------------------

def save_checkpoint(folder: Path, engine, rank: int, iteration: int, version: int, coordinator_state: dict | None,
                    marker: dict | None = None) -> None:
    """All ranks write DeepSpeed's state (ZeRO shards are per rank); rank 0 adds the adapter and run state.
    ``marker`` adds to checkpoint.json (the session that wrote it, the validation Dice it was taken at)."""
    folder.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    if rank == 0:
        module = engine.module
        module.policy.save_pretrained(str(folder / "adapter"), save_embedding_layers=False)
        torch.save(module.value_head.state_dict(), folder / "value_head.pt")
        torch.save({"iteration": iteration, "version": version, "coordinator": coordinator_state,
                    "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
                    "torch_rng": torch.get_rng_state()}, folder / "trainer_state.pt")
        (folder / "checkpoint.json").write_text(json.dumps({"iteration": iteration, "version": version,
                                                            **(marker or {})}) + "\n")


def load_checkpoint(folder: Path, engine) -> dict:
    engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False,
                           load_optimizer_states=True, load_lr_scheduler_states=True)
    state = torch.load(folder / "trainer_state.pt", weights_only=False)
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state


def _checkpoint_to_restore(config: dict) -> Path | None:
    checkpoint = ray.train.get_checkpoint()
    return choose_checkpoint(Path(checkpoint.to_directory()) if checkpoint is not None else None,
                             Path(config["run_path"]), config["session"],
                             Path(config["resume_from"]) if config.get("resume_from") else None)


# --- one update ----------------------------------------------------------------------------------------------

def _shard(batch: RolloutBatch, rank: int, world: int) -> list[int]:
    return list(range(rank, len(batch.ids), world))


def _tensors(batch: RolloutBatch, j: int, device) -> tuple:
    actions = torch.from_numpy(batch.unpack_actions(j)).to(device)
    k = actions.shape[0]
    gt = torch.from_numpy(batch.gts[j]).to(device)[None].expand(k, -1, -1)
    if batch.fovs[j] is not None:
        valid = torch.from_numpy(batch.fovs[j]).to(device)[None].expand(k, -1, -1).clone()
    else:
        valid = torch.ones_like(actions)
    ok = torch.from_numpy(batch.ok[j]).to(device)
    valid = valid & ok[:, None, None]  # failed scores: not learned from
    return actions, gt, valid


def learn(engine, batch: RolloutBatch, cfg: TrainConfig, rank: int, world: int, iteration: int,
          rollouts: dict[int, dict] | None = None) -> dict:
    """PPO epochs over this rank's images; returns mean statistics of this rank. ``rollouts``: what this rank's own
    sampling kept per batch position (hybrid placement: inputs, frozen features, old logits and values)."""
    device = engine.device
    module = engine.module
    k = cfg.rollout.samples_per_image
    temp = cfg.rollout.temperature
    mine = _shard(batch, rank, world)
    rollouts = rollouts or {}
    pixel_values = {j: rollouts[j]["inputs"] if j in rollouts else module.policy.preprocess([batch.images[j]])
                    for j in mine}
    frozen: dict = {}

    # Old policy (this version, no gradient), reference policy (adapter off) and values, once per iteration, in
    # micro-batches as the update runs them (logits of a batch of mixed sizes are cropped to each image's own).
    mb = cfg.learner.micro_batch_images
    prepared = {}
    problem = None
    with torch.no_grad():
        for start in range(0, len(mine), mb):
            group = mine[start:start + mb]
            for j in group:
                kept = rollouts.get(j)
                if not cfg.learner.reuse_frozen_towers:
                    continue
                if kept is not None:
                    frozen[j] = kept["frozen"]
                elif batch.frozen is not None and batch.frozen[j] is not None:  # sent by the rollout actor
                    frozen[j] = batch.frozen[j].to(device)
                else:
                    with autocast_for(device):
                        frozen[j] = module.policy.encode_frozen(pixel_values[j])
            inputs = module.policy.collate([pixel_values[j] for j in group])
            group_frozen = frozen_kwargs(cat_frozen([frozen.get(j) for j in group]))
            if all(j in rollouts for j in group):
                old_out = [(rollouts[j]["logits"], rollouts[j]["value"]) for j in group]
            else:
                with autocast_for(device):
                    logits, value = engine(inputs, **group_frozen)
                old_out = [(logits[n:n + 1], value[n:n + 1]) for n in range(len(group))]
            ref = None
            if cfg.ppo.loss.kl_coef > 0:
                with module.policy.disable_adapter(), autocast_for(device):
                    ref = module.policy(inputs, **group_frozen).logits
            for n, j in enumerate(group):
                actions, gt, valid = _tensors(batch, j, device)
                h, w = actions.shape[-2:]
                logits = old_out[n][0].float()[..., :h, :w]
                ref_logits = None if ref is None else ref[n:n + 1, :h, :w].float()
                old = MaskDistribution(logits.expand(k, -1, -1), temp, valid)
                prepared[j] = dict(actions=actions, gt=gt, valid=valid, old_logp=old.log_prob(actions),
                                   prob_taken=torch.exp(old.log_prob(actions)), value=old_out[n][1].float(),
                                   ref_logits=ref_logits)
                bad = non_finite([("logits", logits), ("reference logits", ref_logits),
                                  ("log-probs", prepared[j]["old_logp"]), ("value", prepared[j]["value"])])
                if bad:
                    problem = problem or f"{' and '.join(bad)} of image {batch.ids[j]}"
    _agree_finite(problem, "before the update", iteration, rank, world, weights_changed=False)

    # Advantages over this rank's images at once; the batch-wide statistics (pixel RMS, value whitening) are
    # summed over all ranks, so N ranks give each image the advantage one process would.
    # Images of different sizes are padded to a common one; padding is invalid, so it carries no credit.
    hmax = max(prepared[j]["actions"].shape[-2] for j in mine)
    wmax = max(prepared[j]["actions"].shape[-1] for j in mine)

    def cat(key: str) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(prepared[j][key], (0, wmax - prepared[j][key].shape[-1],
                                                                      0, hmax - prepared[j][key].shape[-2]))
                          for j in mine])

    rewards = torch.from_numpy(np.nan_to_num(np.concatenate([batch.rewards[j] for j in mine]))).to(device)
    components = {c: torch.from_numpy(np.nan_to_num(np.concatenate([batch.components[j][c] for j in mine])))
                  .to(device) for c in batch.components[mine[0]]}
    groups = torch.arange(len(mine), device=device).repeat_interleave(k)
    values = torch.cat([prepared[j]["value"].expand(k) for j in mine])
    adv = compute_advantages(cfg.ppo.advantage, AdvantageInputs(
        actions=cat("actions"), gt=cat("gt"), valid=cat("valid"), prob_taken=cat("prob_taken"), rewards=rewards,
        components=components, weights=batch.weights, groups=groups, values=values,
        reduce_sum=_all_reduce_sum if world > 1 else (lambda t: t)))
    _agree_finite("advantages" if non_finite([("advantages", adv)]) else None, "before the update", iteration, rank,
                  world, weights_changed=False)
    for n, j in enumerate(mine):
        h, w = prepared[j]["actions"].shape[-2:]
        prepared[j]["adv"] = adv[n * k:(n + 1) * k, :h, :w]
        prepared[j]["returns"] = rewards[n * k:(n + 1) * k]

    stats: dict[str, list[float]] = {}
    for epoch in range(cfg.ppo.epochs):
        # Seeded by position, not by a global RNG, so a resumed run replays exactly what the stopped one would.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration * 1_009 + epoch * 31 + rank)
        order = [mine[i] for i in torch.randperm(len(mine), generator=g).tolist()]
        for start in range(0, len(order), mb):
            group = order[start:start + mb]
            with autocast_for(device):
                logits, value = engine(module.policy.collate([pixel_values[j] for j in group]),
                                       **frozen_kwargs(cat_frozen([frozen.get(j) for j in group])))
            loss = 0.0
            for n, j in enumerate(group):
                p = prepared[j]
                h, w = p["actions"].shape[-2:]
                new = MaskDistribution(logits[n, :h, :w].float().expand(k, -1, -1), temp, p["valid"])
                ref = (MaskDistribution(p["ref_logits"].expand(k, -1, -1), temp, p["valid"])
                       if p["ref_logits"] is not None else None)
                use_value = cfg.ppo.advantage == "value"
                part, s = ppo_loss(new, p["actions"], p["old_logp"], p["adv"], cfg.ppo.loss, ref,
                                   value[n].float().expand(k) if use_value else None,
                                   p["returns"] if use_value else None)
                loss = loss + part / len(group)
                for key, v in s.items():
                    stats.setdefault(key, []).append(v)
            changed = epoch > 0 or start > 0  # earlier steps of this iteration already moved the weights
            _agree_finite(f"loss (images {[batch.ids[j] for j in group]})" if non_finite([("loss", loss)]) else None,
                          f"epoch {epoch + 1}", iteration, rank, world, weights_changed=changed)
            engine.backward(loss)
            _agree_finite(_non_finite_gradients(engine), f"epoch {epoch + 1}", iteration, rank, world,
                          weights_changed=changed)
            engine.step()
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    valid = cat("valid")
    out["advantage_mean"] = float(adv[valid].mean())
    out["advantage_std"] = float(adv[valid].std())
    out["lr"] = float(engine.get_lr()[0])
    return out


class TrainingNonFinite(Exception):
    """A non-finite number in an update; raised on every rank at once (``_agree_finite``)."""

    def __init__(self, problems: list[tuple[int, str]], phase: str, iteration: int, weights_changed: bool):
        self.problems, self.phase, self.iteration, self.weights_changed = problems, phase, iteration, weights_changed
        where = "; ".join(f"rank {r}: {p}" for r, p in problems)
        super().__init__(f"non-finite values at iteration {iteration + 1} ({phase}): {where}")


def _agree_finite(problem: str | None, phase: str, iteration: int, rank: int, world: int,
                  weights_changed: bool) -> None:
    """Every rank learns whether any rank saw a non-finite value, so that all stop together (a rank that left
    alone would leave the others waiting in a collective)."""
    flag = torch.tensor([0.0 if problem is None else 1.0])
    if world > 1:
        flag = flag.to(_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    problems = [(rank, problem)]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, problem)
        problems = [(r, p) for r, p in enumerate(gathered) if p is not None]
    raise TrainingNonFinite(problems, phase, iteration, weights_changed)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _non_finite_gradients(engine) -> str | None:
    """The first trainable parameter whose gradient holds a NaN or inf (ZeRO-partitioned ones gathered). Only at a
    gradient-accumulation boundary: ZeRO 1-2 assemble a partitioned gradient there (before it, safe_get_full_grad
    raises), and the boundary's gradient sums the micro-steps, so checking it suffices."""
    from deepspeed.utils import safe_get_full_grad

    if not engine.is_gradient_accumulation_boundary():
        return None

    grads = [(name, safe_get_full_grad(p)) for name, p in engine.module.named_parameters() if p.requires_grad]
    grads = [(name, g) for name, g in grads if g is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
        return None  # one device sync for all of them; names only on the rare failure
    return "gradient of " + non_finite(grads)[0]


def constrained_objective(metrics: dict, constraint: dict) -> float:
    """``constraint["objective"]`` less the shortfall of ``constraint["metric"]`` under ``constraint["min"]``
    (rl-seg tune's "Dice subject to recall >= 0.85")."""
    shortfall = max(0.0, constraint["min"] - metrics[constraint["metric"]])
    return metrics[constraint["objective"]] - shortfall


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _all_mean(stats: dict, device) -> dict:
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _all_sum(stats: dict, device) -> dict:
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _all_max(stats: dict, device) -> dict:
    """The largest value of each statistic over the ranks; statistics a rank lacks (None: no GPU) are left out."""
    keys = sorted(k for k, v in stats.items() if v is not None)
    if not keys:
        return {}
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


# --- the training function ------------------------------------------------------------------------------------

class _HealthWriter:
    """Rank 0's health.json: the coordinator's view of its actors plus the learner group's own."""

    def __init__(self, run_path: Path, coordinator: Coordinator, world: int, session: str):
        self.path = run_path / HEALTH
        previous = read_json(self.path) or {}
        # Every start of the group after the first is a restart (a failure or a resumed run).
        self.learner = {"world_size": world, "session": session,
                        "starts": int(previous.get("learner", {}).get("starts", 0)) + 1}
        self.coordinator = coordinator
        self.iteration, self.version = 0, 0
        coordinator.health_sink = lambda _: self.write(self.iteration, self.version)

    def write(self, iteration: int, version: int) -> None:
        self.iteration, self.version = iteration, version
        write_json_atomic(self.path, {"time": time.time(), "iteration": iteration, "adapter_version": version,
                                      "learner": self.learner, **self.coordinator.health()})


def _report_checkpoint(engine, rank: int, iteration: int, version: int, coordinator, metrics: dict, run_path: Path,
                       marker: dict, keep: int | None) -> None:
    """Every rank writes its part of a checkpoint of ``iteration`` completed iterations; Ray Train persists it
    (a full disk named as such); rank 0 then prunes to the retention policy."""
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), engine, rank, iteration, version, coordinator.state_dict() if coordinator else None,
                        marker)
        dist.barrier()
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        with disk_guard(run_path, f"the checkpoint of iteration {iteration} (this rank's part)", size):
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if rank == 0:
        prune_checkpoints(run_path, keep)


def _stop_on_non_finite(exc: TrainingNonFinite, engine, rank: int, iteration: int, version: int, coordinator,
                        run_path: Path, session: str, keep: int | None) -> None:
    """End the run on a non-finite value with what, where and the last good checkpoint. Found before the first
    optimizer step of the iteration, the weights are still those of the end of the previous one: that state is
    checkpointed now. Found later, they are half-updated, and the newest checkpoint on disk is the last good one.
    The training function then returns normally (a retry would meet the same numbers) and the driver raises."""
    if not exc.weights_changed:
        _report_checkpoint(engine, rank, iteration, version, coordinator, {"iteration": iteration, "non_finite": 1},
                           run_path, {"session": session, "val_dice": None}, keep)
    dist.barrier()
    if rank == 0:
        good = latest_checkpoint(run_path)
        good_iteration = json.loads((good / "checkpoint.json").read_text())["iteration"] if good else None
        write_json_atomic(run_path / NON_FINITE, {
            "error": str(exc), "iteration": iteration + 1, "phase": exc.phase,
            "ranks": [r for r, _ in exc.problems], "what": [p for _, p in exc.problems],
            "last_good_checkpoint": str(good) if good else None, "last_good_iteration": good_iteration})
        log.error("%s; last good checkpoint: %s", exc, good)


def raise_if_non_finite(run_path: Path) -> None:
    """The driver's side: a run the learner stopped on a non-finite value fails with its message."""
    from ..guards import NonFiniteError

    record = read_json(Path(run_path) / NON_FINITE)
    if record:
        good = record.get("last_good_checkpoint")
        advice = (f"last good checkpoint: {good} (iteration {record.get('last_good_iteration')}); lower ppo.lr or "
                  f"check the data, then resume" if good else "no checkpoint was written before it")
        raise NonFiniteError(f"{record['error']}. The run was stopped; {advice}")


def wait_for_rollout_workers(workers: list) -> str | None:
    """Block until every rollout actor has loaded its policy. None, or the console line naming the first actor
    whose constructor raised: Ray does not restart such an actor, and a new learner group would meet it again.
    An actor that died later (a restarted group finds it dead or restarting) is the coordinator's to handle: it
    waits for the restart, redoes the requests and names a spent restart budget."""
    from ray.exceptions import ActorDiedError, RayActorError

    from ..console import describe_error

    for worker in workers:
        try:
            ray.get(worker.ready.remote())
        except RayActorError as exc:
            if isinstance(exc, ActorDiedError) and exc.actor_init_failed:
                return describe_error(exc)
    return None


def _start_problems(problem: str | None, rank: int, world: int, run_path: Path) -> bool:
    """Whether any rank could not start (``problem`` is this rank's console line). Every rank asks, so that all
    return together; rank 0 records the first problem for the driver (``raise_if_start_failed``). Returning ends
    the group normally: Ray Train restarts a group only when its function raises."""
    problems = [problem] * world
    if world > 1:
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found and rank == 0:
        write_json_atomic(run_path / START_FAILED, {"error": found[0], "all": found})
        log.error("%s", found[0])
    return bool(found)


def raise_if_start_failed(run_path: Path) -> None:
    """The driver's side: a run whose roles could not start fails with the first one's error."""
    from ..run_outcome import RoleStartFailed

    record = read_json(Path(run_path) / START_FAILED)
    if record:
        raise RoleStartFailed(record["error"])


def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: build the engine, restore, then iterate."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    announce(Path(config["run_path"]) / LOG_DIR, f"learner-{rank}")
    import deepspeed

    cfg = from_dict(TrainConfig, config["cfg"])
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    use_gpu = cfg.learner.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    run_path = Path(config["run_path"])
    try:
        policy = load_policy(cfg.policy.name, device=device, **cfg.policy.load_kwargs())
        problem = None
    except NonFiniteError as exc:  # a damaged checkpoint: every rank and every restart would refuse it again
        problem = f"error in learner-{rank}: {type(exc).__name__}: {exc}"
    # The rollout actors load their policy while this group starts (the driver does not wait for them).
    if rank == 0 and problem is None:
        problem = wait_for_rollout_workers(config["rollout_workers"])
    if _start_problems(problem, rank, world, run_path):
        return
    policy = attach_lora(policy, cfg.policy.lora)
    if cfg.policy.init_adapter:  # the rollouts receive it with the first weight sync (version 0)
        load_adapter_weights(policy, cfg.policy.init_adapter)
    if cfg.policy.gradient_checkpointing:
        stacks = policy.get_base_model().enable_gradient_checkpointing()
        if rank == 0:
            log.info("activation checkpointing: %s", ", ".join(stacks))
    if rank == 0 and cfg.learner.reuse_frozen_towers:
        towers = getattr(policy.get_base_model(), "frozen_towers", lambda: ())()
        log.info("frozen towers computed once per image and iteration: %s", ", ".join(towers) or "none")
    module = PPOModule(policy, policy.get_base_model().hidden_size).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params,
                                      config=deepspeed_config(cfg, bf16=use_gpu), dist_init_required=False)
    # Dropout off (LoRA dropout included), as TRL does for PPO: the ratio pi/pi_old must compare one network on
    # one input; with dropout the recomputed old log-probs and each update pass draw different masks, and the
    # ratio carries that noise (and differs from the rollout actors, which sample in eval mode).
    engine.module.eval()

    hybrid = HybridRollout(engine, cfg, rank, world, config["train_states"]) if cfg.placement == "hybrid" else None
    coordinator = None
    if rank == 0:
        coordinator = Coordinator(cfg, config["rollout_workers"], config["pool"], config["train_states"],
                                  config["val_states"], config["difficulty"], local=hybrid)
    start_iteration, version = 0, 0
    checkpoint_dir = _checkpoint_to_restore(config)
    if checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir, engine)
        start_iteration, version = state["iteration"], state["version"]
        if coordinator is not None:
            coordinator.load_state_dict(state["coordinator"])
        if rank == 0:
            log.info("resumed from %s at iteration %d", checkpoint_dir, start_iteration)

    logger = health = None
    if rank == 0:
        from ..run_logging import RunLogger

        with disk_guard(run_path, "metrics.jsonl and tensorboard/"):
            logger = RunLogger(run_path, enable_gauges=True, progress=cfg.progress, iterations=cfg.iterations,
                               resume_at=start_iteration)
        session = uuid.uuid4().hex[:8]  # a restarted group re-issues version numbers: keys stay unique
        # hybrid: the ranks sample with the weights they train, nothing is exported
        weights_box = None if hybrid else [ray.put(adapter_state(module.policy)), f"{session}:{version}"]
        health = _HealthWriter(run_path, coordinator, world, session)
        health.write(start_iteration, version)
    last_val: dict = {}
    stop_at = cfg.iterations if cfg.stop_after_iterations is None else min(
        cfg.iterations, start_iteration + cfg.stop_after_iterations)
    done, stop, stopped_on_nan = start_iteration, [False], False
    for iteration in range(start_iteration, stop_at):
        t_iter = time.perf_counter()
        # FLOPs are counted on the session's first iteration (untimed warm-up: the counter slows what it counts);
        # the rollout's only where it runs in the ranks
        counters = {}
        if cfg.learner.count_flops and iteration == start_iteration:
            counters = {"learn": flop_counter(), **({"rollout": flop_counter()} if hybrid else {})}
        # The batch itself goes through the collective: an ObjectRef pickled outside Ray's serializer is not
        # registered with its owner, and ray.get on it in another rank blocks forever.
        with counters.get("rollout", contextlib.nullcontext()):
            if hybrid is not None and rank > 0:
                hybrid.follow()
            box = [coordinator.rollout(iteration, version, weights_box) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        batch = box[0]
        t_learn = time.perf_counter()
        try:
            with counters.get("learn", contextlib.nullcontext()):
                stats = learn(engine, batch, cfg, rank, world, iteration, hybrid.take() if hybrid else None)
            learn_stats = _all_mean(stats, device)
            learn_stats.update(_all_max({"memory/learner_peak_gib": peak_memory_gib(device)}, device))
            learn_stats.update(_all_sum({f"flops/{phase}": float(c.get_total_flops())
                                         for phase, c in counters.items()}, device) if counters else {})
        except TrainingNonFinite as exc:
            _stop_on_non_finite(exc, engine, rank, iteration, version, coordinator, run_path, config["session"],
                                cfg.keep_checkpoints)
            stopped_on_nan = True
            break
        t_learn = time.perf_counter() - t_learn
        version += 1
        metrics = {"iteration": iteration + 1, "adapter_version": version, **learn_stats}
        if rank == 0:
            t_sync = time.perf_counter()
            if hybrid is None:
                weights_box = [ray.put(adapter_state(module.policy)), f"{session}:{version}"]
            metrics["time/export"] = time.perf_counter() - t_sync
            metrics.update(batch.stats)
            metrics["batch_ids"] = batch.ids
            metrics["time/learn"] = t_learn
            if cfg.val_every and ((iteration + 1) % cfg.val_every == 0 or iteration + 1 == cfg.iterations
                                  or iteration == start_iteration):
                last_val = coordinator.validate(version, weights_box)
                metrics.update(last_val)
            metrics["time/iteration"] = time.perf_counter() - t_iter
            with disk_guard(run_path, f"the metrics of iteration {iteration + 1}"):
                logger.log(metrics)
            # Reports carry the latest validation numbers every iteration, so schedulers (ASHA) always see them.
            metrics.update({k.replace("/", "_"): v for k, v in last_val.items()})
            if config.get("objective") and last_val:
                metrics["objective"] = constrained_objective(metrics, config["objective"])
            with disk_guard(run_path, "health.json and samples/"):
                health.write(iteration + 1, version)
                write_sample_overlay(run_path, batch.images[0], batch.unpack_actions(0)[0], batch.gts[0],
                                     batch.fovs[0], {"image": batch.ids[0], "iteration": iteration + 1,
                                                     "rollout_version": batch.version})
        # A stop request (the status service) ends the run after this iteration, checkpointed; rank 0 decides
        # for all ranks so that none waits in a collective the others have left.
        stop = [stop_requested(run_path) if rank == 0 else None]
        dist.broadcast_object_list(stop, src=0)
        is_ckpt = (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == stop_at or stop[0]
        if is_ckpt:
            _report_checkpoint(engine, rank, iteration + 1, version, coordinator, _numbers(metrics), run_path,
                               {"session": config["session"], "val_dice": last_val.get("val/dice")},
                               cfg.keep_checkpoints)
        else:
            ray.train.report(_numbers(metrics))
        done = iteration + 1
        if stop[0]:
            if rank == 0:
                log.info("stop requested: ended after iteration %d (checkpointed)", iteration + 1)
            break
    if rank == 0:
        logger.close()
        if done == cfg.iterations and not stopped_on_nan:
            with disk_guard(run_path, "final_adapter/"):
                module.policy.save_pretrained(str(run_path / "final_adapter"), save_embedding_layers=False)
        console_done()
    dist.barrier()

