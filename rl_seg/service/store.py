"""What the status service knows, read from what runs and sweeps write (``rl_seg.run_files``, metrics.jsonl,
checkpoints, a sweep's trials table): no state of its own, so a restarted service shows the same thing.

Every path the service touches goes through :meth:`RunStore.run_path` / :meth:`RunStore.sweep_path` /
:func:`safe_child`, which only resolve names to folders directly under the configured roots and files inside
them: nothing outside the run and sweep folders is ever read or served.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
from pathlib import Path

from ..run_files import HEALTH, RUN_STATE, SAMPLE_INFO, SAMPLE_PNG, read_json

__all__ = ["RunStore", "NotFound", "safe_child", "NAME_PATTERN"]

#: Run and sweep names: one path component, no dots first (no "..", no hidden files).
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
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
        path = self.run_path(run_id, root)
        state = read_json(path / RUN_STATE) or {}
        health = read_json(path / HEALTH) or {}
        last = self.last_metrics(path)
        status = state.get("state", "unknown")
        # A driver killed outright (SIGKILL, lost node) cannot write its end: on its own host, a dead pid says so.
        if status in ("starting", "running") and state.get("host") == socket.gethostname() and state.get("pid") \
                and not _pid_alive(int(state["pid"])):
            status = "lost"
        job = (jobs or {}).get(state.get("submission_id") or "")
        return _finite({
            "id": run_id,
            "state": status,
            "job": job,
            "iteration": health.get("iteration", last.get("iteration")),
            "iterations": state.get("iterations"),
            "adapter_version": health.get("adapter_version", last.get("adapter_version")),
            "started": state.get("started"),
            "updated": max(filter(None, [state.get("updated"), health.get("time"), last.get("time")]), default=None),
            "ended": state.get("ended"),
            "error": state.get("error"),
            "submission_id": state.get("submission_id"),
            "last_metrics": {k: v for k, v in last.items() if isinstance(v, (int, float)) and not k.startswith("time/")},
            "timings": {k[5:]: v for k, v in last.items() if k.startswith("time/")},
        })

    @staticmethod
    def _records(path: Path) -> list[dict]:
        records = []
        metrics = path / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:  # a line being written right now
                    continue
        return records

    def last_metrics(self, path: Path) -> dict:
        records = self._records(path)
        return records[-1] if records else {}

    def metrics(self, run_id: str, keys: list[str] | None = None, since: int = 0, root: Path | None = None) -> list[dict]:
        rows = []
        for record in self._records(self.run_path(run_id, root)):
            if int(record.get("iteration", 0)) <= since:
                continue
            row = {k: v for k, v in record.items() if isinstance(v, (int, float, bool))}
            if keys:
                row = {k: v for k, v in row.items() if k in keys or k == "iteration"}
            rows.append(row)
        return _finite(rows)

    def checkpoints(self, run_id: str) -> list[dict]:
        path = self.run_path(run_id)
        found = []
        for marker in sorted((path / "ray_train").glob("**/checkpoint.json")):
            info = read_json(marker) or {}
            found.append({"iteration": info.get("iteration"), "adapter_version": info.get("version"),
                          "path": str(marker.parent.relative_to(path))})
        found.sort(key=lambda c: c["iteration"] or 0)
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
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if _NAME.match(p.name) and self.is_run(p))

    def sweep_file(self, sweep_id: str, relative: str) -> Path:
        return safe_child(self.sweep_path(sweep_id), relative)
