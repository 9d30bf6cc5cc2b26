"""The status service (``rl-seg serve``): a FastAPI app over the run and sweep folders and Ray's job API.

Read endpoints are open to whoever can reach the port, which is 127.0.0.1 unless the operator binds it
elsewhere; the control endpoints (stop a run, submit a run) need ``Authorization: Bearer <token>``. OpenAPI
docs are at ``/docs``.
"""

from __future__ import annotations

import hmac
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from ..run_files import request_stop
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
    state: str = Field(description="starting, running, succeeded, failed, stopped, lost (driver gone) or unknown")
    job: JobInfo | None = Field(None, description="the Ray job carrying the run, when it was submitted as one")
    iteration: int | None = None
    iterations: int | None = None
    adapter_version: int | None = None
    started: float | None = None
    updated: float | None = None
    ended: float | None = None
    error: str | None = None
    submission_id: str | None = None
    last_metrics: dict[str, Number] = Field(default_factory=dict)
    timings: dict[str, Number] = Field(default_factory=dict, description="seconds per phase, last iteration")


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

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            raise HTTPException(403, "control endpoints are disabled: the service was started without a token")
        if credentials is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), settings.token.encode()):
            raise HTTPException(403, "wrong bearer token")

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
        return [store.run_summary(r, listing) for r in store.run_ids()]

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
        from ..ppo.config import TrainConfig

        if (settings.runs_root / body.name).exists():
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
            except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as exc:
                raise HTTPException(422, f"config: {exc}") from None
        if settings.ray_address is None:
            raise HTTPException(409, "no Ray address: start the service with --ray-address to submit runs")
        submitted = save_config(cfg, settings.runs_root / ".submitted" / f"{body.name}.yaml")
        try:
            submission_id = submit_training(client(), submitted.resolve(), run_dir=settings.runs_root.resolve(),
                                            name=body.name, python=settings.python)
        except Exception as exc:  # noqa: BLE001 - the job API's failure, passed on with its message
            submitted.unlink(missing_ok=True)
            jobs_cache["client"] = None
            raise HTTPException(502, f"Ray's job API at {settings.ray_address} refused the job: "
                                     f"{type(exc).__name__}: {exc}") from None
        jobs_cache["at"] = 0.0
        return SubmitReply(run=body.name, submission_id=submission_id, config=str(submitted))

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
