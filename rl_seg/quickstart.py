"""`make quickstart`: PPO from the shipped default model, end to end, on this machine.

Two rollout actors, the CPU reward pool and two Ray Train learner workers with DeepSpeed train a LoRA adapter
on the shipped DRIVE + ARCADE sample at reduced resolution (``rl_seg/configs/quickstart.yaml``). It prints a
line per iteration and ends with a table on the held-back validation images: the warm start at threshold 0.5
and at its best threshold, the PPO model at 0.5, and how far the PPO model lies above the warm start's
threshold curve at equal recall (moving a threshold slides a model along that curve; only a changed model
gets above it). The run folder gets the curves (with that precision-recall picture) and before/after overlays
at the images' own size.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import load_config
from .console import LOG_DIR, configure_cli_logging, driver_session
from .data import Sample, load_dataset
from .evaluate import predict_probabilities
from .plots import WARM_START_CURVE, before_after_picture, plot_run_curves
from .policy import load_policy
from .policy.lora import load_adapter
from .ppo.config import TrainConfig
from .ppo.states import load_states
from .run_outcome import RunInterrupted, exit_now
from .score import SWEEP, best_threshold, precision_above_curve, score_probabilities, threshold_curve
from .train import run_training

CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
COLUMNS = ("dice", "recall", "precision", "cldice")


def validation_images(cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """The validation images as the run sees them (resized to ``data.image_size``, as the coordinator
    validates) and at their own size, in the same order."""
    states = load_states(cfg.data.datasets, cfg.data.val_split, cfg.data.image_size, cfg.data.val_limit)
    native = [s for name in cfg.data.datasets
              for s in load_dataset(name, cfg.data.val_split, limit=cfg.data.val_limit)]
    run_size = [Sample(s.id, s.image, s.gt, s.fov, n.image_path, n.mask_path) for s, n in zip(states, native)]
    return run_size, native


def native_size_masks(policy, run_size: list[Sample], native: list[Sample]) -> list[np.ndarray]:
    """The policy's masks (at 0.5) from the run-size images, at each image's own size: predict_probabilities
    upsamples the logits to the size of the sample's mask (bilinear, as Sa2VA upsamples its decoder's)."""
    mixed = [Sample(n.id, r.image, n.mask, n.fov, n.image_path, n.mask_path) for r, n in zip(run_size, native)]
    return [p > 0.5 for p in predict_probabilities(policy, mixed)]


def main(argv: list[str] | None = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    verbose = any(a in ("-v", "--verbose") for a in args)
    overrides = [a for a in args if a not in ("-v", "--verbose")]
    configure_cli_logging(verbose)
    cfg = load_config(TrainConfig, CONFIG, [f"name=quickstart-{time.strftime('%Y%m%d-%H%M%S')}", *overrides])
    print(f"rl-seg quickstart: PPO on {', '.join(cfg.data.datasets)} at {cfg.data.image_size} px, "
          f"{cfg.iterations} iterations -> {cfg.run_path}", flush=True)
    try:
        # The run folder's driver.log also takes what the evaluation around the job logs (library warnings).
        with driver_session(cfg.run_path / LOG_DIR):
            return _quickstart(cfg)
    except RunInterrupted as exc:  # recorded in the run folder with the command that resumes it
        print(f"\nrl-seg quickstart: {exc}", file=sys.stderr)
        exit_now(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - one line on the console, the traceback in the run's logs
        from .cli import report_job_error

        return report_job_error("rl-seg quickstart", exc)


def _quickstart(cfg: TrainConfig) -> int:
    val, val_native = validation_images(cfg)
    trust = cfg.policy.trust_remote_code
    warm = load_policy(cfg.policy.name, trust_remote_code=trust)
    before = score_probabilities(list(zip(val, predict_probabilities(warm, val))), SWEEP, progress=False)
    summary = run_training(cfg)
    tuned = load_adapter(load_policy(cfg.policy.name, trust_remote_code=trust), summary["final_adapter"])
    after = score_probabilities(list(zip(val, predict_probabilities(tuned, val))), [0.5], progress=False)
    (cfg.run_path / WARM_START_CURVE).write_text(json.dumps(
        [{"threshold": float(t), **m} for t, m in before["thresholds"].items()], indent=1) + "\n")
    curves = plot_run_curves(cfg.run_path)

    folder = cfg.run_path / "overlays"
    folder.mkdir(exist_ok=True)
    for sample, b, a in zip(val_native, native_size_masks(warm, val, val_native),
                            native_size_masks(tuned, val, val_native)):
        before_after_picture(sample, b, a, run_size=cfg.data.image_size).save(
            folder / f"{sample.id}_before_after.png")

    print(table(before, after, len(val), cfg))
    print(f"\nrun folder: {cfg.run_path}\n  curves (with the precision-recall picture): {curves}\n"
          f"  overlays at the images' own size (before | after): {folder}\n"
          f"  adapter (PEFT format): {summary['final_adapter']}\n  logs (workers, Ray): {cfg.run_path / 'logs'}")
    return 0


def table(before: dict, after: dict, images: int, cfg: TrainConfig) -> str:
    best = best_threshold(before)
    rows = [("before PPO, threshold 0.5", before["thresholds"]["0.5"]),
            (f"before PPO, threshold {best} (its best)", before["thresholds"][best]),
            ("after PPO, threshold 0.5", after["mean"])]
    above = precision_above_curve(threshold_curve(before), after["mean"]["recall"], after["mean"]["precision"])
    lines = [f"\n{images} held-back validation images ({', '.join(cfg.data.datasets)}) at {cfg.data.image_size} "
             "px, inside the FOV; 'its best': the warm start's best Dice over thresholds 0.05-0.95 on these images",
             f"{'':<38}" + "".join(f"{c:>10}" for c in COLUMNS)]
    lines += [f"{label:<38}" + "".join(f"{m[c]:>10.4f}" for c in COLUMNS) for label, m in rows]
    lines.append(f"after PPO, precision above the warm start's threshold curve at equal recall: {above:+.4f}")
    lines.append("  (above 0: PPO changed the model beyond what a threshold can do; at or below 0: it mostly "
                 "moved along the curve)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
