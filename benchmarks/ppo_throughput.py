"""PPO throughput of the default model on one GPU: the Ray job vs the same PPO math in one process (issue 7).

    python benchmarks/ppo_throughput.py --out DIR [--sweep]          # one H100: 4.5 min, 8 min with --sweep
    python benchmarks/ppo_throughput.py --device cpu --image-size 64 --iterations 3 --images 2 --k 2 --out DIR

(a) the Ray job as users run it (``rl_seg.train.run_training``): rollout actors and the learner colocated on one
    GPU with fractional GPUs; per-phase times come from the run's metrics.jsonl, warm-up iterations skipped.
(b) the same iterations in this process without Ray: the same images in the same order, the same sampling seeds,
    the same reward scored in-process, the same ``RolloutBatch`` and the project's own ``learn()`` on a DeepSpeed
    engine (world size 1). Both are built from ONE ``TrainConfig``, so K, images, epochs, minibatches and lr agree.

GPU busy and memory come from ``nvidia-smi -lms 100`` sampled in a background process for both (a) and (b) and
cut to the timed iterations' wall-clock window (the same instrument for both, since (a)'s work is spread over
several processes); (b) also reports ``torch.cuda.max_memory_allocated``. The floor is from first principles: one
warm-up iteration of (b) runs under ``FlopCounterMode`` and a dispatch mode that records each device op's FLOPs
and the bytes its kernel reads and writes; each op costs at least max(FLOPs / measured bf16 matmul rate, bytes /
measured copy bandwidth), and their sum is the iteration's floor (for data that lives in HBM: tensors that stay in
a cache can beat it, which happens on a CPU at smoke-test sizes). Writes results.json, results.md and, with
``--sweep``, sweep.png (masks/s of (a) vs rollout workers and K) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.scoring import TargetCache, pack_mask, score_items  # noqa: E402
from rl_seg.config import from_dict, load_config, to_dict  # noqa: E402
from rl_seg.flops import FLOP_FORMULAS, flop_counter  # noqa: E402
from rl_seg.policy import load_policy  # noqa: E402
from rl_seg.policy.distribution import sample_masks as draw_masks  # noqa: E402
from rl_seg.policy.base import autocast_for  # noqa: E402
from rl_seg.policy.lora import attach_lora  # noqa: E402
from rl_seg.ppo.config import TrainConfig  # noqa: E402
from rl_seg.ppo.states import DataOrder, load_states, thin_vessel_fraction  # noqa: E402
from rl_seg.roles.coordinator import LOGGED_COMPONENTS, RolloutBatch, reward_weights, total_reward  # noqa: E402
from rl_seg.roles.rollout import adapter_state  # noqa: E402

PHASES = ("rollout", "reward", "learn", "sync", "export")
TARGETS = {"ratio": 0.9, "reward_share": 0.05, "sync_s": 0.05, "gpu_busy": 0.70}


# --- one config for both paths -------------------------------------------------------------------------------

def build_config(*, run_dir: Path, name: str, policy: str = "default", image_size: int | None = 512,
                 images: int = 8, k: int = 8, iterations: int = 12, use_gpu: bool = True,
                 datasets: str = "drive-sample,arcade-sample", rollout_workers: int = 2, rollout_gpus: float = 0.25,
                 learner_gpus: float = 0.5, reward_actors: int = 2, extra: list[str] | tuple = ()) -> TrainConfig:
    """The one TrainConfig (a) and (b) share. One learner rank, because (b) is one process: the gradient
    accumulation DeepSpeed derives from images per rank is then the same in both."""
    need = rollout_workers + 1 + reward_actors  # one logical CPU each; logical CPUs may exceed cores (smoke runs)
    overrides = [
        f"name={name}", f"run_dir={run_dir}", f"policy.name={policy}", f"iterations={iterations}", "seed=0",
        f"data.datasets=[{datasets}]", f"data.image_size={'null' if image_size is None else image_size}",
        f"data.images_per_iteration={images}", "data.val_limit=1",
        f"rollout.num_workers={rollout_workers}", "rollout.num_cpus=1",
        f"rollout.num_gpus={rollout_gpus if use_gpu else 0}", f"rollout.samples_per_image={k}",
        f"reward.num_actors={reward_actors}", "reward.num_cpus=1",
        "learner.num_workers=1", f"learner.use_gpu={'true' if use_gpu else 'false'}", "learner.cpus_per_worker=1",
        f"learner.gpus_per_worker={learner_gpus if use_gpu else 1}",
        # no validation and no mid-run checkpoints: neither is part of an iteration's steady-state cost
        "val_every=0", "checkpoint_every=1000000", "progress=false",
        f"ray_num_cpus={max(os.cpu_count() or 1, need)}",
        *extra,
    ]
    cfg = load_config(TrainConfig, None, overrides)
    if cfg.learner.num_workers != 1:
        raise ValueError("the in-process baseline is one rank: learner.num_workers must stay 1")
    return cfg


def variant(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy of ``cfg`` with dotted fields changed (re-validated), for the sweep."""
    tree = to_dict(cfg)
    for dotted, value in changes.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(TrainConfig, tree)


# --- GPU sampling ---------------------------------------------------------------------------------------------

class GpuSampler:
    """``nvidia-smi`` every 100 ms in a background process, each line stamped with this host's wall clock, so
    any window (a run's timed iterations, logged by another process) can be cut out afterwards."""

    def __init__(self, enabled: bool):
        self.samples: list[tuple[float, float, float]] = []  # (time, utilization %, memory MiB)
        self._proc = None
        if not enabled or shutil.which("nvidia-smi") is None:
            return
        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        self._proc = subprocess.Popen(
            ["nvidia-smi", "-i", index, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def active(self) -> bool:
        return self._proc is not None

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def window(self, t0: float, t1: float) -> dict | None:
        rows = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not rows:
            return None
        util, mem = zip(*rows)
        return {"gpu_busy": float(np.mean(util)) / 100.0, "peak_memory_mib": float(max(mem)), "samples": len(rows)}

    def latest_memory(self) -> float | None:
        return self.samples[-1][2] if self.samples else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- costs of device work: FLOPs and bytes per op ------------------------------------------------------------

_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "_local_scalar_dense", "lift_fresh", "set_", "record_stream"}


def _nbytes(t: torch.Tensor) -> int:
    """Bytes an eager kernel touches for ``t``: an expanded tensor is read from its (smaller) storage."""
    try:
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


class OpCosts(TorchDispatchMode):
    """Every aten op on ``device``: its FLOPs (torch's own formulas, as FlopCounterMode) and the bytes its kernel
    reads and writes (each distinct input and output once; views move nothing). Eager PyTorch runs one kernel
    per op, so sum over ops of max(FLOPs / peak, bytes / bandwidth) is a floor for the work as written."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device_type = device.type
        self.ops: list[tuple[float, float]] = []
        self.uncounted: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _NO_TRAFFIC:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if not any(t.device.type == self.device_type for t in tensors):
            return out
        seen, traffic = set(), 0
        for t in tensors:
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                traffic += _nbytes(t)
        flops = 0
        formula = FLOP_FORMULAS.get(func.overloadpacket)
        if formula is not None:
            try:
                flops = formula(*args, **kwargs, out_val=out)
            except Exception:  # noqa: BLE001 - an op torch cannot count is recorded, not fatal
                self.uncounted.add(name)
        self.ops.append((float(flops), float(traffic)))
        return out

    def totals(self, peak_flops: float, bandwidth: float) -> dict:
        f = sum(x for x, _ in self.ops)
        b = sum(y for _, y in self.ops)
        roofline = sum(max(x / peak_flops, y / bandwidth) for x, y in self.ops)
        return {"ops": len(self.ops), "uncounted_flop_ops": sorted(self.uncounted), "flops": f, "bytes": b,
                "compute_floor_s": f / peak_flops, "memory_floor_s": b / bandwidth, "floor_s": roofline}


def measure_device(device: torch.device) -> dict:
    """The rates the floor is divided by: a large matmul in the dtype the policy computes in (bf16 on a GPU under
    autocast, fp32 on a CPU), and a large device-to-device copy (bytes read + written)."""
    gpu = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 20) if gpu else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def timed(fn, reps):
        for _ in range(3):
            fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        return (time.perf_counter() - start) / reps

    t_mm = timed(lambda: torch.matmul(a, b), reps)
    del a, b
    size = (1 << 30) if gpu else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), reps)
    del src, dst
    if gpu:
        torch.cuda.empty_cache()
    return {"matmul": f"{n}x{n} {str(dtype).replace('torch.', '')}", "matmul_flops_per_s": 2 * n ** 3 / t_mm,
            "copy_bytes": size, "copy_bandwidth_bytes_per_s": 2 * size / t_copy}


def per_sample_flops(cfg: TrainConfig, device: torch.device, image: np.ndarray) -> dict:
    """FlopCounterMode on one image at the run's size: a no-grad forward (rollout, old log-probs) and a forward
    + backward of the trainable PPO module (a learner step); elementwise loss math counts no FLOPs here."""
    from rl_seg.roles.learner import PPOModule

    torch.manual_seed(cfg.seed)
    policy = attach_lora(load_policy(cfg.policy.name, device=device, **cfg.policy.load_kwargs()), cfg.policy.lora)
    module = PPOModule(policy, policy.get_base_model().hidden_size).to(device)
    pixels = policy.preprocess([image])
    with flop_counter() as fwd, torch.no_grad(), autocast_for(device):
        module(pixels)
    with flop_counter() as train:
        with autocast_for(device):
            logits, value = module(pixels)
        (logits.float().mean() + value.float().mean()).backward()
    out = {"image_size": list(image.shape[:2]), "forward": fwd.get_total_flops(),
           "forward_backward": train.get_total_flops(),
           "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
           "parameters": sum(p.numel() for p in module.parameters())}
    del module, policy, pixels
    return out


# --- (b): the same PPO iterations in this process ------------------------------------------------------------

@contextlib.contextmanager
def single_process_group(device: torch.device):
    """torch.distributed with world size 1, the rank variables set as Ray Train sets them for one worker."""
    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A file store, not tcp://: torch's TCP store listens on every interface (and outlives the group), and one
    # process has no one to rendezvous with.
    store_dir = tempfile.mkdtemp(prefix="rl-seg-store-")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            store=dist.FileStore(os.path.join(store_dir, "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        shutil.rmtree(store_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sample_masks(policy, image: np.ndarray, fov: np.ndarray | None, k: int, temperature: float, seed: int,
                 device: torch.device) -> np.ndarray:
    """K masks for one image, as ``RolloutWorker.sample`` draws them (same autocast, distribution and seed)."""
    with torch.no_grad(), autocast_for(device):
        logits = policy(policy.preprocess([image])).logits.float()
    valid = None if fov is None else torch.from_numpy(np.array(fov))
    return draw_masks(logits, k, temperature, seed, valid).cpu().numpy()


def build_batch(ids, states, masks, outcomes, k: int, weights: dict, normalize: bool, version: int) -> RolloutBatch:
    """The learner's batch, with rewards and components formed as the coordinator forms them."""
    names = sorted(set(weights) | set(LOGGED_COMPONENTS))
    rewards, components, oks = [], [], []
    for j in range(len(ids)):
        group = outcomes[j * k:(j + 1) * k]
        oks.append(np.array([o.ok for o in group]))
        components.append({c: np.array([o.components.get(c, np.nan) if o.ok else np.nan for o in group])
                           for c in names})
        rewards.append(np.array([total_reward(o.components, weights, normalize) if o.ok else np.nan
                                 for o in group]))
    actions = [(np.packbits(m.ravel()), tuple(m.shape)) for m in masks]
    stats = {"reward": float(np.nanmean(np.concatenate(rewards)))}
    return RolloutBatch(ids=list(ids), images=[s.image for s in states], gts=[s.gt for s in states],
                        fovs=[s.fov for s in states], actions=actions, rewards=rewards, components=components,
                        ok=oks, weights=dict(weights), version=version, stats=stats)


@dataclass
class InProcessResult:
    records: list[dict]
    summary: dict
    adapter_before: dict = field(repr=False, default_factory=dict)
    adapter_after: dict = field(repr=False, default_factory=dict)
    costs: dict | None = None
    probe: dict | None = None


def run_in_process(cfg: TrainConfig, warmup: int, device: torch.device, sampler: GpuSampler | None = None,
                   count_costs: bool = False, compare_reuse: int = 0, probe=None,
                   count_flops: bool = False) -> InProcessResult:
    """(b): cfg.iterations PPO iterations without Ray; the first ``warmup`` are not timed. With ``count_costs``
    the first warm-up iteration runs under the FLOP and byte counters (it is untimed, so they cost nothing).
    ``cfg.placement=hybrid``: sampling goes through the learner's engine and what it computed is kept for the
    update (``rl_seg.roles.hybrid``), as the Ray job's hybrid ranks do. ``compare_reuse``: that many more
    iterations with frozen-tower reuse off, whose learn time is reported beside the timed ones'. ``probe(policy,
    image, device)``: a measurement of its own on the loaded policy, returned as ``probe``. ``count_flops``: the
    first iteration's rollout and learn FLOPs (FlopCounterMode) in its record (``flops/rollout``, ``flops/learn``)."""
    import deepspeed

    from rl_seg.roles.hybrid import HybridRollout
    from rl_seg.roles.learner import PPOModule, deepspeed_config, learn
    from rl_seg.train import pool_reward

    if cfg.reward.adaptive_recall.enabled:
        raise ValueError("the in-process baseline keeps the reward weights fixed: turn adaptive_recall off")
    if count_costs and warmup < 1:
        raise ValueError("counting costs needs a warm-up iteration to run in")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads_per_worker)  # as every actor and learner worker of (a)
    torch.manual_seed(cfg.seed)
    label_size = 256 if cfg.policy.action_resolution == "native" else None
    train = load_states(cfg.data.datasets, cfg.data.train_split, cfg.data.image_size, cfg.data.train_limit,
                        label_size)
    by_id = {s.id: s for s in train}
    datasets = [s.id.split("/", 1)[0] for s in train]  # as the coordinator draws them
    order = DataOrder([thin_vessel_fraction(s.gt) for s in train], cfg.seed, cfg.data.curriculum,
                      groups=datasets if cfg.data.balance_datasets else None)
    reward = pool_reward(cfg)
    weights, normalize = reward_weights(cfg)
    # One cache across iterations, as each reward actor keeps one: a target's skeleton is computed once.
    targets = TargetCache(capacity=max(1, len(train)))
    records, costs, extra, probed = [], None, [], None
    try:
        with single_process_group(device):
            load_start = time.perf_counter()
            policy = attach_lora(load_policy(cfg.policy.name, device=device, **cfg.policy.load_kwargs()),
                                 cfg.policy.lora)
            if cfg.policy.gradient_checkpointing:
                policy.get_base_model().enable_gradient_checkpointing()
            module = PPOModule(policy, policy.get_base_model().hidden_size).to(device)
            params = [p for p in module.parameters() if p.requires_grad]
            engine, *_ = deepspeed.initialize(model=module, model_parameters=params,
                                              config=deepspeed_config(cfg, bf16=device.type == "cuda"),
                                              dist_init_required=False)
            load_s = time.perf_counter() - load_start
            # copied: on a CPU, adapter_state's arrays share memory with the live parameters
            # Dropout off for the whole run, as train_loop does (working-tree learner.py): one network on one
            # input, so the PPO ratio carries no dropout noise.
            engine.module.eval()
            hybrid = HybridRollout(engine, cfg, 0, 1) if cfg.placement == "hybrid" else None
            before = {n: v.copy() for n, v in adapter_state(module.policy).items()}

            def iterate(iteration: int, run_cfg: TrainConfig, phase_counters: dict | None = None) -> dict:
                return _one_iteration(engine, module, run_cfg, iteration, order, train, by_id, reward, weights,
                                      normalize, targets, device, learn, k=run_cfg.rollout.samples_per_image,
                                      temp=run_cfg.rollout.temperature, hybrid=hybrid, counters=phase_counters)

            for iteration in range(cfg.iterations):
                if iteration == warmup and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                counting = count_costs and iteration == 0
                modes = (flop_counter(), OpCosts(device)) if counting else ()
                with contextlib.ExitStack() as stack:
                    for mode in modes:
                        stack.enter_context(mode)
                    rec = iterate(iteration, cfg, {"rollout": flop_counter(), "learn": flop_counter()}
                                  if iteration == 0 and (counting or count_flops) else None)
                if counting:
                    costs = {"flop_counter_mode_flops": modes[0].get_total_flops(), "op_costs": modes[1]}
                records.append(rec)
            peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            after = {n: v.copy() for n, v in adapter_state(module.policy).items()}
            if compare_reuse:
                without = from_dict(TrainConfig, {**to_dict(cfg), "learner": {
                    **to_dict(cfg)["learner"], "reuse_frozen_towers": False}})
                extra = [iterate(cfg.iterations + i, without) for i in range(compare_reuse)]
            if probe is not None:
                probed = probe(module.policy, train[0].image, device)
            del engine, module, policy, params, hybrid
    finally:
        torch.set_num_threads(threads)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = summarize(records[warmup:], cfg, wall=None)
    summary["peak_memory_allocated_mib"] = None if peak_alloc is None else peak_alloc / 2 ** 20
    summary["load_s"] = load_s
    if sampler is not None and sampler.active and records[warmup:]:
        t0 = records[warmup]["time"] - records[warmup]["time/iteration"]
        summary["nvidia_smi"] = sampler.window(t0, records[-1]["time"])
    summary["reward_by_iteration"] = [r["reward"] for r in records]
    if extra:
        summary["learn_s_without_reuse"] = float(np.mean([r["time/learn"] for r in extra]))
        summary["rollout_s_without_reuse"] = float(np.mean([r["time/rollout"] for r in extra]))
    return InProcessResult(records, summary, before, after, costs, probed)


def _one_iteration(engine, module, cfg, iteration, order, train, by_id, reward, weights, normalize, targets,
                   device, learn, k, temp, hybrid=None, counters: dict | None = None) -> dict:
    counters = counters or {}
    t_iter = time.perf_counter()
    picks = order.next_batch(cfg.data.images_per_iteration)
    states = [train[i] for i in picks]
    # Seeds as the coordinator derives them, so (a) and (b) draw the same masks from the same policy.
    seeds = [cfg.seed * 1_000_003 + iteration * 10_007 + int(i) for i in picks]
    with counters.get("rollout") or contextlib.nullcontext():
        if hybrid is not None:
            replies = hybrid.sample([(pos, s.id, s.image, s.fov, seed)
                                     for pos, (s, seed) in enumerate(zip(states, seeds))], iteration)
            masks = [np.unpackbits(r["samples"][0]["bits"], count=int(np.prod(r["samples"][0]["shape"])))
                     .reshape(r["samples"][0]["shape"]).astype(bool) for _, r in sorted(replies.items())]
        else:
            mode = module.training
            module.eval()  # rollout actors sample in eval mode (no LoRA dropout)
            masks = [sample_masks(module.policy, s.image, s.fov, k, temp, seed, device)
                     for s, seed in zip(states, seeds)]
            module.train(mode)
        _sync(device)
    t_rollout = time.perf_counter() - t_iter

    t0 = time.perf_counter()
    items = [(s.id, pack_mask(m)) for s, group in zip(states, masks) for m in group]
    outcomes = score_items(reward, items, targets, lambda sid: (by_id[sid].gt, by_id[sid].fov))
    batch = build_batch([s.id for s in states], states, masks, outcomes, k, weights, normalize, iteration)
    t_reward = time.perf_counter() - t0

    t0 = time.perf_counter()
    with counters.get("learn") or contextlib.nullcontext():
        learn(engine, batch, cfg, 0, 1, iteration, hybrid.take() if hybrid is not None else None)
        _sync(device)
    t_learn = time.perf_counter() - t0
    # The rollout here samples with the learner's own module: no weights move, so sync and export are zero.
    rec = {"iteration": iteration + 1, "time/rollout": t_rollout, "time/reward": t_reward, "time/learn": t_learn,
           "time/sync": 0.0, "time/export": 0.0, "time/iteration": time.perf_counter() - t_iter,
           "masks": len(picks) * k, "reward": batch.stats["reward"], "batch_ids": [s.id for s in states],
           "time": time.time()}
    rec.update({f"flops/{phase}": float(c.get_total_flops()) for phase, c in counters.items()})
    return rec


# --- (a): the Ray job ----------------------------------------------------------------------------------------

def run_ray_job(cfg: TrainConfig, warmup: int, sampler: GpuSampler | None = None) -> dict:
    from rl_seg.train import run_training

    shutil.rmtree(cfg.run_path, ignore_errors=True)
    baseline = sampler.latest_memory() if sampler is not None and sampler.active else None
    start = time.time()
    run_training(cfg)
    wall = time.time() - start
    rows = [json.loads(x) for x in (cfg.run_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = rows[warmup:]
    k = cfg.rollout.samples_per_image
    for r in rows:
        r["masks"] = len(r["batch_ids"]) * k
    # The window runs from the end of the last warm-up iteration to the end of the last timed one, so what
    # happens between iterations (Ray Train's report) counts too: this is the rate a user gets.
    t0 = rows[warmup - 1]["time"] if warmup else rows[0]["time"] - rows[0]["time/iteration"]
    t1 = timed[-1]["time"]
    summary = summarize(timed, cfg, wall=t1 - t0)
    summary["run_wall_s"] = wall
    summary["startup_s"] = wall - (rows[-1]["time"] - (rows[0]["time"] - rows[0]["time/iteration"]))
    summary["job_masks_per_s_metric"] = float(np.mean([r["masks_per_s"] for r in timed]))
    summary["reward_by_iteration"] = [r["reward"] for r in rows]
    summary["run_path"] = str(cfg.run_path)
    if sampler is not None and sampler.active:
        summary["nvidia_smi"] = sampler.window(t0, t1)
        summary["nvidia_smi_baseline_mib"] = baseline
    return summary


# --- summaries, report ---------------------------------------------------------------------------------------

def summarize(timed: list[dict], cfg: TrainConfig, wall: float | None) -> dict:
    """Mean phase times over the timed iterations, and masks/s = masks / time (``wall`` when given, else the sum
    of the iterations' own times)."""
    masks = int(sum(r["masks"] for r in timed))
    iter_sum = float(sum(r["time/iteration"] for r in timed))
    seconds = iter_sum if wall is None else wall
    phases = {p: float(np.mean([r.get(f"time/{p}", 0.0) for r in timed])) for p in PHASES}
    per_iter = seconds / len(timed)
    # time/sync is spent inside the rollout actor's request, so it is part of time/rollout already.
    phases["other"] = float(np.mean([r["time/iteration"] for r in timed])) - sum(
        phases[p] for p in PHASES if p != "sync")
    return {"iterations_timed": len(timed), "masks": masks, "seconds": seconds, "masks_per_s": masks / seconds,
            "masks_per_s_inside_iterations": masks / iter_sum, "iteration_s": per_iter,
            "iteration_s_logged": iter_sum / len(timed), "between_iterations_s": per_iter - iter_sum / len(timed),
            "phases_s": phases,
            "reward_share": phases["reward"] / per_iter, "sync_plus_export_s": phases["sync"] + phases["export"],
            "k": cfg.rollout.samples_per_image, "images_per_iteration": cfg.data.images_per_iteration,
            "rollout_workers": cfg.rollout.num_workers}


def floor_report(costs: dict | None, rates: dict, per_sample: dict, cfg: TrainConfig) -> dict | None:
    if costs is None:
        return None
    t = costs["op_costs"].totals(rates["matmul_flops_per_s"], rates["copy_bandwidth_bytes_per_s"])
    n_fwd = 2 + (1 if cfg.ppo.loss.kl_coef > 0 else 0)  # rollout, old log-probs (+ reference)
    expected = cfg.data.images_per_iteration * (n_fwd * per_sample["forward"]
                                                + cfg.ppo.epochs * per_sample["forward_backward"])
    masks = cfg.data.images_per_iteration * cfg.rollout.samples_per_image
    return {"iteration_flops_flop_counter_mode": costs["flop_counter_mode_flops"], "iteration_flops_per_op": t["flops"],
            "iteration_flops_from_per_sample": expected, "iteration_bytes": t["bytes"], "device_ops": t["ops"],
            "uncounted_flop_ops": t["uncounted_flop_ops"],
            "compute_floor_s": t["compute_floor_s"], "memory_floor_s": t["memory_floor_s"],
            "floor_s": t["floor_s"], "floor_masks_per_s": masks / t["floor_s"]}


def _fmt(v, spec=".3f", scale=1.0, suffix=""):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:{spec}}{suffix}"


def _met(ok):
    return "-" if ok is None else ("met" if ok else "**not met**")


def markdown(report: dict) -> str:
    a, b = report.get("ray"), report.get("in_process")
    cols = [("(a) Ray job", a), ("(b) one process", b)]
    c = report["config"]
    shares = (f"{c['rollout']['num_workers']} rollout actors x {c['rollout']['num_gpus']} GPU, the learner x "
              f"{c['learner']['gpus_per_worker']} GPU" if c["learner"]["use_gpu"]
              else f"{c['rollout']['num_workers']} rollout actors and the learner on CPU")
    lines = [f"# PPO throughput ({report['device']}, {report['date']})", "",
             f"Policy `{c['policy']['name']}`, {c['data']['image_size']} px, {c['data']['images_per_iteration']} "
             f"images x K = {c['rollout']['samples_per_image']} masks per iteration, {c['ppo']['epochs']} epochs x "
             f"{c['ppo']['minibatches']} minibatches; {report['iterations']} iterations, the first "
             f"{report['warmup']} not timed. (a): {shares}, {c['reward']['num_actors']} reward actors. GPU busy and "
             "memory: nvidia-smi every 100 ms over the timed iterations.", "",
             "| metric | " + " | ".join(c for c, _ in cols) + " | target |", "|---|---|---|---|"]

    def row(label, fn, target=""):
        lines.append(f"| {label} | " + " | ".join(fn(r) if r else "-" for _, r in cols) + f" | {target} |")

    row("masks/s (end to end)", lambda r: _fmt(r["masks_per_s"], ".1f"))
    row("iteration (s)", lambda r: _fmt(r["iteration_s"]))
    for p in (*PHASES, "other"):
        row(f"  {p} (s)", lambda r, p=p: _fmt(r["phases_s"][p]))
    row("  between iterations (s): RunLogger.log + ray.train.report", lambda r: _fmt(r["between_iterations_s"]))
    row("reward share of iteration", lambda r: _fmt(r["reward_share"], ".1f", 100, "%"), "< 5%")
    row("sync + export (ms)", lambda r: _fmt(r["sync_plus_export_s"], ".1f", 1000), "< 50 ms")
    row("GPU busy (nvidia-smi)", lambda r: _fmt((r.get("nvidia_smi") or {}).get("gpu_busy"), ".0f", 100, "%"),
        ">= 70%")
    row("peak GPU memory.used (MiB)", lambda r: _fmt((r.get("nvidia_smi") or {}).get("peak_memory_mib"), ".0f"))
    row("peak torch allocated (MiB)", lambda r: _fmt(r.get("peak_memory_allocated_mib"), ".0f"))
    row("reward, first iteration", lambda r: _fmt(r["reward_by_iteration"][0], ".4f"))
    t = report["targets"]
    lines += ["", f"Ratio (a)/(b) masks/s: {_fmt(report.get('ratio'), '.3f')} (target >= {TARGETS['ratio']}: "
              f"{_met(t.get('ratio'))}). (a): reward share {_met(t.get('reward_share'))}, sync "
              f"{_met(t.get('sync_s'))}, GPU busy {_met(t.get('gpu_busy'))}.", ""]
    fl, rates, ps = report.get("floor"), report.get("device_rates"), report.get("per_sample_flops")
    if rates:
        lines.append(f"Measured rates: matmul ({rates['matmul']}) {rates['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s, "
                     f"copy {rates['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s.")
    if ps:
        lines.append(f"FLOPs per image at {ps['image_size'][0]}x{ps['image_size'][1]} (FlopCounterMode): forward "
                     f"{ps['forward'] / 1e9:.2f} GFLOP, forward+backward {ps['forward_backward'] / 1e9:.2f} GFLOP "
                     f"({ps['trainable_parameters']:,} of {ps['parameters']:,} parameters trainable).")
    if fl:
        lines += [f"One iteration on the device: {fl['iteration_flops_flop_counter_mode'] / 1e12:.3f} TFLOP "
                  f"(from per-image counts: {fl['iteration_flops_from_per_sample'] / 1e12:.3f}), "
                  f"{fl['iteration_bytes'] / 1e9:.2f} GB touched by {fl['device_ops']} kernels; floor "
                  f"{fl['floor_s'] * 1000:.1f} ms (compute alone {fl['compute_floor_s'] * 1000:.1f} ms, memory alone "
                  f"{fl['memory_floor_s'] * 1000:.1f} ms) = {fl['floor_masks_per_s']:.0f} masks/s.",
                  "Achieved fraction of the floor: " + ", ".join(
                      f"{c} {_fmt(r['masks_per_s'] / fl['floor_masks_per_s'], '.1f', 100, '%')}"
                      for c, r in cols if r) + "."]
    if report.get("sweep"):
        lines += ["", "Sweep of (a): masks/s by rollout workers and K", "",
                  "| rollout workers | K | masks/s | iteration (s) | rollout (s) | reward (s) | learn (s) | GPU busy |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in report["sweep"]:
            if s.get("skipped"):
                lines.append(f"| {s['rollout_workers']} | {s['k']} | skipped: {s['skipped']} | | | | | |")
                continue
            ph = s["phases_s"]
            lines.append(f"| {s['rollout_workers']} | {s['k']} | {s['masks_per_s']:.1f} | {s['iteration_s']:.3f} | "
                         f"{ph['rollout']:.3f} | {ph['reward']:.3f} | {ph['learn']:.3f} | "
                         f"{_fmt((s.get('nvidia_smi') or {}).get('gpu_busy'), '.0f', 100, '%')} |")
    lines += ["", f"Script wall time: {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot_sweep(sweep: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    for k in sorted({s["k"] for s in sweep}):
        pts = sorted((s["rollout_workers"], s["masks_per_s"]) for s in sweep if s["k"] == k and not s.get("skipped"))
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"K = {k}")
    ax.set_xlabel("rollout workers")
    ax.set_ylabel("masks/s (Ray job)")
    ax.set_xticks(sorted({s["rollout_workers"] for s in sweep}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


# --- main ----------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ppo_throughput"))
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=12, help="iterations per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first iterations not timed (at most iterations-1)")
    parser.add_argument("--images", type=int, default=8, help="images per iteration")
    parser.add_argument("--k", type=int, default=8, help="masks per image")
    parser.add_argument("--policy", default="default")
    parser.add_argument("--datasets", default="drive-sample,arcade-sample",
                        help="the shipped samples need no data on the host; 'drive,arcade' reads RL_SEG_DATA_DIR")
    parser.add_argument("--rollout-workers", type=int, default=2)
    parser.add_argument("--rollout-gpus", type=float, default=0.25, help="GPU share per rollout actor")
    parser.add_argument("--learner-gpus", type=float, default=0.5, help="GPU share of the learner")
    parser.add_argument("--reward-actors", type=int, default=None,
                        help="reward-pool actors (default: the CPUs left after rollout, learner and driver, <= 8)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="further TrainConfig overrides, shared by (a) and (b), e.g. ppo.epochs=1")
    parser.add_argument("--only", choices=("both", "ray", "inprocess"), default="both")
    parser.add_argument("--sweep", action="store_true", help="also time (a) at each rollout-worker count and K")
    parser.add_argument("--sweep-workers", default="1,2")
    parser.add_argument("--sweep-k", default="4,8")
    parser.add_argument("--sweep-iterations", type=int, default=6)
    parser.add_argument("--budget-s", type=float, default=540,
                        help="sweep points predicted to end past this many seconds of script time are skipped")
    args = parser.parse_args()
    started = time.time()

    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_gpu and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    gpu_name = "cpu"
    if use_gpu:
        # Asked of nvidia-smi rather than torch, so that this process holds no CUDA context while (a) runs.
        info = subprocess.run(["nvidia-smi", "-i", (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0],
                               "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip().split(", ")
        gpu_name = info[0] or "cuda"
        if len(info) > 1 and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # DeepSpeed cannot parse the arch names it derives itself ("9.0a") when it builds its ops
            os.environ["TORCH_CUDA_ARCH_LIST"] = info[1]
    cpus = os.cpu_count() or 1
    reward_actors = args.reward_actors or max(1, min(8, cpus - args.rollout_workers - 2))
    warmup = max(0, min(args.warmup, args.iterations - 1))
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = (args.out / "runs").resolve()

    def config(name, **kw):
        base = dict(run_dir=run_dir, name=name, policy=args.policy, image_size=args.image_size, images=args.images,
                    k=args.k, iterations=args.iterations, use_gpu=use_gpu, datasets=args.datasets,
                    rollout_workers=args.rollout_workers, rollout_gpus=args.rollout_gpus,
                    learner_gpus=args.learner_gpus, reward_actors=reward_actors, extra=args.set)
        return build_config(**{**base, **kw})

    cfg = config(f"ray_w{args.rollout_workers}_k{args.k}")
    report = {"host": platform.node(), "date": date.today().isoformat(), "python": platform.python_version(),
              "torch": torch.__version__, "device": gpu_name,
              "cpus": cpus, "iterations": args.iterations, "warmup": warmup, "config": to_dict(cfg),
              "phase_notes": "(a) time/sync is the rollout actor loading the adapter (inside time/rollout); "
                             "time/export is the learner putting it in the object store; 'other' is the rest of "
                             "time/iteration (batch assembly, broadcast). masks/s of (a) is over the wall-clock "
                             "window of the timed iterations, Ray Train's reports included."}
    print(f"device {report['device']}, {args.iterations} iterations ({warmup} warm-up), {args.images} images x "
          f"K={args.k} at {args.image_size} px, {reward_actors} reward actors", flush=True)
    sampler = GpuSampler(use_gpu)
    time.sleep(0.5 if sampler.active else 0)  # an idle reading before anything starts
    try:
        if args.only in ("both", "ray"):
            report["ray"] = run_ray_job(cfg, warmup, sampler)
            print(f"(a) Ray job: {report['ray']['masks_per_s']:.1f} masks/s, {report['ray']['iteration_s']:.3f} "
                  f"s/iteration, run {report['ray']['run_wall_s']:.0f} s", flush=True)
        if args.only in ("both", "inprocess"):
            t0 = time.time()
            b = run_in_process(cfg, warmup, device, sampler, count_costs=warmup >= 1)
            report["in_process"] = b.summary
            report["in_process"]["run_wall_s"] = time.time() - t0
            print(f"(b) one process: {b.summary['masks_per_s']:.1f} masks/s, {b.summary['iteration_s']:.3f} "
                  f"s/iteration, run {report['in_process']['run_wall_s']:.0f} s", flush=True)
            train_image = load_states(cfg.data.datasets, cfg.data.train_split, cfg.data.image_size, 1)[0].image
            report["device_rates"] = measure_device(device)
            report["per_sample_flops"] = per_sample_flops(cfg, device, train_image)
            report["floor"] = floor_report(b.costs, report["device_rates"], report["per_sample_flops"], cfg)
            if use_gpu:
                gc.collect()
                torch.cuda.empty_cache()
        if args.sweep and "ray" in report:
            report["sweep"] = sweep(args, cfg, config, report["ray"], warmup, sampler, started)
    finally:
        sampler.stop()

    a, b = report.get("ray"), report.get("in_process")
    report["ratio"] = a["masks_per_s"] / b["masks_per_s"] if a and b else None
    busy = ((a or {}).get("nvidia_smi") or {}).get("gpu_busy")
    report["targets"] = {
        "ratio": None if report["ratio"] is None else report["ratio"] >= TARGETS["ratio"],
        "reward_share": None if a is None else a["reward_share"] < TARGETS["reward_share"],
        "sync_s": None if a is None else a["sync_plus_export_s"] < TARGETS["sync_s"],
        "gpu_busy": None if busy is None else busy >= TARGETS["gpu_busy"]}
    report["seconds"] = time.time() - started
    if report.get("sweep"):
        report["sweep_plot"] = str(plot_sweep(report["sweep"], args.out / "sweep.png"))
    (args.out / "results.json").write_text(json.dumps(_clean(report), indent=2, default=str) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    import ray

    ray.shutdown()
    return 0


def sweep(args, cfg, config, main_run: dict, warmup: int, sampler, started: float) -> list[dict]:
    """(a) at each (rollout workers, K); the main run fills its own point. A point is skipped when the main run
    predicts it would end past the budget: its start-up plus its iterations at the main run's seconds per mask."""
    points = []
    per_mask = main_run["iteration_s"] / (cfg.data.images_per_iteration * cfg.rollout.samples_per_image)
    startup = main_run["startup_s"]  # until a sweep run measures one without Ray's start and DeepSpeed's op build
    for workers in (int(x) for x in args.sweep_workers.split(",")):
        for k in (int(x) for x in args.sweep_k.split(",")):
            point = {"rollout_workers": workers, "k": k}
            if workers == cfg.rollout.num_workers and k == cfg.rollout.samples_per_image:
                points.append({**point, **main_run})
                continue
            predicted = 1.2 * (startup + args.sweep_iterations * per_mask * cfg.data.images_per_iteration * k)
            if time.time() - started + predicted > args.budget_s:
                points.append({**point, "skipped": f"predicted {predicted:.0f} s would pass the budget"})
                continue
            run_cfg = variant(config(f"ray_w{workers}_k{k}", rollout_workers=workers, k=k),
                              iterations=args.sweep_iterations)
            result = run_ray_job(run_cfg, min(warmup, args.sweep_iterations - 1), sampler)
            result["predicted_s"] = predicted
            startup = result["startup_s"]
            print(f"sweep: {workers} rollout workers, K={k}: {result['masks_per_s']:.1f} masks/s "
                  f"(run {result['run_wall_s']:.0f} s, predicted {predicted:.0f} s)", flush=True)
            points.append({**point, **result})
    return points


if __name__ == "__main__":
    sys.exit(main())
