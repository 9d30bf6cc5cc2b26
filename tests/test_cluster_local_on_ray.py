"""The operator's path, as the README gives it, with real processes on loopback: start a local head node
(cluster/local.sh, token authentication on), submit a tiny training run as a Ray job (cluster/submit, which
wraps `ray job submit`), watch it through the status service (`rl-seg serve`, a real uvicorn server) and the
Ray metrics endpoint the dashboard reads, stop a second run through the service's token-guarded control
endpoint, restart the service, check the dashboard API wants the token, run the service as an actor inside the
cluster, stop the head.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel
from rl_seg.ray_env import auth_token

pytestmark = [pytest.mark.ray, pytest.mark.scenario]

REPO = Path(__file__).resolve().parents[1]
TOKEN = "e2e-control-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, timeout_s: float, what: str, every: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node of our own (its own ports, state folder and process group), stopped at the end."""
    state = tmp_path_factory.mktemp("head")
    env = {**os.environ, "RL_SEG_CLUSTER_STATE": str(state), "RL_SEG_RAY_PORT": str(free_port()),
           "RL_SEG_DASHBOARD_PORT": str(free_port()), "RL_SEG_METRICS_PORT": str(free_port()),
           "RL_SEG_NUM_CPUS": "4", "RL_SEG_VENV": str(Path(sys.executable).parent.parent)}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run([str(REPO / "cluster" / "local.sh"), "start"], env=env, capture_output=True,
                             text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    head = dict(re.findall(r"export (\w+)=(\S+)", (state / "head.env").read_text()))
    yield {"env": env, "head": head, "state": state, "dashboard_port": int(env["RL_SEG_DASHBOARD_PORT"])}
    stopped = subprocess.run([str(REPO / "cluster" / "local.sh"), "stop"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not port_open(int(env["RL_SEG_DASHBOARD_PORT"])), "the dashboard still answers after stop"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    policy = DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(root / "policy")
    config = {
        "iterations": 2, "seed": 1, "checkpoint_every": 1, "val_every": 1, "progress": False,
        "data": {"datasets": ["drive-sample", "arcade-sample"], "image_size": 48, "images_per_iteration": 2,
                 "val_limit": 1},
        "policy": {"name": str(policy), "lora": {"dropout": 0.0}},
        "rollout": {"num_workers": 1, "num_cpus": 0.25, "samples_per_image": 2},
        "reward": {"num_actors": 1, "num_cpus": 0.25},
        "learner": {"num_workers": 1, "cpus_per_worker": 0.5},
        "ppo": {"lr": 5e-3, "warmup_steps": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "config_dict": config, "runs": root / "runs"}


class Service:
    """`rl-seg serve` as its own process, the way an operator runs it."""

    def __init__(self, runs: Path, dashboard: str, env: dict):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rl_seg.cli", "serve", "--runs", str(runs), "--port", str(self.port),
             "--ray-address", dashboard, "--python", sys.executable],
            env={**env, "RL_SEG_SERVICE_TOKEN": TOKEN}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_for(self._up, 60, "the status service to answer", every=0.5)
        except BaseException:
            self.proc.kill()  # never leave a server behind
            raise

    def _up(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"rl-seg serve exited: {self.proc.stdout.read()}")
        try:
            return requests.get(self.url + "/healthz", timeout=30).ok
        except requests.ConnectionError:  # not listening yet
            return False

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=30, **kw)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)


def listening(pids) -> set[str]:
    """The addresses the given processes accept connections on."""
    return set(listeners(pids))


def listeners(pids) -> dict[str, list[str]]:
    """Address -> the processes listening on it ("pid name port"), to name the culprit when one is not loopback."""
    import psutil

    found: dict[str, list[str]] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for c in process.net_connections(kind="inet"):
                if c.status == "LISTEN":
                    found.setdefault(c.laddr.ip, []).append(f"{pid} {process.name()} :{c.laddr.port}")
        except psutil.Error:
            continue
    return found


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def test_head_env_and_rl_seg_agree_on_the_address_and_the_head_listens_on_loopback_only(cluster):
    import psutil

    env, head = cluster["env"], cluster["head"]
    gcs = head["RL_SEG_GCS_ADDRESS"]
    assert head["RAY_ADDRESS"] == gcs  # what ray.init, `rl-seg train` and `ray status` join
    join = [sys.executable, "-c", "from rl_seg.ray_env import init_ray; print(init_ray().gcs_address)"]
    for given in ({"RAY_ADDRESS": head["RAY_ADDRESS"]},  # head.env sourced, as the README says
                  {"RAY_ADDRESS": head["RAY_API_SERVER_ADDRESS"], "RL_SEG_GCS_ADDRESS": gcs}):  # the dashboard's
        joined = subprocess.run(join, env={**env, "PYTHONPATH": str(REPO), **given}, capture_output=True, text=True,
                                timeout=120)
        assert joined.returncode == 0 and joined.stdout.strip() == gcs, joined.stderr[-2000:]
    pgid = int(head["RL_SEG_HEAD_PGID"])
    pids = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == pgid]
    addresses = listening(pids)
    assert addresses and addresses <= LOOPBACK, addresses


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_local_cluster_submit_watch_stop(cluster, tiny_setup):
    env, head = cluster["env"], cluster["head"]
    dashboard = head["RAY_API_SERVER_ADDRESS"]
    assert dashboard == f"http://127.0.0.1:{cluster['dashboard_port']}"
    runs = tiny_setup["runs"]

    # 1. cluster/submit (ray job submit with the working dir, runtime env and token) - followed to the end
    submit = subprocess.Popen(
        [str(REPO / "cluster" / "submit"), "--config", str(tiny_setup["config"]), "--run-dir", str(runs),
         "--name", "short", "--python", sys.executable, "--follow"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # 2. the status service, started while the job runs
    service = Service(runs, dashboard, env)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        # 3. a second, long run submitted through the service's control endpoint: token required
        body = {"name": "long", "base": None, "config": {**tiny_setup["config_dict"], "iterations": 500,
                                                         "checkpoint_every": 2, "val_every": 100}}
        assert requests.post(service.url + "/runs", json=body).status_code == 401
        assert requests.post(service.url + "/runs", json=body, headers={"Authorization": "Bearer no"}).status_code == 403
        created = requests.post(service.url + "/runs", json=body, headers=auth)
        assert created.status_code == 201, created.text
        long_job = created.json()["submission_id"]
        # the same name again, before the first job has made its run folder: refused, naming that job
        again = requests.post(service.url + "/runs", json=body, headers=auth)
        assert again.status_code == 409 and long_job in again.json()["detail"], again.text

        out, _ = submit.communicate(timeout=900)
        assert submit.returncode == 0, out[-3000:]
        assert re.search(r"submitted job (\S+)", out) and "SUCCEEDED" in out
        assert f"{dashboard}/#/jobs/" in out  # the dashboard URL is printed

        short = service.get("/runs/short").json()
        assert short["state"] == "succeeded" and short["job"]["status"] == "SUCCEEDED", short
        assert short["iteration"] == 2 and short["adapter_version"] == 2
        history = service.get("/runs/short/metrics", params={"keys": "reward,val/dice"}).json()
        assert [r["iteration"] for r in history] == [1, 2] and all("reward" in r for r in history)
        assert [c["iteration"] for c in service.get("/runs/short/checkpoints").json() if not c["final"]] == [1, 2]
        health = service.get("/runs/short/health").json()
        assert health["rollout"][0]["alive"] and health["reward_pool"]["scored"] == 2 * 2 * 2
        assert service.get("/runs/short/sample.png").content[:4] == b"\x89PNG"

        # 4. the live run: its gauges reach Ray's metrics endpoint (what the dashboard's Grafana panels read)
        wait_for(lambda: (service.get("/runs/long").json().get("iteration") or 0) >= 2, 600, "the long run to iterate")
        metrics_url = head["RL_SEG_METRICS_URL"]
        exported = wait_for(lambda: [line for line in requests.get(metrics_url, timeout=10).text.splitlines()
                                     if line.startswith("ray_rl_seg_reward{") and 'run="long"' in line], 120,
                            "the rl_seg_reward gauge of run 'long' on the metrics endpoint")
        assert exported
        long_run = service.get("/runs/long").json()
        assert long_run["state"] == "running" and long_run["job"]["status"] == "RUNNING"

        # 5. stop it through the control endpoint, forced (Ray's job API stops the job: SIGTERM to its driver):
        # token required; it is recorded as "stopped" (not "failed"), with the command that resumes it
        assert requests.post(service.url + "/runs/long/stop", json={}).status_code == 401
        stopped = requests.post(service.url + "/runs/long/stop", json={"reason": "e2e", "force": True}, headers=auth)
        assert stopped.status_code == 200 and stopped.json()["job_stopped"], stopped.text
        final = wait_for(lambda: (lambda r: r if r["job"] and r["job"]["status"] == "STOPPED" else None)(
            service.get("/runs/long").json()), 300, "the stopped run's job to end")
        assert final["state"] == "stopped" and final["iteration"] < 500 and final["error"] is None, final
        assert final["resume_command"] == f"rl-seg train --resume run_dir={runs.resolve()} name=long"
        kept = [c["iteration"] for c in service.get("/runs/long/checkpoints").json()]
        assert final["last_checkpoint"] == max(kept) and len(kept) <= 3  # keep_checkpoints
        jobs = {j["submission_id"]: j["status"] for j in service.get("/jobs").json()}
        assert jobs[long_job] == "STOPPED" and len(jobs) == 2

        # 6. a restarted service shows the same runs
        before = service.get("/runs").json()
        service.stop()
        service = Service(runs, dashboard, env)
        assert service.get("/runs").json() == before

        # 7. the dashboard's API (what its Jobs page shows) wants Ray's token too
        assert requests.get(f"{dashboard}/api/jobs/", timeout=30).status_code in (401, 403)
        listed = requests.get(f"{dashboard}/api/jobs/", timeout=30,
                              headers={"Authorization": f"Bearer {auth_token()}"})
        assert listed.status_code == 200 and long_job in listed.text

        # 8. the service as a detached actor inside the cluster shows the same runs
        port = free_port()
        inside = subprocess.run(
            [sys.executable, "-m", "rl_seg.cli", "serve", "--in-cluster", "--runs", str(runs), "--port", str(port),
             "--ray-address", dashboard],
            env={**env, "RL_SEG_GCS_ADDRESS": head["RL_SEG_GCS_ADDRESS"], "RL_SEG_SERVICE_TOKEN": TOKEN},
            capture_output=True, text=True, timeout=180)
        assert inside.returncode == 0, inside.stdout + inside.stderr
        assert f"http://127.0.0.1:{port}" in inside.stdout
        assert requests.get(f"http://127.0.0.1:{port}/runs", timeout=30).json() == before
    finally:
        service.stop()
        if submit.poll() is None:
            submit.kill()
