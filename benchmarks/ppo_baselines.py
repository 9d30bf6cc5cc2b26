"""Issue 4's comparison on the test splits: warm start vs its best threshold vs supervised continuation vs PPO.

    python benchmarks/ppo_baselines.py --results DIR [--out benchmarks/results/ppo]

DIR is what ``benchmarks/gpu_ppo_experiments.sh`` packed (run folders pixel/ group/ value/ recall/ with a
``final_adapter`` each, and ``sft_dice/best`` where (c) was run). For DRIVE test and ARCADE test it reports dice, recall,
precision, clDice and betti0_error at 0.5 for
  (a) the warm start, (b) the warm start at its best validation threshold (chosen on the val split),
  (c) the supervised soft-Dice continuation, (d) PPO with each advantage mode, (e) PPO with a recall-weighted reward,
and draws, per dataset, the warm start's test precision-recall sweep with (c)-(e) as points. A PPO point lies
"above the curve" when its precision beats the curve's (linearly interpolated) precision at its recall.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl_seg.data import load_dataset  # noqa: E402
from rl_seg.evaluate import predict_probabilities  # noqa: E402
from rl_seg.policy import load_policy  # noqa: E402
from rl_seg.policy.lora import load_adapter  # noqa: E402
from rl_seg.score import (SWEEP, best_threshold, interp_precision, precision_above_curve,  # noqa: E402
                           score_probabilities, threshold_curve)

KEYS = ("dice", "recall", "precision", "cldice", "betti0_error")


#: Labels of the run folders that benchmarks/gpu_ppo_experiments.sh writes; any other run folder with a
#: final_adapter is reported as "(d) PPO, <folder>".
RUN_LABELS = {"pixel": "(d) PPO, pixel advantage", "group": "(d) PPO, group advantage",
              "value": "(d) PPO, value advantage", "recall": "(e) PPO, recall-weighted reward",
              "topology": "(d) PPO, topology advantage"}


def policies(results: Path) -> dict[str, tuple[str, Path | None]]:
    out = {"(a) warm start": ("default", None)}
    if (results / "sft_dice" / "best").is_dir():  # absent where the runs outlast one call (EXPERIMENT=long)
        out["(c) supervised soft-Dice continuation"] = (str(results / "sft_dice" / "best"), None)
    runs = [p.parent.name for p in results.glob("*/final_adapter")]
    known = list(RUN_LABELS)
    for name in sorted(runs, key=lambda n: (n not in RUN_LABELS, known.index(n) if n in RUN_LABELS else 0, n)):
        out[RUN_LABELS.get(name, f"(d) PPO, {name}")] = ("default", results / name / "final_adapter")
    return out


def probabilities(spec: tuple[str, Path | None], dataset) -> list[np.ndarray]:
    policy = load_policy(spec[0])
    if spec[1] is not None:
        policy = load_adapter(policy, spec[1])
    return predict_probabilities(policy, dataset, progress=False)


def curve_gap(run: list[tuple[float, float]], warm: list[tuple[float, float]], points: int = 50) -> float:
    """Mean of (run's precision - warm start's precision) at equal recall, over the recall range both curves
    cover: a whole-curve comparison, so no threshold is chosen on the test set."""
    lo = max(min(r for r, _ in run), min(r for r, _ in warm))
    hi = min(max(r for r, _ in run), max(r for r, _ in warm))
    if hi <= lo:
        return float("nan")
    grid = np.linspace(lo, hi, points)
    return float(np.mean([interp_precision(run, r) - interp_precision(warm, r) for r in grid]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ppo"))
    parser.add_argument("--warm-threshold", action="append", default=[], metavar="DATA=T",
                        help="(b)'s threshold for a dataset, as an earlier run of this script chose it on the val "
                             "split (skips that sweep, e.g. where the val images are not at hand)")
    parser.add_argument("--datasets", default="drive,arcade", help="comma-separated datasets to evaluate")
    parser.add_argument("--sweep-runs", action="store_true",
                        help="sweep every run's threshold too, and compare whole curves: the mean precision gap to "
                             "the warm start's curve over the recall range both cover (no threshold picked on test)")
    args = parser.parse_args()
    given = {}
    for item in args.warm_threshold:
        data, sep, value = item.partition("=")
        try:
            given[data] = float(value) if sep and data else None
        except ValueError:
            given[data] = None
        if given[data] is None or round(given[data], 2) not in SWEEP:
            parser.error(f"--warm-threshold {item!r}: expected DATA=T with T one of the sweep's thresholds "
                         f"({SWEEP[0]}, {SWEEP[1]}, ..., {SWEEP[-1]})")
    args.out.mkdir(parents=True, exist_ok=True)
    specs = policies(args.results)
    report = {}
    for data in args.datasets.split(","):
        test = load_dataset(data, "test")
        rows = {}
        if data in given:
            best_t = str(round(given[data], 2))
        else:
            val = load_dataset(data, "val")
            warm_val = score_probabilities(list(zip(val, probabilities(specs["(a) warm start"], val))), SWEEP, False)
            best_t = best_threshold(warm_val)
        for label, spec in specs.items():
            probs = probabilities(spec, test)
            sweep = SWEEP if label == "(a) warm start" or args.sweep_runs else [0.5]
            scored = score_probabilities(list(zip(test, probs)), sweep, False)
            rows[label] = {k: scored["mean"][k] for k in KEYS}
            if args.sweep_runs:
                rows[label]["sweep"] = threshold_curve(scored)
            if label == "(a) warm start":
                rows["(b) warm start at best val threshold " + best_t] = {
                    k: scored["thresholds"][best_t][k] for k in KEYS}
                curve = threshold_curve(scored)
                report[f"{data}_warm_sweep"] = scored["thresholds"]
            print(f"{data} {label}: " + " ".join(f"{k} {rows[label][k]:.4f}" for k in KEYS), flush=True)
        for label, m in rows.items():
            m["precision_above_curve"] = precision_above_curve(curve, m["recall"], m["precision"])
            if "sweep" in m:
                m["curve_gap"] = curve_gap(m["sweep"], curve)
        report[data] = rows
        draw(data, curve, rows, args.out / f"pr_{data}.png")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


def draw(data: str, curve, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    rs, ps = zip(*sorted(curve))
    ax.plot(rs, ps, "-", color="grey", label="warm start, threshold sweep 0.05-0.95")
    markers = iter("osD^v<>p*h")
    for label, m in rows.items():
        line, = ax.plot(m["recall"], m["precision"], next(markers), label=label, markersize=7)
        if "sweep" in m:
            r, p = zip(*sorted(m["sweep"]))
            ax.plot(r, p, "-", lw=0.8, alpha=0.6, color=line.get_color())
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{data.upper()} test: operating points vs the warm start's sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = []
    for data in [d for d in ("drive", "arcade") if d in report]:
        swept = any("curve_gap" in m for m in report[data].values())
        lines += [f"\n{data.upper()} test", "",
                  "| run | Dice | recall | precision | clDice | betti0_error | precision above the sweep at equal recall |"
                  + (" mean precision gap of its own sweep to the warm start's |" if swept else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if swept else "")]
        for label, m in report[data].items():
            gap = f" {m['curve_gap']:+.4f} |" if "curve_gap" in m else (" - |" if swept else "")
            lines.append(f"| {label} | {m['dice']:.4f} | {m['recall']:.4f} | {m['precision']:.4f} | {m['cldice']:.4f} "
                         f"| {m['betti0_error']:.4f} | {m['precision_above_curve']:+.4f} |{gap}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
