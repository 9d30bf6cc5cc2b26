"""Pictures of a run: reward and metric curves from metrics.jsonl, and before/after overlays with a legend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .run_metrics import read_metrics

__all__ = ["plot_run_curves", "read_metrics", "before_after_picture", "WARM_START_CURVE", "OUTCOME_COLOURS"]

#: A run folder's warm-start threshold curve on the validation images (written by the quickstart): a list of
#: {threshold, dice, recall, precision, ...}. When present, the curves picture draws the run against it.
WARM_START_CURVE = "warm_start_val_curve.json"
#: Overlay colours (``rl_seg.evaluate.overlay``) and what they mean.
OUTCOME_COLOURS = (((255, 255, 255), "found (true vessel)"), ((230, 30, 30), "missed (false negative)"),
                   ((40, 90, 255), "false vessel (false positive)"))


def plot_run_curves(run_path: Path, out: Path | None = None) -> Path:
    """Reward and sample/validation metrics per iteration, KL / clip fraction / entropy, and, when the run
    folder holds the warm start's validation threshold curve, precision against recall: that curve with the
    run's validation points on it (a point above the curve is a better model, not just another threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_path = Path(run_path)
    records = read_metrics(run_path)
    warm = json.loads((run_path / WARM_START_CURVE).read_text()) if (run_path / WARM_START_CURVE).is_file() \
        else None
    it = [r["iteration"] for r in records]
    fig, axes = plt.subplots(1, 3 if warm else 2, figsize=(15 if warm else 10, 4.2), dpi=110)
    ax, ax2 = axes[0], axes[1]
    for key, label in (("reward", "reward (sampled)"), ("reward/dice", "Dice (sampled)"),
                       ("reward/recall", "recall (sampled)"), ("reward/cldice", "clDice (sampled)")):
        if any(key in r for r in records):
            ax.plot(it, [r.get(key, float("nan")) for r in records], label=label)
    val = [(r["iteration"], r["val/dice"]) for r in records if "val/dice" in r]
    if val:
        ax.plot(*zip(*val), "o-", color="black", label="Dice (validation, 0.5)")
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("reward and metrics")
    for key in ("kl_ref", "clip_fraction", "entropy", "approx_kl"):
        if any(key in r for r in records):
            ax2.plot(it, [r.get(key, float("nan")) for r in records], label=key)
    ax2.set_xlabel("iteration")
    ax2.set_yscale("symlog", linthresh=1e-4)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_title("policy statistics")
    if warm:
        _precision_recall(axes[2], warm, [r for r in records if "val/recall" in r and "val/precision" in r])
    fig.tight_layout()
    out = Path(out) if out else run_path / "curves.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def _precision_recall(ax, warm: list[dict], val: list[dict]) -> None:
    pts = sorted(warm, key=lambda m: m["recall"])
    ax.plot([m["recall"] for m in pts], [m["precision"] for m in pts], "-", color="grey", lw=2,
            label="warm start, thresholds 0.05-0.95")
    for m in warm:  # a few threshold labels, so the curve reads as a threshold sweep
        if round(m["threshold"], 2) in (0.1, 0.3, 0.5, 0.7, 0.9):
            ax.annotate(f"{m['threshold']:g}", (m["recall"], m["precision"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color="grey")
    at_half = min(warm, key=lambda m: abs(m["threshold"] - 0.5))
    ax.plot(at_half["recall"], at_half["precision"], "s", color="grey", markersize=8,
            label="warm start at 0.5")
    if val:
        points = ax.scatter([r["val/recall"] for r in val], [r["val/precision"] for r in val],
                            c=[r["iteration"] for r in val], cmap="viridis", zorder=3, s=36,
                            label="PPO at 0.5, by iteration")
        last = val[-1]
        ax.plot(last["val/recall"], last["val/precision"], "*", color="crimson", markersize=14, zorder=4,
                label=f"PPO, iteration {last['iteration']}")
        ax.figure.colorbar(points, ax=ax, label="iteration", fraction=0.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("validation: PPO against the warm start's threshold curve", fontsize=10)


def before_after_picture(sample, before: np.ndarray, after: np.ndarray, run_size: int | None = None):
    """Two overlays of ``sample`` at its own size (before | after), titled with their Dice, over a legend of
    the colours. ``before``/``after`` are binary masks at the sample's size."""
    from PIL import Image, ImageDraw, ImageFont

    from rewards.metrics import MaskPair, Target

    from .evaluate import overlay

    h, w = sample.mask.shape
    gap, band, foot = 12, 64, 44
    font = ImageFont.load_default(size=20)
    small = ImageFont.load_default(size=17)
    canvas = Image.new("RGB", (2 * w + gap, h + band + foot), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    target = Target(sample.mask, sample.fov)
    for n, (title, pred) in enumerate((("before PPO (warm start)", before), ("after PPO", after))):
        x = n * (w + gap)
        canvas.paste(Image.fromarray(overlay(sample.image, pred, sample.mask, sample.fov)), (x, band))
        pair = MaskPair(pred, target)
        draw.text((x + 4, 6), title, fill=(0, 0, 0), font=font)
        draw.text((x + 4, 34), f"threshold 0.5   Dice {pair.dice():.3f}   recall {pair.recall():.3f}   "
                  f"precision {pair.precision():.3f}", fill=(60, 60, 60), font=small)
    x, y = 6, h + band + 12
    for colour, meaning in OUTCOME_COLOURS:
        draw.rectangle((x, y, x + 20, y + 20), fill=colour, outline=(0, 0, 0))
        draw.text((x + 28, y), meaning, fill=(0, 0, 0), font=small)
        x += 40 + int(draw.textlength(meaning, font=small))
    if run_size:
        draw.text((x + 10, y), f"{sample.id}, {w}x{h}; predicted at {run_size} px", fill=(90, 90, 90), font=small)
    return canvas
