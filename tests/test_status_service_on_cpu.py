"""The status service over run and sweep folders written by the run's own writers, served by a real uvicorn
server on 127.0.0.1 (no Ray here: the job API part is in test_cluster_local_on_ray.py).
"""

import http.client
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, settings

from rl_seg.run_files import STOP_REQUEST, owner, write_json_atomic, write_sample_overlay
from rl_seg.run_logging import RunLogger
from rl_seg.service import ServiceSettings, StatusServer, create_app, load_or_create_token

TOKEN = "test-token-123"


def make_run(root: Path, name: str, state: str, iterations: int = 3, pid: int | None = None) -> Path:
    path = root / name
    logger = RunLogger(path, tensorboard=False, progress=False)
    for it in range(1, iterations + 1):
        logger.log({"iteration": it, "adapter_version": it, "reward": 0.1 * it, "reward/dice": 0.5,
                    "kl_ref": float("nan"), "time/rollout": 0.2, "time/learn": 0.3, "batch_ids": ["a"]})
    logger.close()
    (path / "config.yaml").write_text(yaml.safe_dump({"name": name, "iterations": iterations}))
    write_json_atomic(path / "run_state.json", {**owner(), "state": state, "started": 1.0, "iterations": iterations})
    if pid is not None:  # pretend another driver process wrote it
        state_file = path / "run_state.json"
        write_json_atomic(state_file, {**json.loads(state_file.read_text()), "pid": pid})
    write_json_atomic(path / "health.json", {
        "iteration": iterations, "adapter_version": iterations,
        "learner": {"world_size": 2, "starts": 1},
        "rollout": [{"index": 0, "alive": True, "restarts": 1}, {"index": 1, "alive": False, "restarts": 0}],
        "reward_pool": {"actors": 2, "scored": 24, "failed": 1, "timeouts": 0, "actor_restarts": 0}})
    for it in (2, iterations):
        checkpoint = path / "ray_train" / name / f"checkpoint_{it:03d}"
        write_json_atomic(checkpoint / "checkpoint.json", {"iteration": it, "version": it})
        for part in ("trainer_state.pt", "value_head.pt", "adapter/adapter_config.json", "deepspeed/state"):
            (checkpoint / part).parent.mkdir(parents=True, exist_ok=True)
            (checkpoint / part).write_text("x")
    image = np.zeros((16, 16, 3), np.uint8)
    mask, gt = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    mask[4:8], gt[5:9] = True, True
    write_sample_overlay(path, image, mask, gt, None, {"image": "drive/01", "iteration": iterations})
    return path


@pytest.fixture()
def roots(tmp_path):
    runs, sweeps = tmp_path / "runs", tmp_path / "sweeps"
    make_run(runs, "done", "succeeded")
    make_run(runs, "live", "running")
    (runs / "not-a-run").mkdir()
    sweep = sweeps / "s1"
    make_run(sweep / "trials", "trial_abc", "succeeded", iterations=2)
    (sweep / "sweep.yaml").write_text("name: s1\n")
    (sweep / "trials.csv").write_text("trial,config/ppo.lr,best_val_dice,iterations,status\nabc,0.001,0.7,2,ok\n")
    (tmp_path / "secret.txt").write_text("outside the run folders")
    return runs, sweeps


@pytest.fixture()
def server(roots):
    runs, sweeps = roots
    srv = StatusServer(ServiceSettings(runs_root=runs, sweeps_root=sweeps, token=TOKEN), port=0).start()
    yield srv
    srv.stop()


def get(server, path, **kw):
    return requests.get(server.url + path, timeout=10, **kw)


def test_service_binds_loopback_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")


def test_runs_metrics_checkpoints_health_and_sample(server):
    runs = get(server, "/runs").json()
    assert [r["id"] for r in runs] == ["done", "live"]  # "not-a-run" holds nothing a run writes
    done = get(server, "/runs/done").json()
    assert done["state"] == "succeeded" and done["iteration"] == 3 and done["adapter_version"] == 3
    assert done["last_metrics"]["reward"] == pytest.approx(0.3) and done["last_metrics"]["kl_ref"] is None
    assert done["timings"] == {"rollout": 0.2, "learn": 0.3}

    history = get(server, "/runs/done/metrics", params={"keys": "reward", "since": 1}).json()
    assert history == [{"iteration": 2, "reward": pytest.approx(0.2)}, {"iteration": 3, "reward": pytest.approx(0.3)}]

    checkpoints = get(server, "/runs/done/checkpoints").json()
    assert [c["iteration"] for c in checkpoints] == [2, 3]
    assert get(server, f"/runs/done/files/{checkpoints[-1]['path']}/checkpoint.json").json()["iteration"] == 3

    health = get(server, "/runs/done/health").json()
    assert [w["alive"] for w in health["rollout"]] == [True, False] and health["reward_pool"]["failed"] == 1

    png = get(server, "/runs/done/sample.png")
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert get(server, "/runs/done/sample").json()["image"] == "drive/01"
    assert "iterations: 3" in get(server, "/runs/done/config").text
    assert get(server, "/runs/nope").status_code == 404
    assert "/runs/{run_id}/health" in get(server, "/openapi.json").json()["paths"]
    assert get(server, "/docs").status_code == 200


def test_a_run_whose_driver_died_is_shown_lost(roots, server):
    runs, _ = roots
    gone = subprocess.Popen(["true"])
    gone.wait()
    make_run(runs, "crashed", "running", pid=gone.pid)
    assert get(server, "/runs/crashed").json()["state"] == "lost"
    assert get(server, "/runs/live").json()["state"] == "running"  # this process wrote it and is alive


@pytest.mark.parametrize("path", [
    "/runs/done/files/../../secret.txt",
    "/runs/done/files/..%2F..%2Fsecret.txt",
    "/runs/done/files/%2e%2e/%2e%2e/secret.txt",
    "/runs/done/files//etc/passwd",
    "/runs/done/files/%2Fetc%2Fpasswd",
    "/runs/done/files/link/secret.txt",
    "/runs/done/files/escape.txt",
    "/runs/..%2F/files/secret.txt",
    "/runs/../secret.txt",
    "/runs/%2e%2e/config",
    "/tune/s1/files/../../secret.txt",
    "/tune/..%2Fs1/files/sweep.yaml",
    "/runs/done/files/config.yaml%00.png",
])
def test_never_serves_files_outside_the_run_folders(roots, server, path):
    runs, _ = roots
    outside = runs.parent / "secret.txt"
    (runs / "done" / "link").mkdir(exist_ok=True)
    if not (runs / "done" / "escape.txt").exists():
        (runs / "done" / "escape.txt").symlink_to(outside)  # a link inside a run folder pointing out of it
    # http.client sends the path exactly as written (no client-side normalisation of "..")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    assert response.status in (404, 422), (path, response.status)
    assert b"outside the run folders" not in body and b"root:" not in body


def test_control_endpoints_need_the_token(roots, server):
    runs, _ = roots
    stop = server.url + "/runs/live/stop"
    assert requests.post(stop, json={}).status_code == 401
    assert requests.post(stop, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert not (runs / "live" / STOP_REQUEST).exists()
    reply = requests.post(stop, json={"reason": "test"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200 and reply.json()["requested"] is True
    assert json.loads((runs / "live" / STOP_REQUEST).read_text())["reason"] == "test"
    # a finished run cannot be stopped; it says why
    done = requests.post(server.url + "/runs/done/stop", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert done.status_code == 409 and "succeeded" in done.json()["detail"]


def test_submit_validates_the_config_and_needs_a_ray_address(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.post(server.url + "/runs", json={"name": "x"}).status_code == 401
    bad = requests.post(server.url + "/runs", json={"name": "x", "overrides": ["ppo.advantage=nope"]}, headers=auth)
    assert bad.status_code == 422 and "ppo.advantage" in bad.json()["detail"]
    bad = requests.post(server.url + "/runs", json={"name": "x", "config": {"rollout": {"num_workers": "many"}}},
                        headers=auth)
    assert bad.status_code == 422 and "num_workers" in bad.json()["detail"]
    assert requests.post(server.url + "/runs", json={"name": "done"}, headers=auth).status_code == 409
    assert requests.post(server.url + "/runs", json={"name": "../x"}, headers=auth).status_code == 422
    no_ray = requests.post(server.url + "/runs", json={"name": "new"}, headers=auth)
    assert no_ray.status_code == 409 and "Ray address" in no_ray.json()["detail"]


def test_without_a_token_the_control_endpoints_are_closed(roots):
    runs, _ = roots
    srv = StatusServer(ServiceSettings(runs_root=runs, token=None), port=0).start()
    try:
        reply = requests.post(srv.url + "/runs/live/stop", json={}, headers={"Authorization": "Bearer anything"})
        assert reply.status_code == 403
        assert not (runs / "live" / STOP_REQUEST).exists()
    finally:
        srv.stop()


def test_a_restarted_service_shows_the_same_runs(roots, server):
    runs, sweeps = roots
    before = get(server, "/runs").json()
    server.stop()
    again = StatusServer(ServiceSettings(runs_root=runs, sweeps_root=sweeps, token=TOKEN), port=0).start()
    try:
        assert requests.get(again.url + "/runs").json() == before
    finally:
        again.stop()


def test_sweeps_and_trials(server):
    assert get(server, "/tune").json() == ["s1"]
    sweep = get(server, "/tune/s1").json()
    assert sweep["finished"] and sweep["table"][0]["best_val_dice"] == "0.7"
    assert sweep["trials"][0]["id"] == "trial_abc" and sweep["trials"][0]["state"] == "succeeded"
    assert sweep["trials"][0]["table"]["trial"] == "abc"
    assert get(server, "/tune/nope").status_code == 404


def test_token_file_is_created_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv("RL_SEG_SERVICE_TOKEN", raising=False)
    path = tmp_path / "runs" / ".service_token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_or_create_token(path) == token  # the same token on restart


# --- every operation of the OpenAPI spec under generated input: no 500s --------------------------------------
_FUZZ_ROOT = Path(tempfile.mkdtemp(prefix="rl-seg-fuzz-"))
make_run(_FUZZ_ROOT / "runs", "done", "succeeded")
make_run(_FUZZ_ROOT / "runs", "live", "running")
(_FUZZ_ROOT / "sweeps" / "s1").mkdir(parents=True)
(_FUZZ_ROOT / "sweeps" / "s1" / "sweep.yaml").write_text("name: s1\n")
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(ServiceSettings(
    runs_root=_FUZZ_ROOT / "runs", sweeps_root=_FUZZ_ROOT / "sweeps", token=TOKEN)))


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_on_generated_input(case):
    from schemathesis.checks import not_a_server_error

    # Random names almost never hit a real run: route half the cases to the existing ones, so the generated
    # query strings and bodies reach the code that reads run folders.
    for key, real in (("run_id", ("done", "live")), ("sweep_id", ("s1",))):
        generated = (case.path_parameters or {}).get(key)
        if generated is not None and len(str(generated)) % 2 == 0:
            case.path_parameters[key] = real[len(str(generated)) // 2 % len(real)]
    # with the token, so the control endpoints are exercised past authentication
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=[not_a_server_error])
    for stray in (_FUZZ_ROOT / "runs").glob("*/" + STOP_REQUEST):
        stray.unlink()


# --- a defensive service (issue 16) --------------------------------------------------------------------------

def test_bad_run_entries_are_listed_with_their_problem_and_links_out_of_the_root_ignored(roots, server, tmp_path):
    runs, _ = roots
    bad = make_run(runs, "bad", "running")
    state = json.loads((bad / "run_state.json").read_text())
    write_json_atomic(bad / "run_state.json", {**state, "pid": "abc", "iterations": "many"})
    with (bad / "metrics.jsonl").open("a") as fh:
        fh.write("[1, 2]\n")
    worse = make_run(runs, "worse", "running")
    (worse / "run_state.json").write_text("[]\n")
    elsewhere = make_run(tmp_path / "elsewhere", "outside", "succeeded")
    (runs / "escape").symlink_to(elsewhere, target_is_directory=True)

    listing = get(server, "/runs")
    assert listing.status_code == 200, listing.text
    by_id = {r["id"]: r for r in listing.json()}
    assert sorted(by_id) == ["bad", "done", "live", "worse"]  # the link out of the runs root is not a run
    assert by_id["done"]["problem"] is None and by_id["done"]["state"] == "succeeded"
    assert "pid is 'abc'" in by_id["bad"]["problem"] and "iterations is 'many'" in by_id["bad"]["problem"]
    assert by_id["bad"]["iteration"] == 3 and by_id["bad"]["last_metrics"]["reward"] == pytest.approx(0.3)
    assert by_id["worse"]["state"] == "unknown" and "run_state.json is not a JSON object" in by_id["worse"]["problem"]
    assert [r["iteration"] for r in get(server, "/runs/bad/metrics").json()] == [1, 2, 3]
    assert get(server, "/runs/escape").status_code == 404


def test_the_token_is_checked_before_the_body_is_read_and_bodies_are_capped(server):
    # 300 MB announced, 64 KiB sent (what loopback buffers hold, so the send cannot hit the answer's close): without
    # the token the answer comes before the rest is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/runs")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(300 << 20))
    conn.endheaders()
    conn.send(b" " * (64 << 10))
    response = conn.getresponse()
    assert response.status == 401 and b"missing bearer token" in response.read()
    conn.close()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = requests.post(server.url + "/runs", data=b"{" + b" " * (2 << 20) + b"}", headers=auth, timeout=30)
    assert big.status_code == 413
    chunked = requests.post(server.url + "/runs", data=(b" " * (256 << 10) for _ in range(8)), headers=auth,
                            timeout=30)
    assert chunked.status_code == 413  # no Content-Length: counted as it is read, refused past the limit
    assert requests.post(server.url + "/runs", data=b"x" * 10, headers={"Authorization": "Bearer no"}).status_code == 403


def test_submit_refuses_bad_values_naming_the_field_and_names_in_use_naming_the_holder(roots, server, tmp_path):
    from rl_seg.run_lock import RunLock

    runs, _ = roots
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = requests.post(server.url + "/runs", json={"name": "x", "overrides": ["rollout.num_workers=0"]}, headers=auth)
    assert bad.status_code == 422 and bad.json()["detail"] == "config: rollout.num_workers: must be >= 1 (got 0)"
    lock = RunLock(runs / "busy")
    lock.acquire()
    try:
        busy = requests.post(server.url + "/runs", json={"name": "busy"}, headers=auth)
        assert busy.status_code == 409 and f"in use by pid {os.getpid()}" in busy.json()["detail"]
    finally:
        lock.release()
    # remote code only from the folders the service was started with
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "m.M"}}))
    body = {"name": "rc", "config": {"policy": {"name": str(remote), "trust_remote_code": True}}}
    refused = requests.post(server.url + "/runs", json=body, headers=auth)
    assert refused.status_code == 403 and "--allow-policy" in refused.json()["detail"]
    untrusted = requests.post(server.url + "/runs", json={**body, "config": {"policy": {"name": str(remote)}}},
                              headers=auth)
    assert untrusted.status_code == 422 and "policy.trust_remote_code" in untrusted.json()["detail"]
    allowing = StatusServer(ServiceSettings(runs_root=runs, token=TOKEN, allowed_policies=[tmp_path]), port=0).start()
    try:
        passed = requests.post(allowing.url + "/runs", json=body, headers=auth)
        assert passed.status_code == 409 and "Ray address" in passed.json()["detail"]  # past every check
    finally:
        allowing.stop()


def test_an_interrupted_run_shows_how_to_resume_and_cannot_be_stopped(roots, server):
    runs, _ = roots
    path = make_run(runs, "cut", "running")
    state = json.loads((path / "run_state.json").read_text())
    write_json_atomic(path / "run_state.json", {**state, "state": "interrupted", "reason": "SIGINT received",
                                                "last_checkpoint": {"iteration": 3, "path": "x"},
                                                "resume_command": "rl-seg train --resume run_dir=/r name=cut"})
    cut = get(server, "/runs/cut").json()
    assert cut["state"] == "interrupted" and cut["last_checkpoint"] == 3 and cut["reason"] == "SIGINT received"
    assert cut["resume_command"].startswith("rl-seg train --resume")
    stop = requests.post(server.url + "/runs/cut/stop", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert stop.status_code == 409 and "interrupted" in stop.json()["detail"]
    # A forced stop signals the driver only: the learner may complete one more checkpoint after the driver wrote
    # its end. The resume takes the newest whole one, so the service shows that one; a half-written one is not it.
    from test_run_integrity_on_cpu import make_checkpoint

    make_checkpoint(path, "c4", 4, "s")
    make_checkpoint(path, "c5", 5, "s", whole=False)
    assert get(server, "/runs/cut").json()["last_checkpoint"] == 4


def test_a_submission_waits_for_the_job_agent_and_passes_other_refusals_on():
    """Right after `ray start` Ray's job API answers "No available agent" until the head's agent registers: the
    submission asks again (bounded), while any other refusal reaches the caller at once, as Ray worded it."""
    from rl_seg.service.jobs import submit_when_an_agent_is_up

    class JobApi:  # answers as Ray's JobSubmissionClient does, from a script of outcomes
        def __init__(self, outcomes):
            self.outcomes, self.calls = list(outcomes), []

        def submit_job(self, **job):
            self.calls.append(job)
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

    no_agent = RuntimeError("Request failed with status code 500: No available agent to submit job, please try "
                            "again later..")
    api = JobApi([no_agent, no_agent, "rl-seg-x"])
    assert submit_when_an_agent_is_up(api, wait_s=30, submission_id="rl-seg-x") == "rl-seg-x"
    assert [c["submission_id"] for c in api.calls] == ["rl-seg-x"] * 3
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_when_an_agent_is_up(JobApi([no_agent] * 5), wait_s=0.5, submission_id="y")
    other = JobApi([RuntimeError("Request failed with status code 400: Job with submission_id y already exists"),
                    "never asked"])
    with pytest.raises(RuntimeError, match="already exists"):
        submit_when_an_agent_is_up(other, wait_s=30, submission_id="y")
    assert len(other.calls) == 1
