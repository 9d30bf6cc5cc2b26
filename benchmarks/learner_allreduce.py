"""Cost of the learner's gradient all-reduce (gloo, CPU, loopback) at 1, 2 and 4 ranks, against the ring model.

The message is what the learner synchronizes each optimizer step: the trainable parameters of the default
policy with the default LoRA settings plus the value head (counted from the real model), in fp32. ZeRO-2 moves
the same volume as one all-reduce (a reduce-scatter of the gradients, then an all-gather of the updated
weights). Around that size the message is also scaled by 1/16 .. 16 so that the ring model

    t(n, B) = 2 (n - 1) / n * B / bandwidth + 2 (n - 1) * latency

has more points than unknowns; bandwidth and latency are fitted by least squares over 1 < n <= cores (n = 1
moves no data, the model says 0 and the row shows gloo's fixed cost; a fit over every n > 1 is reported too).
Each point is the median over repetitions of the slowest rank's time. Then one full learner update (``learn``:
forward, backward, all-reduce, Adam) is timed at 1, 2 and 4 ranks on the tiny policy and the fixed batch of
tests/test_learner_allreduce_on_ray.py.

Ranks are torch.multiprocessing processes joined by gloo over 127.0.0.1 with one torch thread each; when ranks
outnumber cores they time-share, which the output states.

    python benchmarks/learner_allreduce.py [--reps 50] [--step-reps 5] [--no-learner-step] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the fixed batch and engine set-up are the test's, not copies

WORLDS = (1, 2, 4)
SCALES = (1 / 16, 1 / 4, 1, 4, 16)


def trainable_parameters() -> int:
    from rl_seg.policy import load_policy
    from rl_seg.policy.lora import LoraSettings, attach_lora
    from rl_seg.roles.learner import PPOModule

    policy = attach_lora(load_policy("default"), LoraSettings())
    module = PPOModule(policy, policy.get_base_model().hidden_size)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    # Loopback only: gloo otherwise picks the interface the host name resolves to.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _slowest(seconds: float) -> float:
    """The collective is done when its last rank is: the max over ranks (exchanged outside the timed region)."""
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _allreduce_worker(rank: int, world: int, port: int, numels: list[int], reps: int, out: str) -> None:
    _join(rank, world, port)
    stats = {}
    for numel in numels:
        x = torch.randn(numel, dtype=torch.float32)
        for _ in range(3):  # first calls set up gloo's buffers and pairs
            dist.all_reduce(x)
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(_slowest(time.perf_counter() - start))
        stats[numel] = {"median": statistics.median(times), "min": min(times)}
    if rank == 0:
        Path(out).write_text(json.dumps(stats))
    dist.destroy_process_group()


def _step_worker(rank: int, world: int, port: int, reps: int, policy: str, out: str) -> None:
    _join(rank, world, port)
    import test_learner_allreduce_on_ray as fixed

    from rl_seg.roles.learner import learn

    cfg = fixed.learner_config(policy, world)
    engine = fixed.build_engine(cfg)
    batch = fixed.fixed_batch()
    times = []
    for i in range(reps + 1):  # the first update pays one-time allocations
        dist.barrier()
        start = time.perf_counter()
        learn(engine, batch, cfg, rank, world, iteration=i)
        elapsed = _slowest(time.perf_counter() - start)
        if i:
            times.append(elapsed)
    if rank == 0:
        Path(out).write_text(json.dumps({"median_s": statistics.median(times), "all_s": times}))
    dist.destroy_process_group()


def _spawn(fn, world: int, *args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.json")
        mp.spawn(fn, args=(world, _free_port(), *args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def ring_terms(world: int, nbytes: float) -> tuple[float, float]:
    """Coefficients of (1 / bandwidth, latency) in the ring model."""
    return 2 * (world - 1) / world * nbytes, 2 * (world - 1)


def fit_ring(points: list[tuple[int, int, float]]) -> dict:
    """Least squares of t = a * bytes_term + b * hops over (world, bytes, seconds) with world > 1."""
    rows = [(ring_terms(w, b), t) for w, b, t in points if w > 1]
    a_mat = np.array([r for r, _ in rows])
    y = np.array([t for _, t in rows])
    (inv_bw, latency), *_ = np.linalg.lstsq(a_mat, y, rcond=None)
    pred = a_mat @ np.array([inv_bw, latency])
    rel = np.abs(pred - y) / y
    return {"bandwidth_GBps": float(1 / inv_bw / 1e9) if inv_bw > 0 else float("inf"),
            "latency_us": float(latency * 1e6), "inv_bandwidth_s_per_byte": float(inv_bw),
            "latency_s": float(latency), "points": len(rows),
            "max_relative_residual": float(rel.max()), "median_relative_residual": float(np.median(rel)),
            "r2": float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())}


def model_seconds(fit: dict, world: int, nbytes: float) -> float:
    bytes_term, hops = ring_terms(world, nbytes)
    return fit["inv_bandwidth_s_per_byte"] * bytes_term + fit["latency_s"] * hops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50, help="all-reduce repetitions per point (median)")
    parser.add_argument("--step-reps", type=int, default=5, help="timed learner updates per world size (median)")
    parser.add_argument("--no-learner-step", action="store_true", help="skip the full learner-update timing")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "learner_allreduce.json")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    params = trainable_parameters()
    nbytes = params * 4
    numels = sorted({max(1, round(params * s)) for s in SCALES})
    measured = {w: {int(k): v for k, v in _spawn(_allreduce_worker, w, numels, args.reps).items()} for w in WORLDS}
    fit = fit_ring([(w, n * 4, t["median"]) for w in WORLDS if w > 1 for n, t in measured[w].items()])
    # The same fit without the oversubscribed world sizes: what the wire costs when every rank has a core. The
    # table's model column uses it, so oversubscribed rows show their distance from that ideal; the fit over all
    # n > 1 lets latency absorb the time-sharing and is kept in the JSON.
    fit_fitting = fit_ring([(w, n * 4, t["median"]) for w in WORLDS if 1 < w <= cores
                            for n, t in measured[w].items()])

    rows = [{"world": w, "bytes": n * 4, "measured_ms": measured[w][n]["median"] * 1e3,
             "min_ms": measured[w][n]["min"] * 1e3,
             "model_ms": model_seconds(fit_fitting, w, n * 4) * 1e3,
             "model_ms_all_fit": model_seconds(fit, w, n * 4) * 1e3, "oversubscribed": w > cores}
            for w in WORLDS for n in numels]

    steps = {}
    if not args.no_learner_step:
        from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel

        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            policy = str(DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(Path(tmp) / "policy"))
            steps = {w: _spawn(_step_worker, w, args.step_reps, policy) for w in WORLDS}

    note = (f"this machine has {cores} CPU cores: {', '.join(str(w) for w in WORLDS if w > cores) or 'no'} "
            f"rank count(s) oversubscribe it, so those ranks time-share cores and their times include scheduling")
    result = {
        "date": date.today().isoformat(), "machine": {"cpus": cores, "platform": platform.platform(),
                                                      "torch": torch.__version__},
        "backend": "gloo over 127.0.0.1, one torch thread per rank", "dtype": "float32",
        "trainable_parameters": params, "gradient_bytes": nbytes, "reps": args.reps,
        # Other work on the machine inflates medians; the load average says how much there was.
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "note": note, "ring_fit": fit,
        "ring_fit_without_oversubscribed": fit_fitting, "allreduce": rows,
        "learner_step": {str(w): {"median_ms": s["median_s"] * 1e3, "all_ms": [x * 1e3 for x in s["all_s"]],
                                  "oversubscribed": w > cores}
                         for w, s in steps.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"gradient all-reduce of the default model's trainable parameters: {params:,} fp32 = {nbytes:,} bytes")
    print(f"ring fit over all n>1 ({fit['points']} points): bandwidth {fit['bandwidth_GBps']:.2f} GB/s, latency "
          f"{fit['latency_us']:.1f} us per hop, R^2 {fit['r2']:.3f}, median |residual| "
          f"{fit['median_relative_residual']:.0%}, max {fit['max_relative_residual']:.0%}")
    print(f"ring fit over 1 < n <= {cores} cores, used for the model column ({fit_fitting['points']} points): "
          f"bandwidth {fit_fitting['bandwidth_GBps']:.2f} GB/s, latency {fit_fitting['latency_us']:.1f} us per hop, "
          f"R^2 {fit_fitting['r2']:.3f}\n")
    print("| world size | bytes | measured ms | model ms |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        mark = " (oversubscribed)" if r["oversubscribed"] else ""
        size = f"**{r['bytes']:,}**" if r["bytes"] == nbytes else f"{r['bytes']:,}"
        print(f"| {r['world']}{mark} | {size} | {r['measured_ms']:.3f} | {r['model_ms']:.3f} |")
    if steps:
        print("\n| world size | learner update (learn(), tiny policy, 4 images x K=2) median ms |")
        print("|---:|---:|")
        for w, s in steps.items():
            print(f"| {w}{' (oversubscribed)' if w > cores else ''} | {s['median_s'] * 1e3:.1f} |")
    print(f"\nNote: {note}. Load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after: "
          "other processes share the cores, and medians include their interference (min_ms in the JSON).")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
