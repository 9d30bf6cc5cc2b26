"""Reward throughput: masks/s in one process vs the Ray reward pool with 1..N actors.

Targets (issue 2): the default reward at >= 100 masks/s per core; pool scaling >= 0.8 x N up to the core count.

Masks are the shipped sample's ground truths (DRIVE 584x565 inside its FOV, ARCADE 512x512) perturbed the way a
sampled policy mask differs from the truth: 15% of vessel pixels dropped, 0.5% of background pixels switched on.
As in training, K masks are scored against each ground truth, so a target's skeleton is computed once per K.

    python benchmarks/reward_throughput.py [--masks 256] [--k 8] [--max-actors N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.composite import get_reward  # noqa: E402
from rewards.scoring import score_in_process  # noqa: E402
from rl_seg.data import load_dataset  # noqa: E402


def perturbed_masks(dataset: str, n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = [s for split in ("train", "val", "test") for s in load_dataset(dataset, split)]
    targets = {s.id: (s.mask, s.fov) for s in samples}
    items = []
    for i in range(n):
        s = samples[(i // k) % len(samples)]
        pred = (s.mask & (rng.random(s.mask.shape) > 0.15)) | (rng.random(s.mask.shape) < 0.005)
        items.append((s.id, pred))
    return targets, items, samples[0].mask.shape


def rate_in_process(reward, targets, items, repeats=2) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        out = score_in_process(reward, items, targets)
        best = max(best, len(items) / (time.perf_counter() - start))
        assert all(o.ok for o in out), [o.error for o in out if not o.ok][:3]
    return best


def rate_pool(reward, targets, items, actors: int, repeats=2) -> float:
    from rewards.pool import RewardPool

    with RewardPool(reward, num_actors=actors, num_cpus_per_actor=1, timeout_s=60) as pool:
        pool.add_targets(targets)
        pool.score(items[: actors * 8])  # warm-up: actor start, imports, target fetch
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            out = pool.score(items)
            best = max(best, len(items) / (time.perf_counter() - start))
            assert all(o.ok for o in out)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=256, help="masks scored per measurement")
    parser.add_argument("--k", type=int, default=8, help="masks per ground truth (the rollout's K)")
    parser.add_argument("--max-actors", type=int, default=os.cpu_count(), help="largest pool measured")
    parser.add_argument("--rewards", default="default,seed", help="reward presets to measure")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    from rl_seg.ray_env import init_ray

    init_ray(num_cpus=args.max_actors, log_to_driver=False)
    results = {"host": platform.node(), "cpus": os.cpu_count(), "date": date.today().isoformat(),
               "masks": args.masks, "k": args.k, "rows": []}
    for dataset in ("drive-sample", "arcade-sample"):
        targets, items, shape = perturbed_masks(dataset, args.masks, args.k)
        for preset in args.rewards.split(","):
            reward = get_reward(preset)
            single = rate_in_process(reward, targets, items)
            row = {"dataset": dataset, "shape": list(shape), "reward": preset, "in_process": single, "pool": {}}
            for n in range(1, args.max_actors + 1):
                row["pool"][n] = rate_pool(reward, targets, items, n)
            base = row["pool"][1]
            row["scaling"] = {n: r / (n * base) for n, r in row["pool"].items()}
            results["rows"].append(row)
            pools = "  ".join(f"{n} actor(s): {r:6.1f}/s (x{r / base:.2f})" for n, r in row["pool"].items())
            print(f"{dataset:14} {shape[0]}x{shape[1]} {preset:8} in-process {single:6.1f} masks/s   {pools}",
                  flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
