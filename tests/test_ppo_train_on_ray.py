"""The PPO job on the real stack (Ray, Ray Train, DeepSpeed on gloo, the reward pool), with a tiny policy.

End to end, a rollout actor killed mid-run, a learner worker killed mid-run, and an exact resume; and how runs
end (issue 16): a second driver refused, Ctrl-C and SIGTERM recorded as interruptions with the command that
resumes them (exit 130 / 143, no stack dump), a restart under the same name, a stop through the status service,
spent restart budgets, a full disk and a damaged checkpoint named as such.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl_seg.config import load_config
from rl_seg.ppo.config import TrainConfig
from rl_seg.run_checkpoints import list_checkpoints
from rl_seg.run_lock import RunFolderError
from rl_seg.train import RunFailed, latest_checkpoint, run_training

from mounts import fill, tmpfs
from ppo_runs import COMPARED, config, lora_weights, overrides, ray_process_pid, records

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


#: One rollout actor, reward actor and learner: enough for the tests of how runs end, and quicker to start (each
#: actor is a process that imports torch, peft and DeepSpeed: about 9 s of CPU on the 2-core CI machine).
SMALL = ("rollout.num_workers=1", "reward.num_actors=1", "learner.num_workers=1", "data.images_per_iteration=2")


def driver(ray, tmp_path, args: list[str], log: str) -> subprocess.Popen:
    """`rl-seg train` as its own process (as an operator runs it), joining the tests' Ray instance; its stdout and
    stderr go to files (Ray's worker logs would fill a pipe)."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "rl_seg.cli", "train", *args], env=env,
                            stdout=open(tmp_path / f"{log}.out", "w"), stderr=open(tmp_path / f"{log}.err", "w"))


def wait_for(predicate, timeout_s: float = 240, what: str = "it"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def logged(run_path) -> int:
    path = run_path / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_state(run_path) -> dict:
    return json.loads((run_path / "run_state.json").read_text())


def own_lines(text: str) -> list[str]:
    """The driver's own console lines (Ray prefixes what its workers print with their name and pid)."""
    return [line for line in text.splitlines() if line.strip() and not re.match(r"(\x1b\[[0-9;]*m)*\(", line)]


def test_a_local_instance_registers_and_listens_on_loopback_only(ray_local):
    """The tests' instance is started as `rl-seg train` starts its own (rl_seg.ray_env.init_ray, no address): it
    must register 127.0.0.1 and listen nowhere else (its GCS, raylet, dashboard, agents and workers)."""
    import psutil

    from test_cluster_local_on_ray import LOOPBACK, listeners

    assert ray_local.get(ray_local.remote(lambda: 1).remote()) == 1  # a worker process of its own too
    assert [n["NodeManagerAddress"] for n in ray_local.nodes()] == ["127.0.0.1"]
    me = psutil.Process()
    found = listeners([me.pid] + [child.pid for child in me.children(recursive=True)])
    assert found and set(found) <= LOOPBACK, found


def _kill_when(run_path, iteration, find_pid, sig=signal.SIGKILL, timeout=240):
    """From a thread: wait until `iteration` is logged, then kill the process find_pid() names."""
    killed = {}

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if logged(run_path) >= iteration:
                try:
                    pid = find_pid()
                except Exception:  # noqa: BLE001 - not there yet (a restart under way): ask again
                    time.sleep(0.5)
                    continue
                os.kill(pid, sig)
                killed["pid"] = pid
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


def test_end_to_end_and_a_resume_continues_exactly(ray_local, tmp_path, tiny_policy, colocated_run):
    whole, summary = colocated_run
    # the uninterrupted run, end to end
    rows = records(whole.run_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["adapter_version"] for r in rows] == [1, 2, 3, 4]
    # the rollout actor sampled each iteration with the weights the learner produced in the one before
    assert [r["rollout_version"] for r in rows] == [0, 1, 2, 3]
    assert all(r["adapter_version_lag"] == 0 for r in rows)
    assert rows[-1]["masks"] == 4 * 4 * 3 and rows[-1]["reward_failures"] == 0
    for key in ("reward", "reward/dice", "reward/recall", "reward/precision", "reward/cldice", "entropy",
                "clip_fraction", "advantage_std", "time/rollout", "time/reward", "time/learn", "time/sync",
                "masks_per_s", "empty_mask_fraction", "full_mask_fraction", "val/dice"):
        assert key in rows[-1], key
    assert (whole.run_path / "config.yaml").is_file() and (whole.run_path / "tensorboard").is_dir()
    # LoRA B starts at zero: a trained adapter has moved it
    final = lora_weights(whole.run_path / "final_adapter")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in final.items())
    last = latest_checkpoint(whole.run_path)
    assert json.loads((last / "checkpoint.json").read_text())["iteration"] == 4
    assert (last / "adapter" / "adapter_config.json").is_file()
    assert summary["metrics"]["iteration"] == 4 and summary["state"] == "succeeded"

    # the same run stopped after two iterations, then resumed: it must draw the same images in the same views
    part = config(tmp_path, tiny_policy, "part", *COMPARED, "stop_after_iterations=2")
    run_training(part)
    assert [r["iteration"] for r in records(part.run_path)] == [1, 2]
    assert not (part.run_path / "final_adapter").exists()
    resumed = config(tmp_path, tiny_policy, "part", *COMPARED, "resume=true")
    run_training(resumed)
    state = json.loads((part.run_path / "run_state.json").read_text())
    assert state["state"] == "succeeded" and state["sessions"] == 2 and state["resumed_from_iteration"] == 2
    assert state["resume_changes"] == {"stop_after_iterations": [2, None]} and state["resume_command"] is None
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


def test_resume_without_a_run_and_rerun_are_clear_errors(ray_local, tmp_path, tiny_policy):
    with pytest.raises(RunFolderError, match="holds no run to resume"):
        run_training(config(tmp_path, tiny_policy, "nothing", "resume=true"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("")
    with pytest.raises(RunFolderError, match=r"already holds a run .*rl-seg train --resume run_dir=\S+ name=taken"):
        run_training(config(tmp_path, tiny_policy, "taken"))


def test_killed_learner_worker_and_rollout_actor_are_restarted_and_nothing_is_lost(ray_local, tmp_path, tiny_policy):
    """A learner rank killed mid-run: the group restarts from the last checkpoint and redoes what followed it. Then a
    rollout actor killed mid-run: Ray restarts it and its requests are redone. Every iteration is recorded once."""
    from test_run_integrity_on_cpu import _scalar_steps

    args = overrides(tmp_path, tiny_policy, "kill", "iterations=8", "checkpoint_every=2", "val_every=0",
                     "learner.max_failures=1", "keep_checkpoints=1", "reward.num_actors=1")
    cfg = load_config(TrainConfig, None, args)
    learner_thread, learner_killed = _kill_when(cfg.run_path, 3, lambda: ray_process_pid("RayTrainWorker"))

    def rollout_after_the_restart() -> int:
        # after the group's restart, so that no checkpoint restore can forget the rollout actor's restart
        health = json.loads((cfg.run_path / "health.json").read_text())
        if health["learner"]["starts"] < 2 or logged(cfg.run_path) < 4:
            raise LookupError("the learner group has not restarted yet")
        return ray_process_pid("RolloutWorker")

    rollout_thread, rollout_killed = _kill_when(cfg.run_path, 4, rollout_after_the_restart)
    # a second driver for the same run folder, started once the first holds it: refused, naming the holder
    second = {}

    def start_second():
        wait_for(lambda: (cfg.run_path / "run.lock").exists(), what="the first driver's lock")
        try:
            run_training(load_config(TrainConfig, None, args))
        except RunFolderError as exc:
            second["refused"] = str(exc)

    threading.Thread(target=start_second, daemon=True).start()
    run_training(cfg)
    learner_thread.join(5)
    rollout_thread.join(5)
    assert learner_killed, "no learner worker was killed"
    assert rollout_killed, "no rollout actor was killed"
    # the restarted group continued from the iteration-2 checkpoint and redid iteration 3, which is recorded once:
    # in metrics.jsonl, in what the status service and the curves read, in TensorBoard
    rows = records(cfg.run_path)
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert _scalar_steps(cfg.run_path / "tensorboard", "reward") == list(range(1, 9))
    assert json.loads((cfg.run_path / "health.json").read_text())["learner"]["starts"] == 2
    assert rows[-1]["rollout_restarts"] >= 1
    assert rows[-1]["masks"] == 8 * 4 * 3  # nothing lost, nothing counted twice
    assert all(len(r["batch_ids"]) == 4 for r in rows)
    assert (cfg.run_path / "final_adapter" / "adapter_model.safetensors").is_file()
    assert [c.iteration for c in list_checkpoints(cfg.run_path)] == [8]  # keep_checkpoints=1
    assert f"kill is in use by pid {os.getpid()} on host" in second["refused"]
    assert len(records(cfg.run_path)) == 8  # it wrote nothing


def test_ctrl_c_before_the_first_checkpoint_then_restart_under_its_name_and_stop_through_the_service(
        ray_local, tmp_path, tiny_policy):
    import requests

    from rl_seg.cli import main
    from rl_seg.service import ServiceSettings, StatusServer
    from rl_seg.service.store import RunStore

    name, run_path = "cut", tmp_path / "cut"
    first = driver(ray_local, tmp_path, overrides(tmp_path, tiny_policy, name, *SMALL, "iterations=200",
                                                  "checkpoint_every=100", "val_every=0"), "first")
    wait_for(lambda: logged(run_path) >= 1 or first.poll() is not None, what="the first iteration")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130
    state = run_state(run_path)
    assert state["state"] == "interrupted" and state["reason"] == "SIGINT received"
    assert state["last_checkpoint"] is None and latest_checkpoint(run_path) is None
    command = f"rl-seg train --resume run_dir={tmp_path.resolve()} name={name}"
    assert state["resume_command"] == command
    err = own_lines((tmp_path / "first.err").read_text())
    assert not [line for line in err if "Traceback" in line or "Fatal" in line], err
    assert f"  resume: {command}" in err

    # the same name restarts (no checkpoint: from iteration 0), as this process; the service shows it running
    # (not "lost", which it showed while run_state kept the first driver's pid) and stops it
    token = "t-16"
    service = StatusServer(ServiceSettings(runs_root=tmp_path, token=token), port=0).start()
    seen = {}

    def watch():
        wait_for(lambda: logged(run_path) >= 2 and run_state(run_path)["pid"] == os.getpid(), what="the restart")
        seen["summary"] = RunStore(tmp_path).run_summary(name)
        seen["stop"] = requests.post(f"{service.url}/runs/{name}/stop", json={"reason": "test"},
                                     headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert main(["train", "--resume", f"run_dir={tmp_path}", f"name={name}", "iterations=60"]) == 0
    finally:
        service.stop()
    watcher.join(10)
    assert seen["summary"]["state"] == "running" and seen["stop"] == 200
    state = run_state(run_path)
    assert state["state"] == "stopped" and state["pid"] == os.getpid() and state["sessions"] == 2
    assert state["resume_changes"] == {"iterations": [200, 60]}
    done = state["completed_iterations"]
    assert 2 <= done < 60 and state["last_checkpoint"]["iteration"] == done and state["resume_command"] == command
    assert [r["iteration"] for r in records(run_path)] == list(range(1, done + 1))  # once each, from 1 again


def test_sigterm_is_recorded_as_interrupted_with_exit_143_and_no_stack_dump(ray_local, tmp_path, tiny_policy):
    run_path = tmp_path / "term"
    proc = driver(ray_local, tmp_path, overrides(tmp_path, tiny_policy, "term", *SMALL, "iterations=200",
                                                 "val_every=0"), "term")
    wait_for(lambda: logged(run_path) >= 3 or proc.poll() is not None, what="three iterations")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    state = run_state(run_path)
    assert state["state"] == "interrupted" and state["reason"] == "SIGTERM received"
    assert state["last_checkpoint"]["iteration"] >= 2 and "rl-seg train --resume" in state["resume_command"]
    err = own_lines((tmp_path / "term.err").read_text())
    assert not [line for line in err if any(w in line for w in ("Traceback", "Fatal", "Aborted", "core dumped"))]
    assert any("interrupted after iteration" in line for line in err), err
    assert any(line.startswith("  resume: rl-seg train --resume") for line in err), err


@pytest.mark.parametrize("role, budget", [("RolloutWorker", "rollout.max_restarts=0"),
                                          ("RayTrainWorker", "learner.max_failures=0")])
def test_a_spent_restart_budget_is_named(ray_local, tmp_path, tiny_policy, role, budget):
    # long enough that the kill (found through Ray's state API, which can take a while) comes mid-run
    cfg = config(tmp_path, tiny_policy, "budget", *SMALL, "iterations=2000", "val_every=0", "learner.max_failures=0",
                 budget)
    thread, killed = _kill_when(cfg.run_path, 2, lambda: ray_process_pid(role))
    with pytest.raises(RunFailed, match=f"restart budget exhausted: .*{budget}"):
        run_training(cfg)
    thread.join(5)
    assert killed
    state = run_state(cfg.run_path)
    assert state["state"] == "failed" and state["error"].startswith("restart budget exhausted")
    assert budget in state["error"] and len(state["error"]) < 400, state["error"]
    assert state["resume_command"] and state["last_checkpoint"]["iteration"] >= 1


def test_a_full_disk_fails_the_run_naming_the_path_and_leaves_no_temporary_files(ray_local, tmp_path, tiny_policy):
    with tmpfs(tmp_path / "disk", size="16m") as disk:
        cfg = config(disk, tiny_policy, "full", *SMALL, "iterations=2000", "val_every=0", "learner.max_failures=0")
        filled = {}

        def fill_after_two_iterations():
            wait_for(lambda: logged(cfg.run_path) >= 2, what="two iterations")
            filled["ballast"] = fill(disk)

        threading.Thread(target=fill_after_two_iterations, daemon=True).start()
        with pytest.raises(RunFailed, match=f"disk full: .*{disk}"):
            run_training(cfg)
        assert filled["ballast"].exists()
        state = run_state(cfg.run_path)  # written with the disk still full
        assert state["state"] == "failed" and state["error"].startswith("disk full") and str(disk) in state["error"]
        assert not list(cfg.run_path.rglob("*.tmp")) and not list(cfg.run_path.rglob(".*.tmp"))


def test_a_checkpoint_with_a_nan_weight_fails_the_run_at_start_without_a_restart(ray_local, tmp_path, tiny_policy):
    """Every role refuses a damaged checkpoint (rl_seg.guards); the learner group records it and returns instead of
    raising, which Ray Train would answer with a restart (learner.max_failures=1) that meets the same weights."""
    from safetensors.torch import save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_policy, damaged)
    weights = load_file(str(damaged / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    cfg = config(tmp_path, tiny_policy, "damaged", *SMALL, f"policy.name={damaged}", "learner.max_failures=1")
    with pytest.raises(RunFailed, match=r"failed after iteration 0 of 2; no checkpoint yet\n  error in "
                                        r"(learner|rollout)-0: NonFiniteError: .*non-finite") as info:
        run_training(cfg)
    assert name in str(info.value) and "restart budget" not in str(info.value)
    state = run_state(cfg.run_path)
    assert state["state"] == "failed" and re.match(r"error in (learner|rollout)-0: NonFiniteError", state["error"])
    assert not (cfg.run_path / "metrics.jsonl").exists() or not records(cfg.run_path)


def test_a_nan_stops_the_run_naming_what_where_and_the_last_good_checkpoint(ray_local, tmp_path, tiny_policy):
    """A step of 1e30 makes the next loss non-finite: the run must fail with the what and where, not "complete"
    with NaN metrics, and keep a checkpoint to resume from."""
    from rl_seg.guards import NonFiniteError

    cfg = config(tmp_path, tiny_policy, "nan", *SMALL, "iterations=4", "ppo.lr=1e30", "ppo.max_grad_norm=1e30",
                 "checkpoint_every=1")
    with pytest.raises(NonFiniteError) as info:
        run_training(cfg)
    message = str(info.value)
    assert re.search(r"non-finite values at iteration \d \((before the update|epoch \d)\): rank [01]: ", message)
    assert "last good checkpoint:" in message and "resume" in message
    record = json.loads((cfg.run_path / "non_finite.json").read_text())
    good = Path(record["last_good_checkpoint"])
    assert (good / "checkpoint.json").is_file() and record["last_good_iteration"] < record["iteration"]
    state = json.loads((cfg.run_path / "run_state.json").read_text())
    assert state["state"] == "failed" and "non-finite" in state["error"]
    assert not (cfg.run_path / "final_adapter").exists()
    rows = records(cfg.run_path)
    assert len(rows) < 4 and all(r["iteration"] < record["iteration"] for r in rows)
