"""The PPO job on the real stack (Ray, Ray Train, DeepSpeed on gloo, the reward pool), with a tiny policy.

End to end, a rollout actor killed mid-run, a learner worker killed mid-run, and an exact resume.
"""

import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from rl_seg.config import load_config
from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel
from rl_seg.ppo.config import TrainConfig
from rl_seg.train import latest_checkpoint, run_training

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    torch.manual_seed(0)
    return DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(tmp_path_factory.mktemp("tiny") / "policy")


def config(tmp_path, tiny_policy, name, *overrides) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"name={name}", f"run_dir={tmp_path}", f"policy.name={tiny_policy}", "iterations=2", "seed=3",
        "data.datasets=[drive-sample,arcade-sample]", "data.image_size=48", "data.images_per_iteration=4",
        "data.val_limit=1", "rollout.num_workers=2", "rollout.num_cpus=0.25", "rollout.samples_per_image=3",
        "reward.num_actors=2", "reward.num_cpus=0.25", "learner.num_workers=2", "learner.cpus_per_worker=0.5",
        "ppo.lr=5e-3", "ppo.warmup_steps=1", "policy.lora.dropout=0.0", "checkpoint_every=1", "val_every=1",
        "progress=false", *overrides])


def records(run_path):
    return [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]


def lora_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_end_to_end_two_iterations(ray_local, tmp_path, tiny_policy):
    cfg = config(tmp_path, tiny_policy, "e2e")
    summary = run_training(cfg)
    rows = records(cfg.run_path)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert [r["adapter_version"] for r in rows] == [1, 2]
    # the rollout actors sampled iteration 2 with the weights the learner produced in iteration 1
    assert [r["rollout_version"] for r in rows] == [0, 1]
    assert all(r["adapter_version_lag"] == 0 for r in rows)
    assert rows[-1]["masks"] == 2 * 4 * 3 and rows[-1]["reward_failures"] == 0
    for key in ("reward", "reward/dice", "reward/recall", "reward/precision", "reward/cldice", "entropy",
                "clip_fraction", "advantage_std", "time/rollout", "time/reward", "time/learn", "time/sync",
                "masks_per_s", "empty_mask_fraction", "full_mask_fraction", "val/dice"):
        assert key in rows[-1], key
    assert (cfg.run_path / "config.yaml").is_file() and (cfg.run_path / "tensorboard").is_dir()
    # LoRA B starts at zero: a trained adapter has moved it
    final = lora_weights(cfg.run_path / "final_adapter")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in final.items())
    first = latest_checkpoint(cfg.run_path)
    assert json.loads((first / "checkpoint.json").read_text())["iteration"] == 2
    assert (first / "adapter" / "adapter_config.json").is_file()
    assert summary["metrics"]["iteration"] == 2


def _kill_when(run_path, iteration, find_pid, sig=signal.SIGKILL, timeout=240):
    """From a thread: wait until `iteration` is logged, then kill the process find_pid() names."""
    killed = {}

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            path = run_path / "metrics.jsonl"
            if path.exists() and any(json.loads(x)["iteration"] >= iteration for x in path.read_text().splitlines()):
                pid = find_pid()
                os.kill(pid, sig)
                killed["pid"] = pid
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


def _actor_pid(class_name, ray):
    from ray.util.state import list_actors

    alive = [a for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])]
    assert alive, f"no live {class_name}"
    return int(alive[0]["pid"])


def test_killed_rollout_actor_is_restarted_and_its_work_redone(ray_local, tmp_path, tiny_policy):
    cfg = config(tmp_path, tiny_policy, "kill-rollout", "iterations=4", "checkpoint_every=4", "val_every=0")
    thread, killed = _kill_when(cfg.run_path, 1, lambda: _actor_pid("RolloutWorker", ray_local))
    run_training(cfg)
    thread.join(5)
    assert killed, "the rollout actor was never killed"
    rows = records(cfg.run_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]  # every iteration completed, once
    assert rows[-1]["rollout_restarts"] >= 1
    assert rows[-1]["masks"] == 4 * 4 * 3  # nothing lost, nothing counted twice
    assert all(len(r["batch_ids"]) == 4 for r in rows)


def test_resume_continues_exactly(ray_local, tmp_path, tiny_policy):
    # with augmented views: a resumed run must draw the same views too
    common = ("iterations=4", "checkpoint_every=2", "data.augment=true")
    whole = config(tmp_path, tiny_policy, "whole", *common)
    run_training(whole)
    part = config(tmp_path, tiny_policy, "part", *common, "stop_after_iterations=2")
    run_training(part)
    assert [r["iteration"] for r in records(part.run_path)] == [1, 2]
    assert not (part.run_path / "final_adapter").exists()
    resumed = config(tmp_path, tiny_policy, "part", *common, "resume=true")
    run_training(resumed)
    a, b = records(whole.run_path), records(part.run_path)
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    assert [r["batch_ids"] for r in a] == [r["batch_ids"] for r in b]  # same next batch
    assert [r["batch_views"] for r in a] == [r["batch_views"] for r in b]  # in the same views
    assert len({v for r in a for v in r["batch_views"]}) > 1
    for x, y in zip(a, b):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-9)
    wa, wb = lora_weights(whole.run_path / "final_adapter"), lora_weights(part.run_path / "final_adapter")
    assert wa.keys() == wb.keys()
    for k in wa:  # same weights
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_augmented_masks_are_scored_against_their_own_view(ray_local, tmp_path, tiny_policy):
    """The reward pool holds each target in the image's own orientation: a mask sampled on a turned image must be
    turned back before scoring. Dice is the same in every view, so the pool's Dice of each sample must equal the
    Dice of the batch's (turned) mask against the batch's (turned) target, which is what the learner credits."""
    import ray

    from rewards.metrics import compute_metrics
    from rewards.pool import RewardPool
    from rl_seg.policy import load_policy
    from rl_seg.policy.lora import attach_lora
    from rl_seg.ppo.states import load_states
    from rl_seg.roles.coordinator import Coordinator
    from rl_seg.roles.rollout import RolloutWorker, adapter_state
    from rl_seg.train import pool_reward, put_states

    cfg = config(tmp_path, tiny_policy, "views", "data.augment=true", "data.image_size=40", "rollout.num_workers=1",
                 "reward.num_actors=1", "rollout.temperature=2.0")
    train = load_states(cfg.data.datasets, "train", cfg.data.image_size)
    worker = RolloutWorker.options(num_cpus=0.25).remote(cfg.policy.name, cfg.policy.lora)
    pool = RewardPool(pool_reward(cfg), num_actors=1, num_cpus_per_actor=0.25)
    try:
        pool.add_targets({s.id: (s.gt, s.fov) for s in train})
        coordinator = Coordinator(cfg, [worker], pool, put_states(train), [], [0.0] * len(train))
        weights = [ray.put(adapter_state(attach_lora(load_policy(cfg.policy.name), cfg.policy.lora))), "w:0"]
        checked = set()
        for iteration in range(3):
            batch = coordinator.rollout(iteration, 0, weights)
            checked |= set(batch.stats["batch_views"]) - {0}
            for j in range(len(batch.ids)):
                masks = batch.unpack_actions(j)
                for m, pooled in zip(masks, batch.components[j]["dice"]):
                    assert pooled == pytest.approx(compute_metrics(m, batch.gts[j], batch.fovs[j])["dice"], abs=1e-9)
        assert len(checked) >= 3  # turned views, not only the identity, were checked
    finally:
        ray.kill(worker)
        pool.shutdown()


def test_resume_without_checkpoint_and_rerun_are_clear_errors(ray_local, tmp_path, tiny_policy):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        run_training(config(tmp_path, tiny_policy, "nothing", "resume=true"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_training(config(tmp_path, tiny_policy, "taken"))


def test_killed_learner_worker_restarts_group_from_checkpoint(ray_local, tmp_path, tiny_policy):
    cfg = config(tmp_path, tiny_policy, "kill-learner", "iterations=4", "checkpoint_every=2", "val_every=0",
                 "learner.max_failures=1")
    thread, killed = _kill_when(cfg.run_path, 3, lambda: _actor_pid("RayTrainWorker", ray_local))
    run_training(cfg)
    thread.join(5)
    assert killed, "no learner worker was killed"
    its = [r["iteration"] for r in records(cfg.run_path)]
    assert its[-1] == 4 and set(its) == {1, 2, 3, 4}
    # the restarted group continued from the iteration-2 checkpoint, so iteration 3 ran (and was logged) twice
    assert its.count(3) == 2 and its.count(1) == 1 and its.count(2) == 1
    assert (cfg.run_path / "final_adapter" / "adapter_model.safetensors").is_file()
