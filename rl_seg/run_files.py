"""The files a run folder holds besides its metrics, and the one place that names them.

The status service (``rl-seg serve``) shows only what runs write here, so a restarted service shows the same
runs, and a run's actors dying and coming back never break it. Writers replace files atomically (write, then
rename) because the service may read at any moment.

- ``run_state.json``  the driver (``rl_seg.run_session``): state (starting / running / succeeded / failed /
  stopped / interrupted), start and end times, pid, host, Ray job and submission ids of the session now running
  it, the error of a failed run, the last checkpoint and the command that resumes it.
- ``run.lock``        held by the driver for the whole session (``rl_seg.run_lock``): one writer per run folder.
- ``health.json``     learner rank 0, every iteration: rollout actors (alive, restarts, requests redone),
  reward pool (actors, scored, failed, timeouts, restarts), learner group (world size, starts), iteration and
  adapter version.
- ``stop_request.json`` written by a stop request (``rl-seg serve``'s control endpoint); the learner finishes
  the iteration, checkpoints and ends the run as ``stopped``.
- ``samples/latest.png`` an overlay of one sampled mask of the latest iteration (white found, red missed,
  blue false), with ``samples/latest.json`` saying which image, iteration and adapter version.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["RUN_STATE", "HEALTH", "STOP_REQUEST", "SAMPLE_PNG", "SAMPLE_INFO", "write_json_atomic", "read_json",
           "write_json_in_place", "owner", "request_stop", "stop_requested", "write_sample_overlay",
           "SUBMISSION_ENV", "NAME_PATTERN"]

RUN_STATE = "run_state.json"
HEALTH = "health.json"
STOP_REQUEST = "stop_request.json"
SAMPLE_PNG = "samples/latest.png"
SAMPLE_INFO = "samples/latest.json"
#: Set by `rl-seg submit` and the service's submit endpoint, so a run knows the Ray job that carries it.
SUBMISSION_ENV = "RL_SEG_SUBMISSION_ID"
#: Run and sweep names: one path component, no dot first (no "..", no hidden files).
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write, then rename over ``path``: a reader sees the old file or the new one. A failed write (disk full)
    leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_json_bytes(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_in_place(path: Path, data: dict) -> None:
    """Overwrite an existing file's bytes without a temporary file: on a full disk this still succeeds while
    the new text fits in the blocks the file already holds (not atomic: the last resort of a final state)."""
    with open(path, "r+b") as fh:
        fh.write(_json_bytes(data))
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())


def read_json(path: Path) -> dict | None:
    """The file's object, or None when it is missing or unreadable (a run may be writing its first one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owner() -> dict:
    """Who is writing: this process, its host and the Ray job submission carrying it (if any)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "submission_id": os.environ.get(SUBMISSION_ENV)}


def request_stop(run_path: Path, reason: str = "stop requested") -> dict:
    request = {"time": time.time(), "reason": reason}
    write_json_atomic(Path(run_path) / STOP_REQUEST, request)
    return request


def stop_requested(run_path: Path) -> bool:
    return (Path(run_path) / STOP_REQUEST).is_file()


def write_sample_overlay(run_path: Path, image: np.ndarray, mask: np.ndarray, gt: np.ndarray,
                         fov: np.ndarray | None, info: dict) -> Path:
    import imageio.v3 as iio

    from .evaluate import overlay

    out = Path(run_path) / SAMPLE_PNG
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".latest.", suffix=".png")
    os.close(fd)
    try:
        iio.imwrite(tmp, overlay(image, mask, gt, fov))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json_atomic(Path(run_path) / SAMPLE_INFO, {"time": time.time(), **info})
    return out
