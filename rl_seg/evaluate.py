"""Evaluation of a policy on a dataset: metrics from its logits, a threshold sweep, and overlay pictures.

The sweep works here because the policy returns logits (the original Sa2VA pipeline binarized inside
``predict_forward``, so its sweep could not move). Metrics use the same code and JSON keys as ``rl-seg score``.
Overlays colour the outcome on the image: true positives white, missed vessel red, false vessel blue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data import Sample, VesselDataset
from .policy.base import SegPolicy, autocast_for
from .score import DEFAULT_THRESHOLD, format_report, score_probabilities

__all__ = ["predict_probabilities", "evaluate_policy", "overlay", "write_overlays", "report_text"]


@torch.no_grad()
def predict_probabilities(policy: SegPolicy, samples: Iterable[Sample], progress: bool = False,
                          desc: str = "predicting") -> list[np.ndarray]:
    """Per-pixel vessel probabilities at each image's own resolution (one image per forward: sizes differ)."""
    was_training = policy.training
    policy.eval()
    device = policy.device
    probs = []
    samples = list(samples)
    try:
        for sample in tqdm(samples, desc=desc, unit="image", disable=not progress, leave=False):
            with autocast_for(device):
                logits = policy(policy.preprocess([sample.image])).logits.float()
            if logits.shape[-2:] != sample.mask.shape:  # a native-grid policy: upsampled the policy's own way
                logits = policy.upsample_logits(logits, sample.mask.shape)
            probs.append(torch.sigmoid(logits[0]).cpu().numpy())
    finally:
        policy.train(was_training)
    return probs


def evaluate_policy(policy: SegPolicy, dataset: VesselDataset, thresholds: Sequence[float] = (DEFAULT_THRESHOLD,),
                    overlays: Path | None = None, progress: bool = True) -> dict:
    probs = predict_probabilities(policy, dataset, progress=progress)
    items = list(zip(dataset, probs))
    report = score_probabilities(items, thresholds, progress=False)
    report.update({"dataset": dataset.name, "split": dataset.split, "num_images": len(dataset),
                   "policy": getattr(policy, "name_or_path", type(policy).__name__)})
    if overlays is not None:
        write_overlays(items, Path(overlays), DEFAULT_THRESHOLD)
        report["overlays"] = str(overlays)
    return report


def overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
    """RGB picture: the image dimmed to grey, true positives white, missed vessel red, false vessel blue."""
    grey = image.mean(axis=-1) if image.ndim == 3 else image.astype(float)
    out = np.repeat((0.45 * grey)[..., None], 3, axis=-1).astype(np.uint8)
    if fov is not None:
        pred, gt = pred & fov, gt & fov
    out[pred & gt] = (255, 255, 255)
    out[~pred & gt] = (230, 30, 30)
    out[pred & ~gt] = (40, 90, 255)
    return out


def write_overlays(items: Sequence[tuple[Sample, np.ndarray]], folder: Path, threshold: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample, prob in items:
        path = folder / f"{sample.id}.png"
        Image.fromarray(overlay(sample.image, prob > threshold, sample.mask, sample.fov)).save(path)
        paths.append(path)
    return paths


def report_text(report: dict) -> str:
    return format_report(report, per_image=report.get("num_images", 0) <= 30)

