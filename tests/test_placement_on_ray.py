"""Rollout placement (colocated / disaggregated) on a real Ray instance. GPUs here are Ray's logical ones: the
placement is what is checked (which device each actor is given); no CUDA is needed for that."""

import subprocess
import sys
import textwrap

import pytest

from rl_seg.config import ConfigError, load_config
from rl_seg.ppo.config import TrainConfig

pytestmark = pytest.mark.ray


def test_disaggregated_needs_whole_gpus():
    with pytest.raises(ConfigError, match=r"rollout.num_gpus \(0.25\) must be a whole number"):
        load_config(TrainConfig, None, ["placement=disaggregated", "rollout.num_gpus=0.25"])
    with pytest.raises(ConfigError, match=r"^placement: not one of \['colocated', 'disaggregated', 'hybrid'\] \(got 'spread'\)$"):
        load_config(TrainConfig, None, ["placement=spread"])


SCRIPT = textwrap.dedent("""
    import os, sys, torch
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray
    from rl_seg.config import load_config
    from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel
    from rl_seg.ppo.config import TrainConfig
    from rl_seg.ray_env import init_ray
    from rl_seg.roles.placement import RolloutPlacement
    from rl_seg.roles.rollout import RolloutWorker

    policy = DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(sys.argv[1])
    init_ray(num_cpus=4, num_gpus=3, log_to_driver=False)
    cfg = load_config(TrainConfig, None, [f"policy.name={policy}", "placement=disaggregated", "rollout.num_workers=2",
                                          "rollout.num_gpus=1", "rollout.num_cpus=0.5", "placement_timeout_s=60"])

    @ray.remote
    def gpus():
        return ray.get_gpu_ids()

    placement = RolloutPlacement(cfg)
    workers = [RolloutWorker.options(**placement.options(i)).remote(cfg.policy.name, cfg.policy.lora, 1, True)
               for i in range(2)]
    ray.get([w.ready.remote() for w in workers])
    rollout_gpus = [ray.get(w.__ray_call__.remote(lambda self: ray.get_gpu_ids())) for w in workers]
    print("ROLLOUT", rollout_gpus)
    # what is left for the learners: one whole GPU, not one the rollouts hold
    print("LEARNER", ray.get(gpus.options(num_gpus=1).remote()))
    free = ray.available_resources().get("GPU", 0)
    print("FREE_AFTER_LEARNER", free)
    # a second disaggregated run cannot get two more GPUs: it fails fast, naming what it needed
    cfg2 = load_config(TrainConfig, None, [f"policy.name={policy}", "placement=disaggregated", "rollout.num_workers=2",
                                           "rollout.num_gpus=1", "placement_timeout_s=3"])
    try:
        RolloutPlacement(cfg2)
    except RuntimeError as exc:
        print("ERROR", exc)
    placement.release()
    ray.shutdown()
""")


def test_disaggregated_rollouts_get_gpus_of_their_own(tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "policy")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in run.stdout.splitlines() if " " in line}
    rollout = eval(lines["ROLLOUT"])  # [[id], [id]] from ray.get_gpu_ids()
    learner = eval(lines["LEARNER"])
    assert all(len(ids) == 1 for ids in rollout) and rollout[0] != rollout[1]
    assert len(learner) == 1 and learner[0] not in {rollout[0][0], rollout[1][0]}
    assert "need 2 whole GPU(s) of their own" in lines["ERROR"] and "has 3 GPU(s)" in lines["ERROR"]
