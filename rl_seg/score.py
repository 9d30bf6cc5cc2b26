"""Scoring saved predictions against a dataset: the original threshold experiment as a tool.

A user points ``rl-seg score`` at a folder of any model's outputs (binary masks, or probability maps as 8/16-bit
PNG/GIF/TIFF or ``.npy``) and gets per-image and mean metrics inside the FOV, at 0.5 and over a threshold sweep.
A sweep over binary masks changes nothing, which is exactly what the original Sa2VA experiment ran into; the
report says so instead of leaving the reader to notice identical rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from rewards.metrics import METRICS, MaskPair, Target

from .data import DataError, Sample, VesselDataset, decode_image

__all__ = ["PREDICTION_SUFFIXES", "read_prediction", "match_predictions", "score_predictions", "format_report",
           "summarize", "MEAN_KEYS", "SWEEP", "best_threshold", "threshold_curve", "interp_precision",
           "precision_above_curve"]

PREDICTION_SUFFIXES = (".png", ".gif", ".tif", ".tiff", ".npy", ".jpg", ".jpeg", ".ppm", ".pgm")
#: Metrics averaged in every report's "mean"; betti0_error and length_ratio are kept per image as well.
MEAN_KEYS = tuple(METRICS)
DEFAULT_THRESHOLD = 0.5
#: The threshold sweep behind every "best threshold" and "threshold curve" the project reports.
SWEEP = [round(t, 2) for t in np.arange(0.05, 0.96, 0.05)]


def read_prediction(path: Path) -> np.ndarray:
    """A prediction file as float32 probabilities in [0, 1] (binary files become exactly 0 and 1)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        if not path.is_file() or path.stat().st_size == 0:
            raise DataError(f"prediction {path} is missing or empty", path)
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the file's name
            raise DataError(f"prediction {path} cannot be read as .npy: {exc}", path) from exc
    else:
        # Palette files (DRIVE's GIFs) are read as indices: for a mask, the index is the label.
        _, _, array = decode_image(path, "prediction", apply_palette=False)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and path.suffix.lower() != ".npy":
        rgb = array[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"{path}: prediction is a colour image; expected one channel of probabilities")
        array = rgb[..., 0]
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-D prediction, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        top = int(array.max()) if array.size else 0
        if top <= 1:  # a 0/1 label map, not a probability scaled to the dtype
            return array.astype(np.float32)
        if array.dtype.itemsize > 2 or array.min() < 0:
            raise DataError(f"{path}: integer prediction of dtype {array.dtype}; expected 8- or 16-bit unsigned")
        return (array / float(np.iinfo(array.dtype).max)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{path}: prediction holds NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0 or hi > 1:
            raise DataError(f"{path}: probabilities must lie in [0, 1], found [{lo:.3g}, {hi:.3g}] "
                            "(logits? apply a sigmoid first)")
        return array.astype(np.float32)
    raise DataError(f"{path}: unsupported prediction dtype {array.dtype}")


def match_predictions(pred_dir: Path, ids: Sequence[str]) -> dict[str, Path]:
    """Map each sample id to its prediction file: stem == id, or stem starting with ``id + '_'``.

    Every sample must have exactly one prediction; all missing or ambiguous ones are named in one error.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder does not exist")
    files = sorted(p for p in pred_dir.iterdir() if p.is_file() and p.suffix.lower() in PREDICTION_SUFFIXES)
    matches, problems = {}, []
    for sample_id in ids:
        found = [p for p in files if p.stem == sample_id or p.stem.startswith(sample_id + "_")]
        if not found:
            problems.append(f"no prediction for sample {sample_id!r} (expected {sample_id}.<ext> or "
                            f"{sample_id}_*.<ext>)")
        elif len(found) > 1:
            problems.append(f"several predictions for sample {sample_id!r}: {', '.join(p.name for p in found)}")
        else:
            matches[sample_id] = found[0]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(f"{pred_dir}: {shown}")
    return matches


def summarize(rows: Iterable[dict], keys: Sequence[str] = MEAN_KEYS) -> dict[str, float]:
    rows = list(rows)
    return {k: float(np.mean([r[k] for r in rows])) if rows else math.nan for k in keys}


def score_probabilities(items: Sequence[tuple[Sample, np.ndarray]], thresholds: Sequence[float],
                        progress: bool = True) -> dict:
    """Metrics of probability maps against their samples at 0.5 and at each threshold (the report's body)."""
    thresholds = sorted({float(t) for t in thresholds} | {DEFAULT_THRESHOLD})
    for t in thresholds:
        if not 0.0 <= t < 1.0:
            raise ValueError(f"threshold {t} outside [0, 1)")
    per_threshold: dict[float, list[dict]] = {t: [] for t in thresholds}
    binary = True
    for sample, prob in tqdm(items, desc="scoring", unit="image", disable=not progress, leave=False):
        if prob.shape != sample.mask.shape:
            raise DataError(f"prediction for sample {sample.id!r} has shape {prob.shape}, but its mask "
                            f"{sample.mask_path} has shape {sample.mask.shape}")
        binary &= bool(np.isin(prob, (0.0, 1.0)).all())
        target = Target(sample.mask, sample.fov)
        for t in thresholds:
            pair = MaskPair(prob > t, target)
            per_threshold[t].append({"id": sample.id, **{k: fn(pair) for k, fn in METRICS.items()}})
    return {
        "threshold": DEFAULT_THRESHOLD,
        "mean": summarize(per_threshold[DEFAULT_THRESHOLD]),
        "per_image": per_threshold[DEFAULT_THRESHOLD],
        "thresholds": {f"{t:g}": summarize(rows) for t, rows in per_threshold.items()},
        "binary_predictions": binary,
    }


def best_threshold(report: dict, metric: str = "dice") -> str:
    """The sweep threshold (a key of ``report["thresholds"]``) with the best mean ``metric``; pick it on
    validation images, then report test images at it."""
    return max(report["thresholds"], key=lambda t: report["thresholds"][t][metric])


def threshold_curve(report: dict) -> list[tuple[float, float]]:
    """(recall, precision) of a report's mean at each threshold of its sweep: its threshold curve."""
    return [(m["recall"], m["precision"]) for m in report["thresholds"].values()]


def interp_precision(curve: Sequence[tuple[float, float]], recall: float) -> float:
    """The curve's precision at ``recall``, linearly interpolated between its points (held at its ends)."""
    pts = sorted(curve)
    return float(np.interp(recall, [r for r, _ in pts], [p for _, p in pts]))


def precision_above_curve(curve: Sequence[tuple[float, float]], recall: float, precision: float) -> float:
    """How far an operating point lies above a threshold curve at equal recall. Moving a threshold slides a
    model along its curve; only a changed model gets above it, so this is what RL has to beat."""
    return precision - interp_precision(curve, recall)


def score_predictions(pred_dir: Path, dataset: VesselDataset, thresholds: Sequence[float] = (DEFAULT_THRESHOLD,),
                      progress: bool = True) -> dict:
    """Score a folder of saved predictions against ``dataset``; see :func:`format_report` for the table."""
    paths = match_predictions(pred_dir, dataset.ids())
    items = [(sample, read_prediction(paths[sample.id])) for sample in dataset]
    report = score_probabilities(items, thresholds, progress)
    for row in report["per_image"]:
        row["prediction"] = str(paths[row["id"]])
    return {"pred_dir": str(pred_dir), "dataset": dataset.name, "split": dataset.split,
            "num_images": len(dataset), **report}


def format_report(report: dict, per_image: bool = True) -> str:
    """The report as plain-text tables: per image and mean at 0.5, then the threshold sweep."""
    cols = list(MEAN_KEYS)
    head = f"{'image':<14}" + "".join(f"{c:>13}" for c in cols)
    lines = [f"{report.get('dataset', '')} / {report.get('split', '')}: {report.get('num_images', '')} images, "
             f"threshold {report['threshold']:g}", head, "-" * len(head)]
    if per_image:
        lines += [f"{r['id']:<14}" + "".join(f"{r[c]:>13.4f}" for c in cols) for r in report["per_image"]]
        lines.append("-" * len(head))
    lines.append(f"{'mean':<14}" + "".join(f"{report['mean'][c]:>13.4f}" for c in cols))
    if len(report["thresholds"]) > 1:
        lines += ["", "threshold sweep (means)", f"{'threshold':<14}" + "".join(f"{c:>13}" for c in cols)]
        lines += [f"{t:<14}" + "".join(f"{m[c]:>13.4f}" for c in cols) for t, m in report["thresholds"].items()]
        if report.get("binary_predictions"):
            lines.append("note: the predictions are binary, so no threshold can change them "
                         "(score probability maps or logits to make the sweep meaningful)")
    return "\n".join(lines)


def plot_sweep(report: dict, path: Path) -> Path:
    """Dice, recall and precision against the threshold, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [float(t) for t in report["thresholds"]]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for key in ("dice", "recall", "precision", "cldice"):
        ax.plot(ts, [m[key] for m in report["thresholds"].values()], marker="o", label=key)
    ax.set_xlabel("threshold")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{report.get('dataset', '')} {report.get('split', '')}: threshold sweep")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(report: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
