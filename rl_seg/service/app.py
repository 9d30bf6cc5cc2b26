"""The status service (``rl-seg serve``): a FastAPI app over the run and sweep folders and Ray's job API.

Read endpoints are open to whoever can reach the port, which is 127.0.0.1 unless the operator binds it
elsewhere; the control endpoints (stop a run, submit a run) need ``Authorization: Bearer <token>``, checked
before the request body is read, and a body is at most ``max_body_bytes`` (``rl_seg.service.guard``). A
submitted config passes the same validation as ``rl-seg train`` (422 naming the field), a run name in use is
refused naming its holder (409), and a policy with remote code is accepted only from the folders the service
was started with (``--allow-policy``). OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from ..run_files import read_json, request_stop, write_json_atomic
from ..run_lock import describe_holder, lock_holder
from .guard import MAX_BODY_BYTES, ControlGuard, token_problem
from .jobs import list_rl_seg_jobs, submit_training
from .store import NAME_PATTERN, NotFound, RunStore

__all__ = ["create_app", "ServiceSettings"]

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
Number = float | int | bool | None


class ServiceSettings(BaseModel):
    runs_root: Path = Field(description="folder whose sub-folders are run folders (the train config's run_dir)")
    sweeps_root: Path | None = Field(None, description="folder whose sub-folders are sweeps (the sweep's out_dir)")
    token: str | None = Field(None, description="bearer token of the control endpoints (None: they answer 403)")
    ray_address: str | None = Field(None, description="Ray dashboard address for the job API (None: no jobs)")
    python: str = Field("python", description="python the submitted job runs (on the cluster's head node)")
    jobs_cache_s: float = Field(2.0, description="seconds a job-API listing is reused")
    max_body_bytes: int = Field(MAX_BODY_BYTES, description="largest request body accepted (413 beyond)")
    allowed_policies: list[Path] = Field(default_factory=list, description="folders (and what is under them) whose "
                                         "remote code submitted runs may run with policy.trust_remote_code=true")


class JobInfo(BaseModel):
    submission_id: str
    status: str
    run: str | None = None
    entrypoint: str | None = None
    message: str | None = None
    start_time: int | None = None
    end_time: int | None = None


class RunSummary(BaseModel):
    id: str
    state: str = Field(description="starting, running, succeeded, failed, stopped (through this service), "
                                   "interrupted (SIGINT/SIGTERM), lost (driver gone without a word) or unknown")
    job: JobInfo | None = Field(None, description="the Ray job carrying the run, when it was submitted as one")
    iteration: int | None = None
    iterations: int | None = None
    adapter_version: int | None = None
    started: float | None = None
    updated: float | None = None
    ended: float | None = None
    error: str | None = None
    reason: str | None = Field(None, description="why a stopped or interrupted run ended")
    submission_id: str | None = None
    last_checkpoint: int | None = Field(None, description="iteration of the newest checkpoint when the run ended")
    resume_command: str | None = Field(None, description="the command that continues an unfinished run")
    last_metrics: dict[str, Number] = Field(default_factory=dict)
    timings: dict[str, Number] = Field(default_factory=dict, description="seconds per phase, last iteration")
    problem: str | None = Field(None, description="what could not be read in the run folder (values left out)")


class Checkpoint(BaseModel):
    iteration: int | None
    adapter_version: int | None
    path: str = Field(description="relative to the run folder; download files through /runs/{id}/files/...")
    final: bool = False


class StopRequest(BaseModel):
    reason: str = Field("stopped through the status service", max_length=500)
    force: bool = Field(False, description="also stop the Ray job now (no final checkpoint) instead of ending "
                                           "gracefully after the current iteration")


class StopReply(BaseModel):
    run: str
    requested: bool
    job_stopped: bool | None = None


class SubmitRequest(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="run name: the run folder is runs_root/name")
    base: str | None = Field("quickstart", pattern=NAME_PATTERN,
                             description="a shipped config (rl_seg/configs/<base>.yaml) the rest overrides")
    config: dict[str, Any] = Field(default_factory=dict, description="train config fields (nested mapping)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides, applied last")


class SubmitReply(BaseModel):
    run: str
    submission_id: str
    config: str = Field(description="the resolved config file the job runs")


class SweepSummary(BaseModel):
    id: str
    finished: bool
    table: list[dict[str, Any]]
    trials: list[dict[str, Any]]
    best_config: str | None
    plot: str | None


def create_app(settings: ServiceSettings) -> FastAPI:
    store = RunStore(settings.runs_root, settings.sweeps_root)
    app = FastAPI(title="rl-seg status service", version="1", description=__doc__)
    app.add_middleware(ControlGuard, token=settings.token, max_body_bytes=settings.max_body_bytes)
    bearer = HTTPBearer(auto_error=False)
    jobs_cache: dict[str, Any] = {"at": 0.0, "jobs": {}, "error": None, "client": None}

    def client():
        """One job client for the service's life: making one costs a round trip (Ray's version check)."""
        if jobs_cache.get("client") is None:
            from .jobs import job_client

            jobs_cache["client"] = job_client(settings.ray_address)
        return jobs_cache["client"]

    def jobs() -> dict[str, dict]:
        """Ray's view of the jobs; the service keeps answering (without it) when Ray is unreachable."""
        if settings.ray_address is None:
            return {}
        if time.monotonic() - jobs_cache["at"] > settings.jobs_cache_s:
            try:
                jobs_cache.update(jobs=list_rl_seg_jobs(client()), error=None)
            except Exception as exc:  # noqa: BLE001 - any failure of the job API is reported, not raised
                jobs_cache.update(error=f"{type(exc).__name__}: {exc}", client=None)
            jobs_cache["at"] = time.monotonic()
        return jobs_cache["jobs"]

    def authorized(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # ControlGuard has refused a bad token before the body was read; this keeps the endpoints guarded (and
        # documented as such in OpenAPI) whatever wraps the app.
        problem = token_problem(request.headers.get("authorization"), settings.token)
        if problem is not None:
            raise HTTPException(*problem, headers={"WWW-Authenticate": "Bearer"} if problem[0] == 401 else None)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    RunId = PathParam(description="run name (a folder under the runs root)", max_length=128)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        jobs()
        return {"ok": True, "runs_root": str(settings.runs_root), "sweeps_root": str(settings.sweeps_root),
                "ray_address": settings.ray_address, "job_api_error": jobs_cache["error"]}

    @app.get("/runs", response_model=list[RunSummary])
    def runs():
        listing = jobs()
        out = []
        for run_id in store.run_ids():
            try:
                out.append(store.run_summary(run_id, listing))
            except Exception as exc:  # noqa: BLE001 - one unreadable run is listed as such, not the end of the list
                out.append({"id": run_id, "state": "unknown", "problem": f"{type(exc).__name__}: {exc}"[:500]})
        return out

    @app.get("/runs/{run_id}", response_model=RunSummary)
    def run(run_id: str = RunId):
        return store.run_summary(run_id, jobs())

    @app.get("/runs/{run_id}/metrics", response_model=list[dict[str, Number]])
    def metrics(run_id: str = RunId,
                keys: str | None = Query(None, max_length=2000, description="comma-separated metric names"),
                since: int = Query(0, ge=0, le=10**9, description="only iterations after this one")):
        wanted = [k for k in keys.split(",") if k] if keys else None
        return store.metrics(run_id, wanted, since)

    @app.get("/runs/{run_id}/checkpoints", response_model=list[Checkpoint])
    def checkpoints(run_id: str = RunId):
        return store.checkpoints(run_id)

    @app.get("/runs/{run_id}/health")
    def health(run_id: str = RunId) -> dict[str, Any]:
        """Rollout actors (alive, restarts), reward pool (actors, scored, failed, timeouts, restarts), learners."""
        return store.health(run_id)

    @app.get("/runs/{run_id}/config", response_class=PlainTextResponse)
    def config(run_id: str = RunId):
        return store.config(run_id)

    @app.get("/runs/{run_id}/sample")
    def sample_info(run_id: str = RunId) -> dict[str, Any]:
        """Which image, iteration and adapter version the latest overlay shows (image at /sample.png)."""
        return store.sample(run_id)[1]

    @app.get("/runs/{run_id}/sample.png", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}})
    def sample_png(run_id: str = RunId):
        return FileResponse(store.sample(run_id)[0], media_type="image/png")

    @app.get("/runs/{run_id}/files/{relative:path}", response_class=FileResponse)
    def run_file(run_id: str = RunId, relative: str = PathParam(max_length=1000)):
        """Any file inside the run folder (curves.png, config.yaml, checkpoints); nothing outside it."""
        return FileResponse(store.file(run_id, relative))

    @app.post("/runs/{run_id}/stop", response_model=StopReply, dependencies=[Depends(authorized)])
    def stop(body: StopRequest, run_id: str = RunId):
        summary = store.run_summary(run_id, jobs())
        if summary["state"] not in ("starting", "running"):
            raise HTTPException(409, f"run {run_id!r} is {summary['state']}, not running")
        request_stop(store.run_path(run_id), body.reason)
        job_stopped = None
        if body.force:
            if not (summary["submission_id"] and settings.ray_address):
                raise HTTPException(409, f"run {run_id!r} is not a Ray job this service can reach: it will stop "
                                         "after its current iteration")
            try:
                job_stopped = bool(client().stop_job(summary["submission_id"]))
            except Exception as exc:  # noqa: BLE001
                raise HTTPException(502, f"the stop request is written; Ray's job API failed to stop the job: "
                                         f"{type(exc).__name__}: {exc}") from None
        return StopReply(run=run_id, requested=True, job_stopped=job_stopped)

    @app.post("/runs", response_model=SubmitReply, status_code=201, dependencies=[Depends(authorized)])
    def submit(body: SubmitRequest):
        from ..config import ConfigError, load_config, merge_trees, save_config
        from ..policy.base import remote_code
        from ..ppo.config import TrainConfig
        from ..validation import validate_train_config

        run_path = settings.runs_root / body.name
        holder = lock_holder(run_path)
        if holder is not None:
            raise HTTPException(409, f"run {body.name!r} is in use by {describe_holder(holder)}")
        if run_path.exists():
            raise HTTPException(409, f"run {body.name!r} exists already")
        tree: dict = {}
        if body.base:
            base = CONFIGS / f"{body.base}.yaml"
            if not base.is_file():
                raise HTTPException(422, f"base: no shipped config {body.base!r} (have: "
                                         f"{sorted(p.stem for p in CONFIGS.glob('*.yaml'))})")
            tree = yaml.safe_load(base.read_text()) or {}
        tree = merge_trees(tree, body.config)
        with tempfile.TemporaryDirectory() as tmp:
            draft = Path(tmp) / "config.yaml"
            draft.write_text(yaml.safe_dump(tree))
            try:
                cfg = load_config(TrainConfig, draft, [*body.overrides, f"name={body.name}",
                                                       f"run_dir={settings.runs_root.resolve()}"])
                validate_train_config(cfg)
            except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as exc:
                raise HTTPException(422, f"config: {exc}") from None
        policy = Path(cfg.policy.name)
        if cfg.policy.trust_remote_code and remote_code(policy) is not None and not any(
                policy.resolve().is_relative_to(Path(allowed).resolve()) for allowed in settings.allowed_policies):
            allowed = [str(p) for p in settings.allowed_policies]
            raise HTTPException(403, f"policy.trust_remote_code: this service runs remote code only from the folders "
                                     f"it was started with (--allow-policy: {allowed}) (got policy.name="
                                     f"{cfg.policy.name!r})")
        if settings.ray_address is None:
            raise HTTPException(409, "no Ray address: start the service with --ray-address to submit runs")
        submitted = _reserve(body.name)
        save_config(cfg, submitted)
        try:
            submission_id = submit_training(client(), submitted.resolve(), run_dir=settings.runs_root.resolve(),
                                            name=body.name, python=settings.python)
        except Exception as exc:  # noqa: BLE001 - the job API's failure, passed on with its message
            submitted.unlink(missing_ok=True)
            submitted.with_suffix(".json").unlink(missing_ok=True)
            jobs_cache["client"] = None
            raise HTTPException(502, f"Ray's job API at {settings.ray_address} refused the job: "
                                     f"{type(exc).__name__}: {exc}") from None
        write_json_atomic(submitted.with_suffix(".json"), {"submission_id": submission_id, "time": time.time()})
        jobs_cache["at"] = 0.0
        return SubmitReply(run=body.name, submission_id=submission_id, config=str(submitted))

    def _reserve(name: str) -> Path:
        """Claim the run name until its job has made the run folder: a second submission of the name is refused
        while the first job is pending or running (its driver would then also refuse it, holding the lock)."""
        folder = settings.runs_root / ".submitted"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.yaml"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return path
        except FileExistsError:
            pass
        earlier = (read_json(path.with_suffix(".json")) or {}).get("submission_id")
        status = (jobs().get(earlier or "") or {}).get("status")
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):  # that job ended without making the run: the name is free
            return path
        raise HTTPException(409, f"run {name!r} was submitted already (job {earlier or 'being submitted'}, "
                                 f"{status or 'status unknown'}) and has not started yet")

    @app.get("/jobs", response_model=list[JobInfo])
    def job_list():
        return list(jobs().values())

    @app.get("/tune", response_model=list[str])
    def sweeps():
        return store.sweep_ids()

    @app.get("/tune/{sweep_id}", response_model=SweepSummary)
    def sweep(sweep_id: str = PathParam(max_length=128)):
        return store.sweep(sweep_id)

    @app.get("/tune/{sweep_id}/files/{relative:path}", response_class=FileResponse)
    def sweep_file(sweep_id: str = PathParam(max_length=128), relative: str = PathParam(max_length=1000)):
        return FileResponse(store.sweep_file(sweep_id, relative))

    return app
