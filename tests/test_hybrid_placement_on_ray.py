"""placement=hybrid on the real stack (Ray, Ray Train + DeepSpeed on gloo, the CPU reward pool): the learner ranks
sample their own images with the weights they train; no rollout actor exists and no adapter is exported.

With the default tiny model and two ranks, hybrid must be the colocated run by other means: the same images, views,
masks and rewards, iteration after iteration (same seeds, and the old policy's logits it keeps are those the
colocated learner recomputes), and the same FLOPs split differently between rollout and learn, also across a stop
and a resume from the checkpoint. With a tiny Sa2VA replica (InternLM2 language model, activation checkpointing on),
hybrid gives the colocated update again, where the rollout actor ships the frozen towers' outputs to the learner
(these two runs are also the suite's PPO runs of an InternLM2 Sa2VA folder through the job).
"""

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
from ppo_runs import COMPARED, config, records  # noqa: E402
from sa2va_replica import build_replica  # noqa: E402

pytestmark = pytest.mark.ray


def test_hybrid_is_the_colocated_run_without_rollout_actors_and_resumes(ray_local, tmp_path, tiny_policy,
                                                                        colocated_run):
    colocated, _ = colocated_run
    hybrid = config(tmp_path, tiny_policy, "hybrid", *COMPARED, "placement=hybrid", "stop_after_iterations=2")
    run_training(hybrid)
    health = json.loads((hybrid.run_path / "health.json").read_text())
    assert health["rollout"] == [] and health["learner"]["world_size"] == 2  # no rollout actor was started
    assert [r["iteration"] for r in records(hybrid.run_path)] == [1, 2]
    run_training(config(tmp_path, tiny_policy, "hybrid", *COMPARED, "placement=hybrid", "resume=true"))

    a, b = records(colocated.run_path), records(hybrid.run_path)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["batch_ids"] == y["batch_ids"] and x["batch_views"] == y["batch_views"]
        assert y["reward"] == pytest.approx(x["reward"], rel=1e-9, abs=1e-12)  # the same masks were drawn
        # iterations 3 and 4 came after the resume, whose restored optimizer state is equal to ~1e-6 (as colocated)
        rel = 1e-9 if y["iteration"] < 3 else 1e-4
        for key in ("reward/dice", "policy_loss", "kl_ref", "val/dice"):
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-12), (y["iteration"], key)
        assert y["time/sync"] == 0.0 and y["adapter_version_lag"] == 0
        assert y["rollout_version"] == y["iteration"] - 1
    # the old policy's forward moved from learn to rollout, nothing else
    assert b[0]["flops/rollout"] > 0 and "flops/rollout" not in a[0]
    assert b[0]["flops/rollout"] + b[0]["flops/learn"] == a[0]["flops/learn"]
    assert (hybrid.run_path / "final_adapter" / "adapter_config.json").is_file()


def test_hybrid_on_a_sa2va_replica_is_colocated_with_shipped_frozen_features(ray_local, tmp_path):
    """A tiny Sa2VA replica (InternLM2 language model, activation checkpointing on): hybrid, where the ranks keep the
    frozen towers' outputs of their own sampling, gives the update colocated gives with the rollout actor sending
    them (``rollout.ship_frozen``, the default for rollout actors on CPUs); the colocated learner then runs no
    tower at all."""
    folder = build_replica(tmp_path / "sa2va", family="internlm2")
    runs = {}
    for placement in ("colocated", "hybrid"):
        cfg = load_config(TrainConfig, None, [
            f"name=sa2va_{placement}", f"run_dir={tmp_path / 'runs'}", f"policy.name={folder}",
            "policy.trust_remote_code=true", "policy.lora.targets=llm+decoder", "policy.lora.dropout=0.0",
            "policy.gradient_checkpointing=true", f"placement={placement}", "iterations=2",
            "data.datasets=[drive-sample,arcade-sample]", "data.image_size=64", "data.images_per_iteration=2",
            "data.val_limit=1", "rollout.num_workers=1", "rollout.num_cpus=0.25", "rollout.samples_per_image=2",
            "reward.num_actors=1", "reward.num_cpus=0.25", "learner.num_workers=1", "learner.cpus_per_worker=0.5",
            "learner.count_flops=true", "ppo.epochs=2", "ppo.warmup_steps=1", "checkpoint_every=2", "val_every=2",
            "progress=false"])
        assert cfg.ships_frozen == (placement == "colocated")
        summary = run_training(cfg)
        rows = records(cfg.run_path)
        assert [r["iteration"] for r in rows] == [1, 2] and summary["completed"] == 2
        for r in rows:
            for key in ("policy_loss", "reward", "entropy", "kl_ref", "time/rollout", "time/learn"):
                assert key in r and math.isfinite(r[key]), (key, r.get(key))
            assert not r["collapsed"] and r["empty_mask_fraction"] < 1 and r["full_mask_fraction"] < 1
        assert math.isfinite(rows[-1]["val/dice"])
        adapter = json.loads((cfg.run_path / "final_adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(folder)
        assert json.loads((cfg.run_path / "samples" / "latest.json").read_text())["iteration"] == 2
        runs[placement] = rows
    colocated, hybrid = runs["colocated"], runs["hybrid"]
    for x, y in zip(colocated, hybrid):
        for key in ("reward", "policy_loss", "kl_ref", "entropy", "advantage_std"):
            assert y[key] == pytest.approx(x[key], rel=1e-9, abs=1e-12), (y["iteration"], key)
        assert y["time/sync"] == 0.0
    assert hybrid[-1]["val/dice"] == pytest.approx(colocated[-1]["val/dice"], rel=1e-9)
    # SAM2's encoder at 1024 px and InternViT are most of the FLOPs: run once per image in hybrid's rollout, never
    # by the colocated learner, which received them
    assert colocated[0]["flops/learn"] < 0.5 * (hybrid[0]["flops/rollout"] + hybrid[0]["flops/learn"])
