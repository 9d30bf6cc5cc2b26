"""The console of a real training job: `rl-seg train` in a subprocess, its own local Ray, a tiny policy.

A rollout actor is killed (with no restarts left) while the job runs, so one run shows both the lines of a
healthy job and how an actor's failure reaches the user: once, with the role that raised it.
"""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel

from ppo_runs import ray_process_pid

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 40
NOISE = ("TrainingReport", "Reporting training result", "PlacementGroupCleaner", "Failed to query Ray Train",
         "RayTrainWorker pid=", "TrainController pid=", "Traceback", "warnings.warn", "DeepSpeed")


@pytest.mark.scenario
def test_console_shows_progress_once_and_an_actor_error_once_with_its_role(tmp_path):
    torch.manual_seed(0)
    policy = DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(tmp_path / "policy")
    run = tmp_path / "runs" / "console"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "rl_seg.cli", "train", "name=console", f"run_dir={tmp_path / 'runs'}",
           f"policy.name={policy}", f"iterations={ITERATIONS}", "seed=3", "ray_num_cpus=4",
           "data.datasets=[drive-sample,arcade-sample]", "data.image_size=48", "data.images_per_iteration=4",
           "data.val_limit=1", "rollout.num_workers=1", "rollout.num_cpus=0.25", "rollout.samples_per_image=3",
           "rollout.max_restarts=0", "reward.num_actors=1", "reward.num_cpus=0.25", "learner.num_workers=1",
           "learner.cpus_per_worker=0.5", "learner.max_failures=0", "checkpoint_every=2", "val_every=2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.time() + 600  # generous: the machine may be shared
        while time.time() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                killed = ray_process_pid("RolloutWorker", root=proc.pid)
                os.kill(killed, 9)
                break
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert killed is not None, out
    lines = [line for line in out.splitlines() if line.strip()]

    assert proc.returncode == 1, out
    assert "Started a local Ray instance" in out
    doubled = [line for line, n in Counter(lines).items() if n > 1]
    assert not doubled, f"printed more than once: {doubled}\n{out}"
    assert not [line for line in lines if any(noise in line for noise in NOISE)], out

    done = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(done) >= 3
    for i in done:  # a line per iteration, and validation lines where it validated
        assert sum(line.startswith(f"[iter {i}/{ITERATIONS}] reward") for line in lines) == 1, out
    assert sum(line.startswith(f"[iter 2/{ITERATIONS}] validation") for line in lines) == 1, out

    # The killed worker's role, once: the outcome names the spent budget and how to resume.
    errors = [line for line in lines if "restart budget exhausted" in line]
    assert errors == ["  restart budget exhausted: rollout worker 0 died more often than rollout.max_restarts=0 "
                      "allows"], out
    assert sum(line.startswith("  resume: rl-seg train --resume") for line in lines) == 1, out
    assert len(lines) <= 2 * len(done) + 12, out  # nothing else of any length

    logs = run / "logs"
    for role in ("driver", "learner-0", "rollout-0", "reward-0"):
        assert (logs / f"{role}.log").is_file(), sorted(p.name for p in logs.iterdir())
    learner = (logs / "learner-0.log").read_text()
    assert "Reporting training result" in learner  # Ray Train's own lines from the worker
    assert f"[iter {done[0]}/{ITERATIONS}] reward" in learner  # the role's log keeps its console lines too
    assert "died more often than rollout.max_restarts=0" in learner  # the worker's traceback
    driver = (logs / "driver.log").read_text()
    assert "Traceback" in driver and "restart budget exhausted: rollout worker 0" in driver
    assert any(p.name.startswith("ray-TrainController") for p in logs.iterdir())


def test_an_actor_error_is_named_by_the_actor_and_the_learner_that_reported_it(ray_local):
    from ray.train import WorkerGroupError

    from rl_seg.console import describe_error

    @ray_local.remote
    class Role:
        def __repr__(self):  # as rl-seg's roles name themselves
            return "rollout-7"

        def fail(self):
            raise ValueError("bad pixel\nsecond line")

    actor = Role.remote()
    with pytest.raises(ValueError) as caught:
        ray_local.get(actor.fail.remote())
    ray_local.kill(actor)
    assert describe_error(caught.value) == "error in rollout-7: ValueError: bad pixel"
    group = WorkerGroupError("rank 1 failed", {1: caught.value})
    assert describe_error(group) == "error in rollout-7 (reported by learner-1): ValueError: bad pixel"
    assert describe_error(RuntimeError("in the driver")) == "error in driver: RuntimeError: in the driver"


def test_an_actor_that_fails_to_start_is_named_with_its_own_error(ray_local):
    """An actor whose __init__ raises (a damaged checkpoint refused at load): Ray keeps only text, an
    ActorDiedError; the console line still names the role and the original error (here "non-finite")."""
    from rl_seg.console import describe_error
    from rl_seg.guards import NonFiniteError

    @ray_local.remote(max_restarts=0)
    class Role:
        def __init__(self):
            raise NonFiniteError("/ckpt: 1 weight tensor(s) hold non-finite values (NaN or inf)")

        def __repr__(self):
            return "rollout-3"

        def ready(self):
            return True

    actor = Role.remote()
    with pytest.raises(ray_local.exceptions.ActorDiedError) as caught:
        ray_local.get(actor.ready.remote())
    line = "error in rollout-3: NonFiniteError: /ckpt: 1 weight tensor(s) hold non-finite values (NaN or inf)"
    assert describe_error(caught.value) == line
    # what learner rank 0 records when it waits for the rollout actors (they start while the learner group does)
    from rl_seg.roles.learner import wait_for_rollout_workers

    assert wait_for_rollout_workers([]) is None
    assert wait_for_rollout_workers([actor]) == line
