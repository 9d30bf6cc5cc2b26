"""How sure is "above the warm start's curve"? A paired bootstrap over test images.

    python benchmarks/curve_bootstrap.py --adapter RUN/final_adapter [--adapter ...] [--datasets drive,arcade]

For each dataset's test split it scores the warm start at every threshold of the sweep and each adapted policy at
0.5 (recall and precision per image: the count terms only, so it takes a minute, not the sweep of
``ppo_baselines.py``), then resamples the test images with replacement (the same images for the warm start and
the run) and recomputes, per resample, the run's mean precision minus the warm start's curve interpolated at the
run's mean recall - the "precision above the sweep at equal recall" of ``ppo_baselines.py``. It prints that gap
on the real test set and its 2.5 / 97.5 percentiles over the resamples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_baselines import probabilities  # noqa: E402
from rewards.metrics import METRICS, MaskPair, Target  # noqa: E402
from rl_seg.data import load_dataset  # noqa: E402
from rl_seg.score import SWEEP, precision_above_curve  # noqa: E402


def recall_precision(dataset, probs: list[np.ndarray], thresholds) -> np.ndarray:
    """images x thresholds x (recall, precision)."""
    out = np.empty((len(probs), len(thresholds), 2))
    for i, (sample, prob) in enumerate(zip(dataset, probs)):
        target = Target(sample.mask, sample.fov)
        for j, t in enumerate(thresholds):
            pair = MaskPair(prob > t, target)
            out[i, j] = METRICS["recall"](pair), METRICS["precision"](pair)
    return out


def gap(warm: np.ndarray, run: np.ndarray, rows: np.ndarray) -> float:
    curve = [tuple(v) for v in warm[rows].mean(axis=0)]
    recall, precision = run[rows].mean(axis=0)
    return precision_above_curve(curve, recall, precision)


def bootstrap_gap(warm: np.ndarray, run: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """The run's precision above the warm start's curve on all images, and its 95% paired-bootstrap interval.
    ``warm``: images x thresholds x (recall, precision) of the warm start over ``SWEEP``; ``run``: images x
    (recall, precision) of the run at 0.5."""
    rng = np.random.default_rng(seed)
    n = len(run)
    boot = np.array([gap(warm, run, rng.integers(0, n, n)) for _ in range(resamples)])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"gap": gap(warm, run, np.arange(n)), "ci95": [float(lo), float(hi)], "images": n,
            "resamples": resamples, "seed": seed, "share_above_0.01": float((boot >= 0.01).mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", action="append", type=Path, required=True, help="a run's PEFT adapter folder")
    parser.add_argument("--datasets", default="drive,arcade")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    for adapter in args.adapter:
        if not (adapter / "adapter_config.json").is_file():
            parser.error(f"--adapter {adapter}: no adapter_config.json there")
    results = {}
    for data in args.datasets.split(","):
        test = load_dataset(data, "test")
        warm = recall_precision(test, probabilities(("default", None), test), SWEEP)
        for adapter in args.adapter:
            run = recall_precision(test, probabilities(("default", adapter), test), [0.5])[:, 0]
            name = f"{data} {adapter.parent}"  # the run folder: runs of different calls share names
            results[name] = r = bootstrap_gap(warm, run, args.resamples, args.seed)
            print(f"{name}: precision above the curve {r['gap']:+.4f}, 95% bootstrap interval "
                  f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}], resamples >= +0.01: {r['share_above_0.01']:.0%}",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
