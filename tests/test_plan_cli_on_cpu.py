"""`rl-seg plan` and the plan `rl-seg submit` runs first: a config that fits its GPUs is accepted with its largest
micro-batch; one that does not is refused naming the GPU, the processes on it and the GiB missing, and submit
refuses it before it contacts Ray. Checkpoint folders here hold the released config.json of a real shape and no
weights: the plan reads shapes, it loads nothing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from rl_seg import cli
from rl_seg.config import load_config
from rl_seg.plan import GiB, parse_gpus, plan_train_config
from rl_seg.ppo.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sa2va_replica.build import REAL_VOCAB, released_config  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "rl_seg" / "configs" / "sa2va-4b.yaml"
SAMPLES = ["data.datasets=[drive-sample,arcade-sample]"]


def checkpoint(tmp_path, shape: str, family: str) -> Path:
    folder = tmp_path / shape
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(released_config(family, shape, REAL_VOCAB[family], torch.bfloat16)))
    return folder


def test_plan_accepts_a_fitting_config(tmp_path, capsys):
    folder = checkpoint(tmp_path, "sa2va-4b", "qwen2")
    code = cli.main(["plan", "--config", str(CONFIG), "--gpus", "1xH200", "--json", str(tmp_path / "plan.json"),
                     f"policy.name={folder}", "placement=hybrid", *SAMPLES])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("fits") and "1 x H200 (140.4 GiB each)" in out and "learner rank 0" in out
    assert "rollout actor" not in out  # hybrid: the learner samples
    assert "actions 584x565" in out  # DRIVE's own size: image-resolution actions at native size
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and [p["name"] for p in plan["processes"]] == ["learner rank 0"]
    best = plan["max_micro_batch"]
    assert 1 <= best <= 8 and f"largest micro-batch per learner rank: {best}" in out


def test_plan_refuses_naming_the_gpu_processes_and_gib_missing(tmp_path, capsys):
    folder = checkpoint(tmp_path, "sa2va-26b", "internlm2")
    code = cli.main(["plan", "--config", str(CONFIG), "--gpus", "1xA100-80GB", f"policy.name={folder}", *SAMPLES])
    out = capsys.readouterr().out
    assert code == 2
    m = re.search(r"does not fit: GPU 0: rollout actor 0 with learner rank 0 need ([\d.]+) GiB, the GPU has 80 GiB: "
                  r"([\d.]+) GiB missing", out)
    assert m, out
    assert float(m.group(1)) - 80 == pytest.approx(float(m.group(2)), abs=0.11)
    # the same model in hybrid holds one copy and needs less (whether or not that fits)
    cfg = load_config(TrainConfig, CONFIG, [f"policy.name={folder}", "placement=hybrid", *SAMPLES])
    hybrid = plan_train_config(cfg, parse_gpus("1xA100-80GB"))
    assert hybrid["per_gpu"][0]["total"] / GiB < float(m.group(1)) - 40


def test_plan_refuses_what_ray_could_never_place(tmp_path, capsys):
    folder = checkpoint(tmp_path, "sa2va-1b", "qwen2")
    code = cli.main(["plan", "--config", str(CONFIG), "--gpus", "1xH200", f"policy.name={folder}",
                     "rollout.num_gpus=0.75", *SAMPLES])
    assert code == 2
    assert "learner rank 0 asks for 0.5 GPU and no GPU has that much left" in capsys.readouterr().out


def test_submit_runs_the_plan_before_contacting_ray(tmp_path, capsys, monkeypatch):
    from rl_seg.service import jobs

    def contacted(*args, **kwargs):
        raise AssertionError("submit contacted Ray for a config that cannot fit")

    monkeypatch.setattr(jobs, "job_client", contacted)
    folder = checkpoint(tmp_path, "sa2va-26b", "internlm2")
    code = cli.main(["submit", "--config", str(CONFIG), "--gpus", "1xA100-80GB", "--address", "http://127.0.0.1:9",
                     f"policy.name={folder}", *SAMPLES])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit: GPU 0: rollout actor 0 with learner rank 0 need" in err and "GiB missing" in err


def test_plan_gpu_specs_and_what_it_does_not_model(tmp_path, capsys):
    assert cli.main(["plan", "--config", str(CONFIG), "--gpus", "four A100s", *SAMPLES]) == 2
    assert "expected COUNTxNAME[-MEMORYGB]" in capsys.readouterr().err
    # a CPU run and a non-Sa2VA policy are not refused: there is nothing the plan could check
    assert cli.main(["plan", "--config", str(CONFIG), "policy.name=default", *SAMPLES]) == 0
    assert "not a Sa2VA checkpoint folder" in capsys.readouterr().out
    assert cli.main(["plan", "--config", str(CONFIG), "learner.use_gpu=false", *SAMPLES]) == 0
    assert "CPU run" in capsys.readouterr().out
