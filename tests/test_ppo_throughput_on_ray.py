"""The throughput benchmark's in-process baseline (benchmarks/ppo_throughput.py, path (b)) on CPU, tiny policy.

(b) runs in the script's driver while the Ray instance of path (a) is up, so it is tested with Ray running too.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel

pytestmark = pytest.mark.ray

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_throughput.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ppo_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_in_process_baseline_two_iterations(ray_local, tmp_path):
    bench = load_script()
    torch.manual_seed(0)
    policy = DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(tmp_path / "policy")
    cfg = bench.build_config(run_dir=tmp_path / "runs", name="b", policy=str(policy), image_size=48, images=2, k=3,
                             iterations=2, use_gpu=False, extra=["ppo.lr=5e-3", "ppo.warmup_steps=1",
                                                                  "policy.lora.dropout=0.0"])
    # (a) would run this very config: the PPO shape is what the benchmark compares
    assert (cfg.rollout.samples_per_image, cfg.data.images_per_iteration, cfg.learner.num_workers) == (3, 2, 1)

    result = bench.run_in_process(cfg, warmup=0, device=torch.device("cpu"))

    # LoRA B starts at zero, so any trained step moves it
    moved = {k: float(np.abs(result.adapter_after[k] - result.adapter_before[k]).max())
             for k in result.adapter_before}
    assert any(v > 0 for k, v in moved.items() if "lora_B" in k), moved
    assert [r["iteration"] for r in result.records] == [1, 2]
    for r in result.records:
        for phase in ("rollout", "reward", "learn", "iteration"):
            assert r[f"time/{phase}"] > 0, (phase, r)
        assert r["time/sync"] == 0.0 and r["time/export"] == 0.0  # one process: no weights move
        assert r["time/rollout"] + r["time/reward"] + r["time/learn"] <= r["time/iteration"]
        assert r["masks"] == 2 * 3 and np.isfinite(r["reward"])
    s = result.summary
    assert s["iterations_timed"] == 2 and s["masks"] == 2 * 2 * 3
    seconds = sum(r["time/iteration"] for r in result.records)
    assert s["seconds"] == pytest.approx(seconds)
    assert s["masks_per_s"] == pytest.approx(s["masks"] / seconds)
    assert s["reward_share"] == pytest.approx(s["phases_s"]["reward"] / (seconds / 2))
