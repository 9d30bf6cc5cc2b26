"""Run integrity without Ray (issue 16): everything here is refused or recorded before Ray would start.

One writer per run folder (the lock, held by another real process), config validation in one place (the bad
values the issue found, through `rl-seg train` and `rl-seg tune`: exit 2, one line naming the field, no folder
written, Ray not started), a resume that keeps its saved config, metrics once per iteration (file, curves,
TensorBoard's purge step), checkpoint adoption and retention, state files on a full or read-only disk (a real
tmpfs), remote code refused unless allowed, and the Ray address forms head.env gives.
"""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from rl_seg.cli import main
from rl_seg.config import ConfigError, load_config, save_config
from rl_seg.policy.base import RemoteCodeError, SegPolicy, load_policy, register_policy
from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel
from rl_seg.ppo.config import TrainConfig
from rl_seg.ray_env import cluster_address
from rl_seg.run_checkpoints import REQUIRED, choose_checkpoint, latest_checkpoint, prune_checkpoints
from rl_seg.run_files import RUN_STATE, read_json, write_json_atomic
from rl_seg.run_lock import RunFolderBusy, RunLock, lock_holder
from rl_seg.run_logging import RunLogger
from rl_seg.run_metrics import read_metrics, supersede
from rl_seg.run_session import RunSession
from rl_seg.validation import resume_changes, resume_config

from mounts import fill, tmpfs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_starts(monkeypatch):
    """Calls of ray.init made by the code under test. The suite's other modules may hold a Ray instance in this
    process, so "Ray was not started" is asked of ray.init itself, which refuses here."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise RuntimeError("test: Ray must not start before validation has refused the run")

    monkeypatch.setattr(ray, "init", refuse)
    return calls



@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    torch.manual_seed(0)
    return DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(tmp_path_factory.mktemp("tiny") / "policy")


def train_args(run_dir, tiny_policy, name="r", *extra):
    return ["train", f"run_dir={run_dir}", f"name={name}", f"policy.name={tiny_policy}", "progress=false",
            "data.datasets=[drive-sample,arcade-sample]", "data.image_size=48", "data.images_per_iteration=2",
            "learner.num_workers=1", *extra]


# --- one writer per run folder -----------------------------------------------------------------------------

HOLD = """
import sys, time
from rl_seg.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_driver_is_refused_naming_the_holder_and_a_dead_holder_leaves_a_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(run)["pid"] == holder.pid
        with pytest.raises(RunFolderBusy, match=f"in use by pid {holder.pid} on host"):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed outright: it cannot release the lock file's record
        holder.wait()
    assert lock_holder(run) is None  # the kernel dropped the lock with the process
    lock = RunLock(run)
    stale = lock.acquire()
    assert stale["pid"] == holder.pid  # reported, so only a resume takes the folder over
    lock.release()
    assert RunLock(run).acquire() is None  # released cleanly: nothing stale


def test_a_run_folder_left_by_a_killed_driver_is_taken_over_only_by_a_resume(tmp_path, tiny_policy, capsys, ray_starts):
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    write_json_atomic(run / RUN_STATE, {"state": "running", "pid": holder.pid})
    holder.kill()
    holder.wait()
    assert main(train_args(tmp_path, tiny_policy)) == 2
    err = capsys.readouterr().err
    assert f"left by pid {holder.pid}" in err and "rl-seg train --resume" in err
    assert not (run / "config.yaml").exists()  # refused before anything was written
    assert not ray_starts
    # with resume it is taken over: no checkpoint, so the run starts again from iteration 0
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    session = RunSession(load_config(TrainConfig, None, train_args(tmp_path, tiny_policy)[1:] + ["resume=true"]))
    session.open()
    try:
        assert session.resume_from is None and not (run / "metrics.jsonl").exists()
        assert read_json(run / RUN_STATE)["pid"] == os.getpid() and lock_holder(run)["pid"] == os.getpid()
    finally:
        session.close()


# --- config validation in one place ------------------------------------------------------------------------

@pytest.mark.parametrize("override, line", [
    ("iterations=-1", "iterations: must be >= 1 (got -1)"),
    ("iterations=0", "iterations: must be >= 1 (got 0)"),
    ("ppo.epochs=0", "ppo.epochs: must be >= 1 (got 0)"),
    ("ppo.lr=-1", "ppo.lr: must be > 0 (got -1.0)"),
    ("rollout.max_restarts=-1", "rollout.max_restarts: must be >= 0 (got -1)"),
    ("rollout.num_workers=0", "rollout.num_workers: must be >= 1 (got 0)"),
    ("checkpoint_every=0", "checkpoint_every: must be >= 1 (got 0)"),
    ("learner.num_workers=0", "learner.num_workers: must be >= 1 (got 0)"),
    ("reward.num_actors=0", "reward.num_actors: must be >= 1 (got 0)"),
    ("rollout.temperature=0", "rollout.temperature: must be > 0 (got 0.0)"),
    ("data.image_size=-5", "data.image_size: must be >= 8 (got -5)"),
    ("policy.name=/no/such/policy", "policy.name: neither a registered policy ("),
    ("data.datasets=[/no/such/data]", "data.datasets[0]: dataset folder /no/such/data does not exist"),
    ("data.val_split=nope", "data.val_split: dataset 'drive-sample' has no split 'nope'"),
    ("name=../escape", "name: must be one folder name"),
    ("data.image_size=null learner.micro_batch_images=2",
     "learner.micro_batch_images: the 'default' policy takes one image size per batch"),
])
def test_bad_values_are_refused_before_ray_and_before_any_file(tmp_path, tiny_policy, capsys, override, line, ray_starts):
    assert main(train_args(tmp_path / "runs", tiny_policy, "r", *override.split())) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("rl-seg train: error: " + line), err
    for problem in [err[0].removeprefix("rl-seg train: error: "), *err[1:]]:  # one line per problem, each naming
        assert re.fullmatch(r"[\w.\[\]]+: .+ \(got .+\)", problem), err  # its field: problem (got value)
    assert len(err) == (2 if "val_split" in override else 1)  # both sample datasets lack that split
    assert not (tmp_path / "runs").exists() and not ray_starts


def test_bad_data_files_leave_no_half_made_run_folder(tmp_path, tiny_policy, capsys, ray_starts):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    (data / "images" / "a.png").write_bytes(b"not a png")
    (data / "masks" / "a.png").write_bytes(b"not a png")
    assert main(train_args(tmp_path / "runs", tiny_policy, "r", f"data.datasets=[{data}]")) == 2
    assert "a.png" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not ray_starts


def test_tune_validates_its_base_config_and_its_space_before_anything(tmp_path, capsys, ray_starts):
    sweep = tmp_path / "sweeps"
    assert main(["tune", f"out_dir={sweep}", "train_overrides=[rollout.num_workers=0]"]) == 2
    assert capsys.readouterr().err.strip() == "rl-seg tune: error: rollout.num_workers: must be >= 1 (got 0)"
    space = json.dumps({"ppo.lr": {"type": "loguniform", "low": -1, "high": 1e-3}})
    assert main(["tune", "--config", str(REPO / "tune" / "configs" / "smoke.yaml"), f"out_dir={sweep}",
                 f"space={space}"]) == 2
    assert capsys.readouterr().err.strip() == "rl-seg tune: error: space.ppo.lr.low: ppo.lr: must be > 0 (got -1.0)"
    assert not sweep.exists() and not ray_starts


# --- resume keeps the saved config -------------------------------------------------------------------------

def test_resume_uses_the_saved_config_and_lists_what_the_command_line_changed(tmp_path, tiny_policy, capsys, ray_starts):
    saved = load_config(TrainConfig, None, train_args(tmp_path, tiny_policy, "r", "iterations=40")[1:])
    save_config(saved, saved.run_path / "config.yaml")
    quickstart = REPO / "rl_seg" / "configs" / "quickstart.yaml"  # says iterations: 24
    cfg = resume_config(quickstart, [f"run_dir={tmp_path}", "name=r"])
    assert cfg.iterations == 40 and cfg.resume and cfg.policy.name == str(tiny_policy)  # the run's own config
    assert resume_changes(cfg) == {}
    longer = resume_config(None, [f"run_dir={tmp_path}", "name=r", "iterations=60"])
    assert resume_changes(longer) == {"iterations": [40, 60]}
    with pytest.raises(ConfigError, match=r"^ppo.lr: a resumed run keeps its saved value 0.001 .* \(got 0.003\)$"):
        resume_changes(resume_config(None, [f"run_dir={tmp_path}", "name=r", "ppo.lr=3e-3"]))
    assert main(["train", "--resume", f"run_dir={tmp_path}", "name=r", "ppo.epochs=5"]) == 2
    assert "ppo.epochs: a resumed run keeps its saved value 2" in capsys.readouterr().err
    assert not ray_starts


# --- metrics once per iteration ----------------------------------------------------------------------------

def _scalar_steps(logdir: Path, tag: str) -> list[int]:
    """The steps TensorBoard shows for ``tag``: events in file order, a SessionLog START at step s purging what
    was logged at steps >= s (TensorBoard's rule for restarted writers, which tensorboardX's purge_step uses)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    steps: list[int] = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_a_restart_supersedes_the_iterations_it_redoes(tmp_path):
    run = tmp_path / "run"
    logger = RunLogger(run, progress=False, resume_at=0)
    for it in (1, 2, 3, 4):
        logger.log({"iteration": it, "reward": float(it)})
    logger.close()
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('[1, 2]\n{"iteration": 5, "rew')  # a stray value and a line cut off by a crash
    time.sleep(1.1)  # event files are named by the second they were opened in
    logger = RunLogger(run, progress=False, resume_at=2)  # a group restarted from the iteration-2 checkpoint
    for it in (3, 4, 5):
        logger.log({"iteration": it, "reward": 10.0 * it})
    logger.close()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["reward"] for r in rows] == [1.0, 2.0, 30.0, 40.0, 50.0]
    assert _scalar_steps(run / "tensorboard", "reward") == [1, 2, 3, 4, 5]
    assert supersede(run, 5) == 0


def test_readers_show_each_iteration_once_in_order(tmp_path):
    from rl_seg.plots import plot_run_curves
    from rl_seg.plots import read_metrics as curve_metrics

    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"iteration": 1, "reward": 0.1, "kl_ref": 0.0},
                                          {"iteration": 2, "reward": 0.2}, {"iteration": 2, "reward": 0.25},
                                          [1, 2], {"iteration": "x"}, {"iteration": 3, "reward": 0.3}]) + "\n")
    assert curve_metrics is read_metrics  # the curves read through the same reader
    assert [(r["iteration"], r["reward"]) for r in read_metrics(tmp_path)] == [(1, 0.1), (2, 0.25), (3, 0.3)]
    assert plot_run_curves(tmp_path).is_file()
    # with the warm start's validation curve beside it (as the quickstart writes it): the precision-recall panel
    from rl_seg.plots import WARM_START_CURVE

    (tmp_path / WARM_START_CURVE).write_text(json.dumps(
        [{"threshold": t, "dice": 0.6, "recall": 1 - t, "precision": t} for t in (0.3, 0.5, 0.7)]))
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"iteration": 4, "reward": 0.4, "val/recall": 0.6, "val/precision": 0.5}) + "\n")
    plain = plot_run_curves(tmp_path, tmp_path / "plain.png")
    assert plain.stat().st_size > 1000

# --- checkpoints: adoption and retention -------------------------------------------------------------------

def make_checkpoint(run: Path, name: str, iteration: int, session: str, val_dice=None, whole=True) -> Path:
    folder = run / "ray_train" / f"r-{session}" / name
    write_json_atomic(folder / "checkpoint.json", {"iteration": iteration, "version": iteration, "session": session,
                                                    "val_dice": val_dice})
    for part in REQUIRED[1:] if whole else ("trainer_state.pt",):
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        (folder / part).write_text("x")
    time.sleep(0.01)
    return folder


def test_a_learner_group_adopts_another_sessions_checkpoint_only_when_resuming(tmp_path):
    theirs = make_checkpoint(tmp_path, "c30", 30, "other")
    assert choose_checkpoint(theirs, tmp_path, "mine", resume_from=None) is None  # Ray Train's snapshot handed it
    assert choose_checkpoint(None, tmp_path, "mine", resume_from=None) is None
    assert choose_checkpoint(theirs, tmp_path, "mine", resume_from=theirs) == theirs
    mine = make_checkpoint(tmp_path, "c2", 2, "mine")
    assert choose_checkpoint(None, tmp_path, "mine", resume_from=theirs) == mine  # a restart within the session
    partial = make_checkpoint(tmp_path, "c40", 40, "mine", whole=False)  # the disk filled up mid-copy
    assert latest_checkpoint(tmp_path) == theirs and latest_checkpoint(tmp_path, "mine") == mine
    assert partial.exists()


def test_retention_keeps_the_newest_and_the_best_by_validation(tmp_path):
    made = {i: make_checkpoint(tmp_path, f"c{i}", i, "s", val_dice=v)
            for i, v in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, None), (6, 0.65)]}
    partial = make_checkpoint(tmp_path, "c5b", 5, "s", whole=False)
    deleted = prune_checkpoints(tmp_path, keep_last=3)
    assert sorted(p.name for p in deleted) == ["c1", "c3", "c5b"]
    assert [p.exists() for p in made.values()] == [False, True, False, True, True, True] and not partial.exists()
    assert prune_checkpoints(tmp_path, keep_last=None) == []


# --- full and read-only disks --------------------------------------------------------------------------------

def test_state_files_on_a_full_disk(tmp_path, tiny_policy):
    with tmpfs(tmp_path / "small", size="1m") as disk:
        target = disk / "state.json"
        write_json_atomic(target, {"state": "running", "note": "x" * 100})
        ballast = fill(disk)
        with pytest.raises(OSError, match="No space left"):
            write_json_atomic(disk / "new.json", {"state": "failed"})
        assert sorted(p.name for p in disk.iterdir()) == ["ballast", "state.json"]  # no .tmp left behind
        # a session keeps its state in memory and writes the final one over the old file's bytes
        cfg = load_config(TrainConfig, None, train_args(disk, tiny_policy)[1:])
        ballast.unlink()
        session = RunSession(cfg).open()
        try:
            fill(disk)
            session.finish("failed", error="disk full: writing the checkpoint of iteration 3 to ...")
        finally:
            session.close()
        state = read_json(disk / "r" / RUN_STATE)
        assert state["state"] == "failed" and state["error"].startswith("disk full")
        assert not [p for p in (disk / "r").rglob("*.tmp")]


def test_a_read_only_run_dir_is_one_line_naming_it(tmp_path, tiny_policy, capsys, ray_starts):
    with tmpfs(tmp_path / "ro", read_only=True) as disk:
        assert main(train_args(disk / "runs", tiny_policy)) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"rl-seg train: error: run_dir: {disk} is on a read-only file system (got '{disk / 'runs'}')"
        assert not ray_starts


# --- remote code -------------------------------------------------------------------------------------------

@register_policy("remote-code-probe")
class RemoteCodeProbe(DefaultSegModel):
    """Stands for a policy class whose checkpoints carry remote code: records what from_pretrained was given."""

    received: dict = {}

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.received = dict(kwargs)
        return DefaultSegModel(DefaultModelConfig.tiny())


@pytest.fixture()
def remote_policy(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.XModel"}}))
    (folder / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    (folder / "rl_seg_policy.json").write_text(json.dumps({"policy": "remote-code-probe"}))
    return folder


def test_remote_code_is_refused_unless_trusted(remote_policy, tmp_path, capsys):
    assert issubclass(RemoteCodeProbe, SegPolicy)
    with pytest.raises(RemoteCodeError, match=r"auto_map.*policy.trust_remote_code=true .*--trust-remote-code"):
        load_policy(remote_policy)
    RemoteCodeProbe.received = {}
    load_policy(remote_policy, trust_remote_code=True)
    assert RemoteCodeProbe.received == {"trust_remote_code": True}
    assert main(train_args(tmp_path / "runs", remote_policy)) == 2
    assert "policy.trust_remote_code: " in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(["eval", "--policy", str(remote_policy), "--data", "drive-sample", "-q"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


# --- Ray addresses -----------------------------------------------------------------------------------------

def test_a_dashboard_address_maps_to_the_gcs_address_head_env_gives(monkeypatch):
    monkeypatch.delenv("RL_SEG_GCS_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"^ray_address: http://127.0.0.1:8265 is a dashboard .* GCS address"):
        cluster_address("http://127.0.0.1:8265")
    monkeypatch.setenv("RL_SEG_GCS_ADDRESS", "127.0.0.1:6379")
    assert cluster_address("http://127.0.0.1:8265") == "127.0.0.1:6379"
    assert cluster_address("10.0.0.5:6379") == "10.0.0.5:6379" and cluster_address(None) is None

