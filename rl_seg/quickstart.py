"""`make quickstart`: PPO from the shipped default model, end to end, on this machine.

Two rollout actors, the CPU reward pool and two Ray Train learner workers with DeepSpeed train a LoRA adapter
on the shipped DRIVE + ARCADE sample at reduced resolution (``rl_seg/configs/quickstart.yaml``). It prints a
progress line per iteration and ends with a before/after table on held-back validation images, and the run
folder gets a reward/metric curve plot and before/after overlays.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards.composite import get_reward
from rewards.metrics import MaskPair, Target

from .config import load_config
from .evaluate import overlay
from .plots import plot_run_curves
from .policy import load_policy
from .policy.lora import load_adapter
from .ppo.config import TrainConfig
from .ppo.states import State, load_states
from .run_outcome import RunInterrupted, exit_now
from .train import run_training

CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
COLUMNS = ("reward", "dice", "recall", "precision", "cldice")


@torch.no_grad()
def evaluate_states(policy, states: list[State], reward) -> tuple[dict, list[np.ndarray]]:
    policy.eval()
    rows, preds = [], []
    for s in states:
        prob = torch.sigmoid(policy(policy.preprocess([s.image])).logits[0]).numpy()
        pred = prob > 0.5
        pair = MaskPair(pred, Target(s.gt, s.fov))
        rows.append({"reward": reward.score_pair(pair).total, **{m: getattr(pair, m)() for m in COLUMNS[1:]}})
        preds.append(pred)
    return {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS}, preds


def main(argv: list[str] | None = None) -> int:
    overrides = list(argv if argv is not None else sys.argv[1:])
    cfg = load_config(TrainConfig, CONFIG, [f"name=quickstart-{time.strftime('%Y%m%d-%H%M%S')}", *overrides])
    print(f"rl-seg quickstart: PPO on {', '.join(cfg.data.datasets)} at {cfg.data.image_size} px, "
          f"{cfg.iterations} iterations -> {cfg.run_path}\n", flush=True)
    val = load_states(cfg.data.datasets, cfg.data.val_split, cfg.data.image_size, cfg.data.val_limit)
    reward = get_reward(cfg.reward.weights or cfg.reward.preset)
    trust = cfg.policy.trust_remote_code
    before, before_preds = evaluate_states(load_policy(cfg.policy.name, trust_remote_code=trust), val, reward)

    try:
        summary = run_training(cfg)
    except RunInterrupted as exc:  # recorded in the run folder with the command that resumes it
        print(f"\nrl-seg quickstart: {exc}", file=sys.stderr)
        exit_now(exc.exit_code)

    tuned = load_adapter(load_policy(cfg.policy.name, trust_remote_code=trust), summary["final_adapter"])
    after, after_preds = evaluate_states(tuned, val, reward)
    curves = plot_run_curves(cfg.run_path)
    folder = cfg.run_path / "overlays"
    folder.mkdir(exist_ok=True)
    for s, b, a in zip(val, before_preds, after_preds):
        pair = np.concatenate([overlay(s.image, b, s.gt, s.fov), np.full((s.gt.shape[0], 4, 3), 255, np.uint8),
                               overlay(s.image, a, s.gt, s.fov)], axis=1)
        Image.fromarray(pair).save(folder / f"{s.id.replace('/', '_')}_before_after.png")

    print(f"\nheld-back validation images ({len(val)}), threshold 0.5, at {cfg.data.image_size} px:")
    print(f"{'':<8}" + "".join(f"{c:>11}" for c in COLUMNS))
    for label, m in (("before", before), ("after", after)):
        print(f"{label:<8}" + "".join(f"{m[c]:>11.4f}" for c in COLUMNS))
    print(f"{'change':<8}" + "".join(f"{after[c] - before[c]:>+11.4f}" for c in COLUMNS))
    print(f"\nrun folder: {cfg.run_path}\n  curves: {curves}\n  overlays (before | after; white found, red missed,"
          f" blue false): {folder}\n  adapter (PEFT format): {summary['final_adapter']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
