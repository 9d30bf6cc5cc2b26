"""metrics.jsonl, one record per iteration: how a restart supersedes redone iterations, and how readers read it.

A learner group that restarts from a checkpoint (a killed worker, a resumed run) redoes the iterations after
that checkpoint. Before it logs again, the records of those iterations are dropped from metrics.jsonl
(``supersede``), and TensorBoard is told the same through its purge step (``RunLogger(resume_at=...)``), so the
file, the status service's metrics endpoint, the curves and TensorBoard each show every iteration once, with
the values of the run that carried on. Readers (``read_metrics``) also keep one record per iteration, the last
written, and skip lines that are not records (a line cut off by a crash, a stray value).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["METRICS", "read_metrics", "supersede"]

METRICS = "metrics.jsonl"


def _records(path: Path) -> list[dict]:
    records = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written right now, or cut off by a crash
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int) \
                and not isinstance(record["iteration"], bool):
            records.append(record)
    return records


def read_metrics(run_path: Path) -> list[dict]:
    """The run's records, one per iteration (the last written wins), in iteration order."""
    latest = {r["iteration"]: r for r in _records(Path(run_path) / METRICS)}
    return [latest[i] for i in sorted(latest)]


def supersede(run_path: Path, keep_through: int) -> int:
    """Drop the records of iterations after ``keep_through`` (they are about to be redone); returns how many.
    The file is replaced atomically, so a reader sees it before or after, never half-written."""
    path = Path(run_path) / METRICS
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    records = _records(path)
    kept = [r for r in records if r["iteration"] <= keep_through]
    if len(kept) == len(lines):
        return 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(lines) - len(kept)
