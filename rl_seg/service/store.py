"""What the status service knows, read from what runs and sweeps write (``rl_seg.run_files``, metrics.jsonl,
checkpoints, a sweep's trials table): no state of its own, so a restarted service shows the same thing.

Every path the service touches goes through :meth:`RunStore.run_path` / :meth:`RunStore.sweep_path` /
:func:`safe_child`, which only resolve names to folders directly under the configured roots and files inside
them: nothing outside the run and sweep folders is ever read or served.
"""

from __future__ import annotations

import csv
import math
import os
import re
import socket
from pathlib import Path

from ..run_checkpoints import list_checkpoints
from ..run_files import HEALTH, NAME_PATTERN, RUN_STATE, SAMPLE_INFO, SAMPLE_PNG, read_json
from ..run_metrics import read_metrics

__all__ = ["RunStore", "NotFound", "safe_child", "NAME_PATTERN"]

_NAME = re.compile(NAME_PATTERN)


class NotFound(LookupError):
    """A run, sweep or file that does not exist (or may not be served): the service answers 404."""


def safe_child(folder: Path, relative: str) -> Path:
    """``folder/relative`` if it is a file inside ``folder`` after resolving links and "..", else NotFound."""
    base = folder.resolve()
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        raise NotFound(f"no file {relative!r}")
    try:
        target = (base / relative).resolve()
        inside = target.is_relative_to(base) and target.is_file()
    except OSError:  # a name too long for the file system, a loop of links: not a file we have
        inside = False
    if not inside:
        raise NotFound(f"no file {relative[:200]!r}")
    return target


def _finite(value):
    """JSON has no NaN/inf: such metric values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _first(*values):
    return next((v for v in values if v is not None), None)


def _read_object(path: Path, problems: list[str]) -> dict:
    """A JSON file's object; {} (and a note in ``problems``) when it exists but holds anything else."""
    data = read_json(path)
    if data is None and path.is_file():
        problems.append(f"{path.name} is not a JSON object")
    return data or {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunStore:
    """Runs are the folders directly under ``runs_root`` that a run wrote; sweeps those under ``sweeps_root``."""

    def __init__(self, runs_root: Path, sweeps_root: Path | None = None):
        self.runs_root = Path(runs_root)
        self.sweeps_root = Path(sweeps_root) if sweeps_root else None

    # --- runs ---------------------------------------------------------------------------------------------
    @staticmethod
    def is_run(folder: Path) -> bool:
        return folder.is_dir() and any((folder / f).is_file() for f in (RUN_STATE, "metrics.jsonl"))

    def run_ids(self) -> list[str]:
        return self.run_ids_in(self.runs_root)

    def run_path(self, run_id: str, root: Path | None = None) -> Path:
        root = root or self.runs_root
        if not _NAME.match(run_id or ""):
            raise NotFound(f"no run {run_id!r}")
        path = root / run_id
        if not self.is_run(path) or not path.resolve().is_relative_to(root.resolve()):
            raise NotFound(f"no run {run_id!r} in {root}")
        return path

    def run_summary(self, run_id: str, jobs: dict[str, dict] | None = None, root: Path | None = None) -> dict:
        """What the service shows of a run, read defensively: a value of the wrong kind is left out and named in
        ``problem`` (a hand-edited or half-written file never breaks the listing)."""
        path = self.run_path(run_id, root)
        problems: list[str] = []
        state = _read_object(path / RUN_STATE, problems)
        health = _read_object(path / HEALTH, problems)
        records = read_metrics(path)
        last = records[-1] if records else {}

        def value(source: dict, key: str, kinds: tuple, where: str):
            v = source.get(key)
            if v is None or (isinstance(v, kinds) and not isinstance(v, bool)):
                return v
            problems.append(f"{where}: {key} is {v!r}, not a {kinds[0].__name__}")
            return None

        status = state.get("state") if isinstance(state.get("state"), str) else "unknown"
        pid = value(state, "pid", (int,), RUN_STATE)
        # A driver killed outright (SIGKILL, lost node) cannot write its end: on its own host, a dead pid says so.
        if status in ("starting", "running") and state.get("host") == socket.gethostname() and pid \
                and not _pid_alive(pid):
            status = "lost"
        submission = value(state, "submission_id", (str,), RUN_STATE)
        checkpoint = state.get("last_checkpoint") if isinstance(state.get("last_checkpoint"), dict) else {}
        last_checkpoint = value(checkpoint, "iteration", (int,), f"{RUN_STATE} last_checkpoint")
        if status not in ("starting", "running"):
            # A forced stop signals the driver only: a learner can finish one more checkpoint after the driver
            # recorded its end. A resume takes the newest complete one on disk, so that is the one to show.
            newest = max((c.iteration for c in list_checkpoints(path)), default=None)
            if newest is not None and (last_checkpoint is None or newest > last_checkpoint):
                last_checkpoint = newest
        times = [value(state, "updated", (float, int), RUN_STATE), value(health, "time", (float, int), HEALTH),
                 last.get("time") if isinstance(last.get("time"), (int, float)) else None]
        return _finite({
            "id": run_id,
            "state": status,
            "job": (jobs or {}).get(submission or ""),
            "iteration": _first(value(health, "iteration", (int,), HEALTH), last.get("iteration")),
            "iterations": value(state, "iterations", (int,), RUN_STATE),
            "adapter_version": _first(value(health, "adapter_version", (int,), HEALTH),
                                      value(last, "adapter_version", (int,), "metrics.jsonl")),
            "started": value(state, "started", (float, int), RUN_STATE),
            "updated": max(filter(None, times), default=None),
            "ended": value(state, "ended", (float, int), RUN_STATE),
            "error": value(state, "error", (str,), RUN_STATE),
            "reason": value(state, "reason", (str,), RUN_STATE),
            "submission_id": submission,
            "last_checkpoint": last_checkpoint,
            "resume_command": value(state, "resume_command", (str,), RUN_STATE),
            "last_metrics": {k: v for k, v in last.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("time/")},
            "timings": {k[5:]: v for k, v in last.items()
                        if k.startswith("time/") and isinstance(v, (int, float)) and not isinstance(v, bool)},
            "problem": "; ".join(problems) or None,
        })

    def metrics(self, run_id: str, keys: list[str] | None = None, since: int = 0, root: Path | None = None) -> list[dict]:
        rows = []
        for record in read_metrics(self.run_path(run_id, root)):
            if record["iteration"] <= since:
                continue
            row = {k: v for k, v in record.items() if isinstance(v, (int, float, bool))}
            if keys:
                row = {k: v for k, v in row.items() if k in keys or k == "iteration"}
            rows.append(row)
        return _finite(rows)

    def checkpoints(self, run_id: str) -> list[dict]:
        path = self.run_path(run_id)
        found = [{"iteration": c.iteration, "adapter_version": c.info.get("version"),
                  "path": str(c.folder.relative_to(path))} for c in list_checkpoints(path)]
        final = path / "final_adapter"
        if (final / "adapter_config.json").is_file():
            found.append({"iteration": None, "adapter_version": None, "path": "final_adapter", "final": True})
        return found

    def health(self, run_id: str) -> dict:
        health = read_json(self.run_path(run_id) / HEALTH)
        if health is None:
            raise NotFound(f"run {run_id!r} has not reported worker health yet")
        return _finite(health)

    def config(self, run_id: str) -> str:
        return safe_child(self.run_path(run_id), "config.yaml").read_text()

    def sample(self, run_id: str) -> tuple[Path, dict]:
        path = self.run_path(run_id)
        return safe_child(path, SAMPLE_PNG), read_json(path / SAMPLE_INFO) or {}

    def file(self, run_id: str, relative: str) -> Path:
        return safe_child(self.run_path(run_id), relative)

    # --- sweeps -------------------------------------------------------------------------------------------
    def sweep_ids(self) -> list[str]:
        if self.sweeps_root is None or not self.sweeps_root.is_dir():
            return []
        return sorted(p.name for p in self.sweeps_root.iterdir()
                      if _NAME.match(p.name) and (p / "sweep.yaml").is_file())

    def sweep_path(self, sweep_id: str) -> Path:
        if self.sweeps_root is None or not _NAME.match(sweep_id or "") \
                or not (self.sweeps_root / sweep_id / "sweep.yaml").is_file():
            raise NotFound(f"no sweep {sweep_id!r}")
        return self.sweeps_root / sweep_id

    def sweep(self, sweep_id: str) -> dict:
        """A sweep's trials: from its table when it has finished, else from the trials' own run folders."""
        path = self.sweep_path(sweep_id)
        table = path / "trials.csv"
        trials_dir = path / "trials"
        if table.is_file():
            with table.open() as fh:
                rows = [dict(r) for r in csv.DictReader(fh)]
            finished = True
        else:
            rows, finished = [], False
        by_run = {r.get("trial"): r for r in rows}
        live = []
        for trial in self.run_ids_in(trials_dir):
            summary = self.run_summary(trial, root=trials_dir)
            live.append({**summary, "table": by_run.get(trial.removeprefix("trial_")) or by_run.get(trial)})
        best = path / "best_config.yaml"
        return {"id": sweep_id, "finished": finished, "table": rows, "trials": live,
                "best_config": best.read_text() if best.is_file() else None,
                "plot": "sweep.png" if (path / "sweep.png").is_file() else None}

    def run_ids_in(self, folder: Path) -> list[str]:
        """Run folders directly under ``folder``; a link that leads out of it is not one of them."""
        if not folder.is_dir():
            return []
        base = folder.resolve()
        ids = []
        for p in folder.iterdir():
            try:
                if _NAME.match(p.name) and p.resolve().is_relative_to(base) and self.is_run(p):
                    ids.append(p.name)
            except OSError:  # a loop of links, a folder we may not read
                continue
        return sorted(ids)

    def sweep_file(self, sweep_id: str, relative: str) -> Path:
        return safe_child(self.sweep_path(sweep_id), relative)
