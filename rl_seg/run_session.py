"""The driver's side of one session of a run: it owns the run folder, keeps run_state.json true, ends plainly.

A session takes the run folder's lock before it writes anything (``rl_seg.run_lock``), decides what the folder
may become (a new run; a resumed one, from its newest whole checkpoint or - interrupted before its first one -
from iteration 0), and writes run_state.json as the run goes, stamped with this process, so the status service
shows a resumed run as running and can stop it. The state is kept in memory: when the disk is full at the end,
the final state is written over the old file's bytes, and failing that, once more as the process exits.

SIGINT and SIGTERM are caught in the main thread: the state (``interrupted``, or ``stopped`` when the status
service asked for the stop and Ray's job API then sent SIGTERM) is written at once - before the cleanup, which a
job supervisor may cut short with SIGKILL - with the last checkpoint and the command that resumes the run, and a
``RunInterrupted`` carries the exit code (130, 143) up to the command line. A second signal leaves at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from .config import save_config
from .ppo.config import TrainConfig
from .run_checkpoints import TRAIN_DIR, list_checkpoints
from .run_files import HEALTH, RUN_STATE, STOP_REQUEST, owner, read_json, stop_requested, write_json_atomic, \
    write_json_in_place
from .run_lock import RunFolderError, RunLock, describe_holder
from .run_metrics import METRICS
from .run_outcome import EXIT_CODES, RunInterrupted, disk_guard, resume_command
from .validation import SAVED_CONFIG

__all__ = ["RunSession"]

log = logging.getLogger(__name__)

#: What a run interrupted before its first checkpoint leaves behind; a restart under its name clears it.
PARTIAL = (METRICS, "tensorboard", TRAIN_DIR, HEALTH, "samples", "summary.json")


class RunSession:
    def __init__(self, cfg: TrainConfig, changes: dict | None = None):
        self.cfg = cfg
        self.run_path = Path(cfg.run_path)
        self.id = uuid.uuid4().hex[:8]
        self.changes = changes or {}
        self.lock = RunLock(self.run_path)
        self.resume_from: Path | None = None
        self.state: dict = {}
        self.outcome: str | None = None
        self._previous_handlers: dict = {}
        self._unsaved = False

    @property
    def resume_command(self) -> str:
        return resume_command(self.cfg.run_dir, self.cfg.name)

    # --- opening -----------------------------------------------------------------------------------------
    def open(self) -> "RunSession":
        stale = self.lock.acquire()
        try:
            self._prepare(stale)
        except BaseException:
            self.lock.release()
            raise
        self.catch_signals()
        return self

    def _prepare(self, stale: dict | None) -> None:
        cfg, path = self.cfg, self.run_path
        previous = read_json(path / RUN_STATE) or {}
        # a driver killed between taking the lock and writing its state left a run too (a stale lock)
        holds_run = stale is not None or any((path / f).exists() for f in (RUN_STATE, METRICS, TRAIN_DIR))
        if not cfg.resume:
            if stale is not None:
                raise RunFolderError(f"{path} was left by {describe_holder(stale)}, which ended without releasing it "
                                     f"(its state: {previous.get('state', 'unknown')}); `{self.resume_command}` "
                                     "takes it over")
            if holds_run:
                raise RunFolderError(f"{path} already holds a run ({_summary(previous)}); continue it with "
                                     f"`{self.resume_command}` or choose another name")
        else:
            if not holds_run:
                raise RunFolderError(f"resume: {path} holds no run to resume (no {RUN_STATE}, {METRICS} or "
                                     "checkpoints)")
            if stale is not None:
                log.warning("taking over %s from %s, which ended without releasing it", path, describe_holder(stale))
            checkpoints = list_checkpoints(path)
            if checkpoints:
                self.resume_from = checkpoints[-1].folder
            else:
                log.warning("%s holds no checkpoint: the run starts again from iteration 0", path)
                for leftover in PARTIAL:
                    target = path / leftover
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            if self.changes:
                log.warning("resuming %s with its saved config; changed on the command line: %s", path,
                            ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items()))
        with disk_guard(path, SAVED_CONFIG):
            save_config(cfg, path / SAVED_CONFIG)
        (path / STOP_REQUEST).unlink(missing_ok=True)  # a stop request ended the previous session, not this one
        resumed_at = None
        if self.resume_from is not None:
            resumed_at = int((read_json(self.resume_from / "checkpoint.json") or {}).get("iteration", 0))
        self.state = {
            "state": "starting", **owner(), "session": self.id,
            "sessions": int(previous.get("sessions") or 1) + 1 if cfg.resume else 1,
            "first_started": previous.get("first_started") or previous.get("started") if cfg.resume else None,
            "started": time.time(), "iterations": cfg.iterations, "resumed_from_iteration": resumed_at,
            "resume_changes": self.changes or None, "ray_job_id": None, "ray_address": None,
            "error": None, "reason": None, "ended": None, "last_checkpoint": None, "resume_command": None,
        }
        with disk_guard(path, RUN_STATE):
            write_json_atomic(path / RUN_STATE, {**self.state, "updated": time.time()})

    def running(self, ray_job_id: str, ray_address: str) -> None:
        self.lock.update(ray_job_id=ray_job_id)
        self.save(state="running", ray_job_id=ray_job_id, ray_address=ray_address)

    # --- the state file ----------------------------------------------------------------------------------
    def save(self, **fields) -> None:
        """Update the in-memory state and write it; on a full disk, over the old file's bytes; failing that,
        again when the process exits."""
        self.state.update(fields, updated=time.time())
        path = self.run_path / RUN_STATE
        try:
            write_json_atomic(path, self.state)
            self._unsaved = False
            return
        except OSError as exc:
            error = exc
        try:
            write_json_in_place(path, self.state)
            self._unsaved = False
            log.warning("%s written in place (%s)", path, error.strerror)
            return
        except OSError:
            pass
        if not self._unsaved:
            atexit.register(self._save_at_exit)
            self._unsaved = True
        log.error("cannot write %s (%s): state %r kept in memory, written again at exit", path, error.strerror,
                  self.state.get("state"))

    def _save_at_exit(self) -> None:
        if self._unsaved:
            for write in (write_json_atomic, write_json_in_place):
                try:
                    write(self.run_path / RUN_STATE, self.state)
                    return
                except OSError:
                    continue
            print(f"rl-seg: could not write {self.run_path / RUN_STATE}; the run ended {self.state.get('state')}: "
                  f"{self.state.get('error') or ''}", file=sys.stderr)

    # --- ending --------------------------------------------------------------------------------------------
    def finish(self, state: str, error: str | None = None, reason: str | None = None) -> str:
        """Record how the session ended (with the last checkpoint and, unless the run is complete, the command
        that resumes it); returns the same as one line for the console."""
        self.outcome = state
        completed = int((read_json(self.run_path / HEALTH) or {}).get("iteration") or 0)
        checkpoints = list_checkpoints(self.run_path)
        last = {"iteration": checkpoints[-1].iteration, "path": str(checkpoints[-1].folder)} if checkpoints else None
        unfinished = state != "succeeded" or completed < self.cfg.iterations
        command = self.resume_command if unfinished else None
        self.save(state=state, ended=time.time(), error=error, reason=reason, completed_iterations=completed,
                  last_checkpoint=last, resume_command=command)
        where = f"last checkpoint: iteration {last['iteration']} ({last['path']})" if last else "no checkpoint yet"
        text = f"{self.run_path}: {state} after iteration {completed} of {self.cfg.iterations}; {where}"
        if error or reason:
            text += f"\n  {error or reason}"
        if command:
            text += f"\n  resume: {command}"
        return text

    def close(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        self.lock.release()

    # --- signals -------------------------------------------------------------------------------------------
    def catch_signals(self) -> None:
        """SIGINT and SIGTERM end the session as interrupted (main thread only; Tune trials run elsewhere). Ray
        installs its own SIGTERM handler when it starts, so this is called again after ``ray.init``."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(sig)
            if current != self._on_signal:
                self._previous_handlers.setdefault(sig, current)
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.outcome is not None:  # a second signal while the first is handled: leave now, the state is written
            os._exit(EXIT_CODES.get(name, 1))
        state = "stopped" if stop_requested(self.run_path) else "interrupted"
        reason = "stopped through the status service" if state == "stopped" else f"{name} received"
        raise RunInterrupted(name, self.finish(state, reason=reason))


def _summary(state: dict) -> str:
    if not state:
        return "no run state"
    parts = [f"state {state.get('state', 'unknown')}"]
    if state.get("completed_iterations") is not None:
        parts.append(f"{state['completed_iterations']} iterations done")
    return ", ".join(parts)
