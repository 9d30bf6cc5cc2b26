"""Ray's job API, the way rl-seg uses it: submit a training run, list and stop jobs.

Shared by ``rl-seg submit`` (the command line) and the status service's control endpoint, so both hand the
job the same entry point, runtime environment and metadata. Ray's ``JobSubmissionClient`` adds the cluster's
bearer token itself when token authentication is on (``RAY_AUTH_MODE=token``, the token from ``RAY_AUTH_TOKEN``
or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import os
import re
import shlex
import time
import uuid
from pathlib import Path

from ..ray_env import ensure_token_auth
from ..run_files import SUBMISSION_ENV

__all__ = ["job_client", "submit_training", "submit_when_an_agent_is_up", "list_rl_seg_jobs", "dashboard_url", "DEFAULT_DASHBOARD",
           "WORKING_DIR_EXCLUDES"]

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
#: Never uploaded with the working dir: environments, run outputs and VCS data can be gigabytes.
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "runs/", "sweeps/", ".whl/", ".gpu_*/", "**/__pycache__/",
                        ".pytest_cache/", ".hypothesis/"]


def dashboard_url(address: str | None) -> str:
    """The dashboard's HTTP address for a Ray address (``http://host:8265``; a bare host:port gets http://);
    without one, $RAY_API_SERVER_ADDRESS (Ray's variable for the job API; cluster/local.sh's head.env sets it),
    else $RAY_ADDRESS when it is an HTTP address (as for `ray job submit`), else the local default."""
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    address = address or (env if env.startswith(("http://", "https://")) else DEFAULT_DASHBOARD)
    return address if re.match(r"^https?://", address) else f"http://{address}"


def job_client(address: str | None):
    ensure_token_auth()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_url(address))


def submit_training(client, config_path: Path, *, run_dir: Path, name: str, overrides: list[str] = (),
                    working_dir: Path | None = None, python: str = "python", env: dict | None = None,
                    submission_id: str | None = None, verbose: bool = False) -> str:
    """Submit ``rl-seg train`` as a Ray job; the run folder is ``run_dir/name``, which must be a path the
    cluster's head node can write and the status service can read (shared storage on a real cluster).
    ``verbose``: the job's log (``--follow``) also carries what otherwise goes to the run folder's logs/."""
    submission_id = submission_id or f"rl-seg-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    args = ["--config", str(config_path), f"run_dir={run_dir}", f"name={name}", *overrides]
    entrypoint = f"{python} -m rl_seg.cli {'--verbose ' if verbose else ''}train " + " ".join(
        shlex.quote(a) for a in args)
    runtime_env: dict = {"env_vars": {SUBMISSION_ENV: submission_id, "RAY_AUTH_MODE": "token", **(env or {})}}
    if working_dir is not None:
        runtime_env.update(working_dir=str(working_dir), excludes=WORKING_DIR_EXCLUDES)
    return submit_when_an_agent_is_up(client, entrypoint=entrypoint, submission_id=submission_id,
                                      runtime_env=runtime_env,
                                      metadata={"rl_seg_run": name, "rl_seg_run_dir": str(run_dir)})


#: How long a submission waits for the head's job agent. Right after `ray start` (or on a loaded head) the job
#: API answers 500 "No available agent to submit job, please try again later" until the agent registers.
AGENT_WAIT_S = 60.0


def submit_when_an_agent_is_up(client, wait_s: float = AGENT_WAIT_S, **job) -> str:
    """``client.submit_job(**job)``, asked again while Ray says no job agent is available yet; any other refusal,
    or the agent still missing after ``wait_s``, is raised as Ray gave it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent to submit job" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def list_rl_seg_jobs(client) -> dict[str, dict]:
    """Jobs that rl-seg submitted, by submission id: status, entry point, start/end times."""
    jobs = {}
    for job in client.list_jobs():
        if not job.submission_id or "rl_seg_run" not in (job.metadata or {}):
            continue
        jobs[job.submission_id] = {"submission_id": job.submission_id, "status": str(job.status.value),
                                   "run": job.metadata.get("rl_seg_run"), "entrypoint": job.entrypoint,
                                   "message": job.message, "start_time": job.start_time, "end_time": job.end_time}
    return jobs
