"""PPO on a Sa2VA checkpoint through the real job (Ray, Ray Train + DeepSpeed on gloo, the reward pool), with the
replica of the public remote code, as ``rl-seg train`` runs a user's folder: actions at the images' resolution,
finite losses, no collapse, an adapter in PEFT format at the end. Here the Qwen2 family; the InternLM2 family
goes through the same job, with the same checks, in test_hybrid_placement_on_ray (its colocated and hybrid runs)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from rl_seg.config import load_config
from rl_seg.ppo.config import TrainConfig
from rl_seg.train import run_training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sa2va_replica import build_replica  # noqa: E402

pytestmark = pytest.mark.ray


def test_two_ppo_iterations_on_a_qwen2_sa2va_folder(ray_local, tmp_path):
    family = "qwen2"
    folder = build_replica(tmp_path / f"sa2va_{family}", family=family)
    cfg = load_config(TrainConfig, None, [
        f"name=sa2va_{family}", f"run_dir={tmp_path / 'runs'}", f"policy.name={folder}",
        "policy.trust_remote_code=true", "policy.lora.targets=llm+decoder", "policy.lora.dropout=0.0",
        "iterations=2", "data.datasets=[drive-sample,arcade-sample]", "data.image_size=64",
        "data.images_per_iteration=2", "data.val_limit=1", "rollout.num_workers=1", "rollout.num_cpus=0.5",
        "rollout.samples_per_image=2", "reward.num_actors=1", "reward.num_cpus=0.25", "learner.num_workers=1",
        "learner.cpus_per_worker=0.5", "ppo.epochs=1", "ppo.warmup_steps=1", "checkpoint_every=2", "val_every=2",
        "progress=false"])
    summary = run_training(cfg)
    rows = [json.loads(line) for line in (cfg.run_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and summary["completed"] == 2
    for r in rows:
        for key in ("policy_loss", "reward", "entropy", "kl_ref"):
            assert key in r and math.isfinite(r[key]), (key, r.get(key))
        assert not r["collapsed"] and r["empty_mask_fraction"] < 1 and r["full_mask_fraction"] < 1
    assert math.isfinite(rows[-1]["val/dice"])
    adapter = json.loads((cfg.run_path / "final_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder)
    sample = json.loads((cfg.run_path / "samples" / "latest.json").read_text())
    assert sample["iteration"] == 2
