"""How a run ends, said plainly: interrupted, stopped, out of restarts, out of disk - and how to continue it.

Ray wraps a failure inside a learner worker several times over (the worker's exception inside Ray Train's
``WorkerGroupError`` inside the controller's error), and its text ends in hints that rarely fit (an OOM-killer
note for a worker killed on purpose). ``failure_message`` digs out the cause rl-seg knows how to name - a spent
restart budget, a full disk - and says it in one line with what to do next.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

__all__ = ["RunInterrupted", "RunFailed", "RestartBudgetExhausted", "DiskFull", "disk_guard", "failure_message",
           "resume_command", "exit_now", "EXIT_CODES"]

#: The shell's convention: 128 + the signal number.
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class RunInterrupted(BaseException):
    """The driver got SIGINT or SIGTERM. A BaseException, like KeyboardInterrupt, so no ``except Exception`` on
    the way up swallows it; the run state is already written when it is raised."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, 1)


class RunFailed(RuntimeError):
    """A run that ended for a reason rl-seg can name (the message says which, and how to continue)."""


class RoleStartFailed(RuntimeError):
    """A role of the run could not start (a rollout actor's constructor raised, or a learner refused a damaged
    checkpoint); the message is the console line naming the role and its error."""


class RestartBudgetExhausted(RuntimeError):
    """A role died more often than its configured restarts allow."""


class DiskFull(OSError):
    """No space left where the run writes; the message names the path, the bytes needed and the bytes free."""

    def __str__(self) -> str:
        return self.strerror


def _free_bytes(path: Path) -> int | None:
    for candidate in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def exit_now(code: int) -> None:
    """End an interrupted driver process with ``code`` at once, its run state already written. Ray Train's
    ``fit()`` is still waiting inside Ray on another thread, and tearing Ray down under it has been seen to
    crash the process (SIGSEGV instead of 143); the process's end is what ends its job: the cluster drops the
    job's actors when its driver is gone, and a local instance's processes share the driver's fate."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def disk_guard(path: Path, what: str, needed: int | None = None):
    """Turn ENOSPC inside the block into a DiskFull naming ``path``, ``what`` was written and the space."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC or isinstance(exc, DiskFull):
            raise
        free = _free_bytes(path)
        need = f" needs {needed} bytes" if needed is not None else ""
        raise DiskFull(errno.ENOSPC, f"disk full: writing {what} to {path}{need}; "
                                     f"{'?' if free is None else free} bytes free there") from exc


def resume_command(run_dir: Path, name: str) -> str:
    """The exact command that continues a run (it reads the run's saved config)."""
    return "rl-seg train --resume " + " ".join(shlex.quote(a) for a in (f"run_dir={Path(run_dir).resolve()}",
                                                                        f"name={name}"))


def _causes(exc: BaseException, seen: set | None = None):
    """The exception and everything Ray or Python chained to it, depth first."""
    seen = seen if seen is not None else set()
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    yield exc
    nested = [getattr(exc, "_base_exc", None), getattr(exc, "cause", None), getattr(exc, "controller_failure", None),
              *(getattr(exc, "worker_failures", None) or {}).values(), exc.__cause__, exc.__context__]
    for inner in nested:
        if isinstance(inner, BaseException):
            yield from _causes(inner, seen)


def _first_sentence(exc: BaseException) -> str:
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    text = (lines[0] if lines else "").split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {text[:200]}"


def failure_message(exc: BaseException, max_failures: int) -> str | None:
    """One line for a failure rl-seg can name (a role that could not start, a spent restart budget, a full disk),
    else None."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, (RestartBudgetExhausted, DiskFull, RoleStartFailed)):
            return str(cause)
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return f"disk full: {cause.strerror} ({cause.filename or 'a file of the run'})"
    from ray.exceptions import RayActorError
    from ray.train import TrainingFailedError

    if isinstance(exc, TrainingFailedError):
        # A dead worker is the cause; the others' errors (a collective cut off) are what followed from it.
        died = [c for c in causes if isinstance(c, RayActorError) or "HealthCheck" in type(c).__name__]
        root = (died or causes[1:] or [exc])[0]
        return (f"restart budget exhausted: the learner group failed after learner.max_failures={max_failures} "
                f"restart(s); last error: {_first_sentence(root)}")
    return None
