"""Pictures of a run: reward and metric curves from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from .run_metrics import read_metrics

__all__ = ["plot_run_curves", "read_metrics"]


def plot_run_curves(run_path: Path, out: Path | None = None) -> Path:
    """Reward and sample/validation metrics per iteration (left), KL / clip fraction / entropy (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_path)
    it = [r["iteration"] for r in records]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
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
    fig.tight_layout()
    out = Path(out) if out else Path(run_path) / "curves.png"
    fig.savefig(out)
    plt.close(fig)
    return out
