"""The checkpoints in a run folder: which are whole, which one a learner group may start from, which are kept.

Ray Train persists each checkpoint under ``<run folder>/ray_train/<train run>/``; every session of a run (the
first start, each resume) is a Train run of its own, so no session picks up another's checkpoint list.
``checkpoint.json`` records the iteration, the adapter version, the session that wrote it and the validation
Dice it was taken at. A checkpoint is used only when it is whole (a disk that filled up mid-copy leaves a
partial folder behind), and a learner group starts from one only when it belongs to this session (a group
restarted after a failure) or when the run asked to resume.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CheckpointEntry", "list_checkpoints", "latest_checkpoint", "choose_checkpoint", "prune_checkpoints",
           "MARKER", "TRAIN_DIR"]

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
TRAIN_DIR = "ray_train"
#: What rank 0 writes into every checkpoint (DeepSpeed's own state is under deepspeed/).
REQUIRED = (MARKER, "trainer_state.pt", "value_head.pt", "adapter/adapter_config.json", "deepspeed")


@dataclass(frozen=True)
class CheckpointEntry:
    folder: Path
    iteration: int
    info: dict
    complete: bool
    mtime: float


def _entries(run_path: Path) -> list[CheckpointEntry]:
    entries = []
    for marker in (Path(run_path) / TRAIN_DIR).glob(f"**/{MARKER}"):
        try:
            info = json.loads(marker.read_text())
            iteration = int(info["iteration"])
            mtime = marker.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue
        folder = marker.parent
        entries.append(CheckpointEntry(folder, iteration, info, all((folder / f).exists() for f in REQUIRED), mtime))
    return sorted(entries, key=lambda e: (e.iteration, e.mtime))


def list_checkpoints(run_path: Path) -> list[CheckpointEntry]:
    """The whole checkpoints, oldest iteration first."""
    return [e for e in _entries(run_path) if e.complete]


def latest_checkpoint(run_path: Path, session: str | None = None) -> Path | None:
    """The newest whole checkpoint under the run folder (of ``session`` only, when given)."""
    found = [e for e in list_checkpoints(run_path) if session is None or e.info.get("session") == session]
    return found[-1].folder if found else None


def choose_checkpoint(train_checkpoint: Path | None, run_path: Path, session: str,
                      resume_from: Path | None) -> Path | None:
    """Where a learner group starts: Ray Train's checkpoint or this session's newest after a group restart (Train
    has been seen to hand a restarted group none), else the checkpoint the run resumes from, else nothing. A
    checkpoint of another session is never adopted unless the run asked to resume from it."""
    if train_checkpoint is not None:
        info = _read_marker(train_checkpoint)
        if info.get("session") == session:
            return train_checkpoint
    own = latest_checkpoint(run_path, session=session)
    if own is not None:
        return own
    return resume_from


def _read_marker(folder: Path) -> dict:
    try:
        info = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def prune_checkpoints(run_path: Path, keep_last: int | None, metric: str = "val_dice") -> list[Path]:
    """Delete all but the newest ``keep_last`` whole checkpoints and the best by ``metric``; partial ones older
    than the newest whole one go too. Returns what was deleted. ``keep_last=None`` keeps everything."""
    if keep_last is None:
        return []
    entries = _entries(run_path)
    whole = [e for e in entries if e.complete]
    if not whole:
        return []
    keep = {e.folder for e in whole[-keep_last:]}
    scored = [e for e in whole if isinstance(e.info.get(metric), (int, float))]
    if scored:
        keep.add(max(scored, key=lambda e: (e.info[metric], e.iteration)).folder)
    newest = whole[-1]
    deleted = []
    for e in entries:
        stale_partial = not e.complete and (e.iteration, e.mtime) < (newest.iteration, newest.mtime)
        if (e.complete and e.folder not in keep) or stale_partial:
            shutil.rmtree(e.folder, ignore_errors=True)
            deleted.append(e.folder)
    if deleted:
        log.info("checkpoints pruned (keeping the newest %d and the best by %s): %s", keep_last, metric,
                 ", ".join(p.name for p in deleted))
    return deleted
