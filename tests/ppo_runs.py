"""Configs of the tiny PPO runs the Ray tests start, readers of what a run wrote, and their processes."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from rl_seg.config import load_config
from rl_seg.ppo.config import TrainConfig


def overrides(run_dir, policy, name, *extra) -> list[str]:
    """The tiny policy at 48 px: two rollout actors, two reward actors, two learner ranks; ``extra`` wins."""
    return [f"name={name}", f"run_dir={run_dir}", f"policy.name={policy}", "iterations=2", "seed=3",
            "data.datasets=[drive-sample,arcade-sample]", "data.image_size=48", "data.images_per_iteration=4",
            "data.val_limit=1", "rollout.num_workers=2", "rollout.num_cpus=0.25", "rollout.samples_per_image=3",
            "reward.num_actors=2", "reward.num_cpus=0.25", "learner.num_workers=2", "learner.cpus_per_worker=0.5",
            "ppo.lr=5e-3", "ppo.warmup_steps=1", "policy.lora.dropout=0.0", "checkpoint_every=1", "val_every=1",
            "progress=false", *extra]


def config(run_dir, policy, name, *extra) -> TrainConfig:
    return load_config(TrainConfig, None, overrides(run_dir, policy, name, *extra))


#: The run other runs are compared with (conftest's ``colocated_run``): two learner ranks fed by one rollout actor,
#: augmented views (a resumed or hybrid run must draw the same), checkpoints at 2 and 4, FLOPs counted.
COMPARED = ("iterations=4", "checkpoint_every=2", "data.augment=true", "learner.count_flops=true",
            "rollout.num_workers=1", "reward.num_actors=1")


def records(run_path) -> list[dict]:
    return [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]


def lora_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def ray_process_pid(name: str, root: int | None = None) -> int:
    """The pid of a live ``ray::<name>`` process below ``root`` (default: this process, whose descendants are the
    test session's Ray instance): quicker than Ray's state API, which a loaded machine can keep waiting seconds."""
    import psutil

    for child in psutil.Process(root).children(recursive=True):
        try:
            if child.cmdline()[:1] and child.cmdline()[0].startswith(f"ray::{name}"):
                return child.pid
        except psutil.Error:
            continue
    raise LookupError(f"no live ray::{name} process")
