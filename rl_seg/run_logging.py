"""What a run writes as it goes: metrics.jsonl, TensorBoard scalars, Ray dashboard gauges, console lines.

The gauges use ``ray.util.metrics`` so that the Ray dashboard's metrics view (Prometheus/Grafana set up by Ray)
shows the run: reward, Dice, recall, KL, masks/s, phase times and the adapter version.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .console import show
from .run_metrics import supersede

__all__ = ["RunLogger", "GAUGES", "progress_lines"]

#: Metric key -> (gauge name, description). Phase times share one gauge with a "phase" tag.
GAUGES = {
    "reward": ("rl_seg_reward", "mean reward of the iteration's sampled masks"),
    "reward/dice": ("rl_seg_sample_dice", "mean Dice of the sampled masks"),
    "reward/recall": ("rl_seg_sample_recall", "mean recall of the sampled masks"),
    "kl_ref": ("rl_seg_kl_ref", "KL(pi || pi_ref) per pixel"),
    "masks_per_s": ("rl_seg_masks_per_s", "masks sampled and scored per second"),
    "adapter_version": ("rl_seg_adapter_version", "LoRA adapter version held by the learner"),
    "val/dice": ("rl_seg_val_dice", "validation Dice at threshold 0.5"),
}
PHASES = ("rollout", "reward", "learn", "sync", "export", "iteration")


class RunLogger:
    def __init__(self, run_path: Path, enable_gauges: bool = False, tensorboard: bool = True, progress: bool = True,
                 iterations: int | None = None, resume_at: int | None = None):
        """``resume_at``: the iteration a restarted learner group continues after; what was logged for later
        iterations is superseded (rl_seg.run_metrics), in metrics.jsonl and, by its purge step, in TensorBoard."""
        self.run_path = Path(run_path)
        self.run_path.mkdir(parents=True, exist_ok=True)
        if resume_at is not None:
            supersede(self.run_path, resume_at)
        self._jsonl = (self.run_path / "metrics.jsonl").open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_path / "tensorboard"),
                                     purge_step=None if resume_at is None else resume_at + 1)
        self._gauges = self._make_gauges(self.run_path.name) if enable_gauges else None
        self.progress = progress
        self.iterations = iterations
        self._start = time.time()

    @staticmethod
    def _make_gauges(run: str):
        from ray.util.metrics import Gauge

        # The run tag tells concurrent runs (Tune trials) apart on one dashboard panel.
        gauges = {key: Gauge(name, description=desc, tag_keys=("run",)) for key, (name, desc) in GAUGES.items()}
        gauges["time"] = Gauge("rl_seg_phase_seconds", description="seconds per phase of the last iteration",
                               tag_keys=("run", "phase"))
        for gauge in gauges.values():
            gauge.set_default_tags({"run": run})
        return gauges

    def log(self, metrics: dict) -> None:
        record = {"time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record, default=float) + "\n")
        self._jsonl.flush()
        step = int(metrics.get("iteration", 0))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
                if self._gauges is not None:
                    if key in self._gauges:
                        self._gauges[key].set(value)
                    elif key.startswith("time/") and key[5:] in PHASES:
                        self._gauges["time"].set(value, tags={"phase": key[5:]})
        if self._tb is not None:
            self._tb.flush()
        if self.progress:
            for line in progress_lines(metrics, self.iterations):
                show(line)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def progress_lines(metrics: dict, iterations: int | None = None) -> list[str]:
    """The console's lines for one iteration: the key numbers, and the validation numbers when it validated."""
    def fmt(key, spec=".3f"):
        v = metrics.get(key)
        return "-" if v is None else format(v, spec)

    step = int(metrics.get("iteration", 0))
    head = f"[iter {step}/{iterations}]" if iterations else f"[iter {step}]"
    lines = [f"{head} reward {fmt('reward')}  dice {fmt('reward/dice')}  recall {fmt('reward/recall')}"
             f"  kl {fmt('kl_ref', '.4f')}  clip {fmt('clip_fraction')}  masks/s {fmt('masks_per_s', '.1f')}"
             f"  ({fmt('time/iteration', '.1f')} s)" + ("  COLLAPSED" if metrics.get("collapsed") else "")]
    if "val/dice" in metrics:
        lines.append(f"{head} validation at 0.5: dice {fmt('val/dice')}  recall {fmt('val/recall')}  "
                     f"precision {fmt('val/precision')}  clDice {fmt('val/cldice')}")
    return lines
