"""One writer per run folder: an exclusive lock that a run's driver holds for its whole session.

The lock is ``flock`` on ``<run folder>/run.lock``: the kernel releases it when the holder ends, however it
ends (SIGKILL included), and on NFS Linux carries it as an fcntl lock, so drivers on different hosts of a shared
file system exclude each other too. The file also says who holds it (pid, host, Ray job, since when), so a
second driver - or the status service asked to start a run of that name - is refused naming the holder.

A lock file whose holder ended without releasing it (killed outright) is stale: the run it guarded may be
half-written, so only a resume takes it over (``rl_seg.run_session`` decides). The file is never deleted, only
rewritten: deleting a lock file races with a process that has just opened it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path

from .run_files import owner

__all__ = ["LOCK", "RunFolderError", "RunFolderBusy", "RunLock", "lock_holder", "describe_holder"]

LOCK = "run.lock"


class RunFolderError(RuntimeError):
    """A run folder this run cannot use (held by another driver, left by a dead one, not writable); the message
    names the folder and what to do."""


class RunFolderBusy(RunFolderError):
    """Another live process holds the run folder's lock."""


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(info: dict) -> str:
    parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
    if info.get("ray_job_id"):
        parts.append(f"Ray job {info['ray_job_id']}")
    if info.get("submission_id"):
        parts.append(f"submission {info['submission_id']}")
    if isinstance(info.get("since"), (int, float)):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])))
    return ", ".join(parts)


def lock_holder(run_path: Path) -> dict | None:
    """Who holds the run folder's lock now (their recorded info), or None when nobody does."""
    path = Path(run_path) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read(path) or {"pid": "?", "host": "?"}
        raise
    finally:
        os.close(fd)  # closing drops the shared lock taken for the test
    return None


class RunLock:
    """``acquire()`` before anything is written to the folder, ``update(...)`` as the holder learns its Ray job,
    ``release()`` at the end (or let the process end)."""

    def __init__(self, run_path: Path):
        self.run_path = Path(run_path)
        self.path = self.run_path / LOCK
        self.fd: int | None = None
        self.info: dict = {}

    def acquire(self) -> dict | None:
        """Take the lock; returns the previous holder's info when it ended without releasing it (stale), else None.
        Raises RunFolderBusy when a live process holds it, RunFolderError when the folder cannot be written."""
        try:
            self.run_path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"run_dir: cannot create the run folder {self.run_path}: {exc.strerror} "
                                 f"(got {str(self.run_path.parent)!r})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = _read(self.path)
            raise RunFolderBusy(f"{self.run_path} is in use by {describe_holder(holder)}: one driver writes a run "
                                "folder at a time; stop that run or choose another name") from None
        self.fd = fd
        previous = _read(self.path)
        stale = previous if previous.get("pid") is not None and not previous.get("released") else None
        self.info = {**owner(), "since": time.time()}
        try:
            self._write()
        except OSError as exc:
            self.release()
            raise RunFolderError(f"run_dir: cannot write {self.path}: {exc.strerror} "
                                 f"(got {str(self.run_path.parent)!r})") from exc
        return stale

    def update(self, **info) -> None:
        self.info.update(info)
        self._write()

    def _write(self) -> None:
        data = json.dumps(self.info).encode() + b"\n"
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.info["released"] = time.time()
            self._write()
        except OSError:  # a full disk: the kernel still drops the lock; the file then reads as stale
            pass
        finally:
            os.close(self.fd)
            self.fd = None
