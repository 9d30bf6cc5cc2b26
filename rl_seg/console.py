"""The console and the run folder's ``logs/``: what a user sees, and where everything else goes.

At default verbosity a job prints Ray's start line, a line per iteration, validation lines, warnings and errors
a user must act on, and its summary. Everything else its processes write (Ray Train's reports, DeepSpeed and
library warnings, Ray's own actors such as the Train controller) goes to ``<run>/logs/<role>.log``, one file per
role (``driver``, ``learner-0``, ``rollout-1``, ``reward-0``, ``ray-TrainController``, ...); ``--verbose`` prints
it on the console as well.

How, with Ray 2.60: ``ray.init(log_to_driver=True)`` streams every worker's stdout and stderr to the driver,
where ``ray.init`` registers Ray's printer (handler ``ray_print_logs`` of
``ray._private.ray_logging.global_worker_stdstream_dispatcher``). The driver swaps that printer for a router.
An rl-seg process first announces its role and log folder with one marked line (a marker like Ray's own
``:actor_name:``); the router writes that process's later lines to ``<folder>/<role>.log`` and prints only the
lines marked for the console, once. Lines of Ray's own actors go to ``ray-<actor>.log`` in the driver's folder;
the raylet's errors (a worker killed for memory) and the autoscaler's events stay on the console. The other way round
(``log_to_driver=False`` and every process redirecting itself to a file) would leave Ray's own actors writing
where no user looks, and ``--verbose`` could show nothing.

Ray Train's print patch (``RAY_TRAIN_ENABLE_PRINT_PATCH``) sends a worker's ``print`` both to stdout and through
its logger, which doubles every printed line; the driver turns it off for the Train workers it starts.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Iterator

__all__ = ["announce", "show", "done", "driver_session", "attach_router", "set_verbose", "is_verbose",
           "configure_cli_logging", "describe_error", "last_log_dir", "DRIVER_LOG", "LOG_DIR"]

#: Starts every line an rl-seg process writes for the router; the rest of the line is JSON.
MARK = ":rl-seg:"
LOG_DIR = "logs"
DRIVER_LOG = "driver.log"
#: rl-seg's own loggers: their warnings and errors are shown on the console, with the role that logged them.
OWN_LOGGERS = ("rl_seg", "rewards", "tune")
#: Ray's printer, as ``ray.init`` registers it with the dispatcher.
RAY_PRINTER = "ray_print_logs"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state = {"verbose": os.environ.get("RL_SEG_VERBOSE", "") not in ("", "0"), "role": None}


def set_verbose(verbose: bool) -> None:
    """``--verbose``: print everything the run folder's logs receive. Inherited by processes started later."""
    _state["verbose"] = bool(verbose)
    os.environ["RL_SEG_VERBOSE"] = "1" if verbose else "0"


def is_verbose() -> bool:
    return _state["verbose"]


# --- in an rl-seg process that Ray started (a role) ---------------------------------------------------------

def _ray_initialized():
    """The ray module when Ray is initialized in this process, else None (never imports ray: `rl-seg sft`)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _in_ray_worker() -> bool:
    ray = _ray_initialized()
    return ray is not None and ray._private.worker.global_worker.mode == ray.WORKER_MODE


def _emit(record: dict, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(MARK + json.dumps(record) + "\n")
    stream.flush()


class _ConsoleHandler(logging.Handler):
    """Sends warnings and errors of rl-seg's loggers to the console, named by role."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            show(record.getMessage(), level=record.levelname.lower())
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def announce(log_dir: str | Path | None, role: str) -> None:
    """From now on this process's output goes to ``log_dir/<role>.log`` (through the driver's router), and
    warnings of rl-seg's loggers reach the console with ``role``. Outside a Ray worker it only names the role."""
    _state["role"] = role
    if not _in_ray_worker():
        return
    hello = {"kind": "hello", "role": role, "log_dir": None if log_dir is None else str(Path(log_dir).resolve())}
    _emit(hello, sys.stdout)
    _emit(hello, sys.stderr)  # Ray streams stdout and stderr separately: each stream learns the role first
    root = logging.getLogger()
    if not root.handlers:  # plain actors: Python would print only warnings, without a format
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
            handler = _ConsoleHandler(logging.WARNING)
            logger.addHandler(handler)


def show(text: str, level: str = "info") -> None:
    """A line for the console: printed here in the driver, sent to the driver's console from a role."""
    role = _state["role"]
    if not _in_ray_worker():
        stream = sys.stdout if level == "info" else sys.stderr
        print(text if level == "info" else f"{level}: {text}", file=stream, flush=True)
        return
    print(text if level == "info" else f"{level}: {text}", flush=True)  # the role's own log keeps it too
    _emit({"kind": "show", "role": role, "level": level, "text": text})


def done() -> None:
    """Tells the driver that this role's console lines are all sent (it waits for them before its summary)."""
    if _in_ray_worker():
        _emit({"kind": "done", "role": _state["role"]})


# --- in the driver -------------------------------------------------------------------------------------------

class _Router:
    """Ray's dispatcher calls this with each batch of worker lines: ``{ip, pid, is_err, lines, actor_name,
    task_name, ...}``."""

    def __init__(self, ray_printer):
        self.ray_printer = ray_printer
        self.default_dir: Path | None = None
        self.roles: dict[tuple, tuple[str, str | None]] = {}
        self.files: dict[Path, object] = {}
        self.done: set[tuple] = set()
        self.cond = threading.Condition()
        self.lock = threading.Lock()

    def __call__(self, data: dict) -> None:
        try:
            self._route(data)
        except Exception as exc:  # noqa: BLE001 - a routing bug must not cost the user Ray's output
            print(f"rl-seg: log routing failed ({type(exc).__name__}: {exc}); printing Ray's stream",
                  file=sys.stderr)
            self.ray_printer(data)

    def _route(self, data: dict) -> None:
        key = (data.get("ip"), data.get("pid"))
        plain = []
        for line in data.get("lines", []):
            if line.startswith(MARK):
                try:
                    record = json.loads(line[len(MARK):])
                except ValueError:
                    plain.append(line)
                    continue
                self._marked(key, record)
            else:
                plain.append(line)
        if not plain:
            return
        pid = data.get("pid")
        if pid == "autoscaler":  # Ray's printer shows only its events (resize, unschedulable demands)
            self.ray_printer(data)
            return
        role, log_dir = self.roles.get(key, (None, None))
        if role is None:
            role = f"ray-{pid}" if pid in ("raylet", "gcs_server", "runtime_env") else \
                f"ray-{data.get('actor_name') or data.get('task_name') or 'worker'}"
        folder = Path(log_dir) if log_dir else self.default_dir
        if folder is not None:
            self._write(folder / f"{role}.log", plain, data)
        # The raylet's errors are about the user's processes (a worker killed, memory running out): always shown.
        # Its warnings (e.g. "N worker processes have been started") are about Ray's own bookkeeping.
        news = [line for line in plain if not line.startswith("WARNING:")] if pid == "raylet" else []
        if is_verbose() or folder is None:
            self.ray_printer({**data, "lines": plain})
        elif news:
            self.ray_printer({**data, "lines": news})

    def _marked(self, key: tuple, record: dict) -> None:
        kind = record.get("kind")
        if kind == "hello":
            role, log_dir = record.get("role") or "worker", record.get("log_dir")
            self.roles[key] = (role, log_dir)
            if log_dir:  # every role has its file, even one that never writes a line
                self._write(Path(log_dir) / f"{role}.log", [], {})
        elif kind == "show":
            level, text = record.get("level", "info"), record.get("text", "")
            role, log_dir = self.roles.get(key, (record.get("role"), None))
            if log_dir and Path(log_dir) != self.default_dir:  # another run's role (a Tune trial): name the run
                role = f"{role} of {Path(log_dir).parent.name}"
            if level == "info":
                print(text, flush=True)
            else:
                print(f"{level} ({role}): {text}", file=sys.stderr, flush=True)
        elif kind == "done":
            role, log_dir = self.roles.get(key, (record.get("role"), None))
            with self.cond:
                self.done.add((log_dir, role))
                self.cond.notify_all()

    def _write(self, path: Path, lines: list[str], data: dict) -> None:
        with self.lock:
            fh = self.files.get(path)
            if fh is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                fh = self.files[path] = path.open("a", buffering=1)
            stream = "stderr" if data.get("is_err") else "stdout"
            for line in lines:
                fh.write(f"{line}\n" if stream == "stdout" else f"[stderr] {line}\n")

    def wait_done(self, role: tuple[str, str], timeout_s: float) -> bool:
        """Wait for ``(log_dir, role)`` to send its done line."""
        with self.cond:
            return self.cond.wait_for(lambda: role in self.done, timeout=timeout_s)

    def close(self) -> None:
        with self.lock:
            for fh in self.files.values():
                fh.close()
            self.files.clear()


_router: _Router | None = None
_session: dict = {"log_dir": None, "last": None, "handler": None}


def last_log_dir() -> Path | None:
    """The logs/ folder of this process's latest driver session (where a failed job's traceback is)."""
    return _session["last"]


def attach_router() -> None:
    """Swap Ray's printer for the router when a driver session is open and Ray streams worker output here
    (``init_ray`` calls this after ``ray.init``; a session opened after ``ray.init`` calls it itself)."""
    global _router
    if _session["log_dir"] is None:
        return
    if _router is None:
        try:  # Ray's hook (2.60); without it, Ray prints the workers' output itself, as it always did
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            logging.getLogger(__name__).warning("this Ray has no worker-output dispatcher: its output is not "
                                                "routed to %s", _session["log_dir"])
            return
        printers = [h for name, h in dispatcher.handlers if name == RAY_PRINTER]
        if not printers:  # ray.init(log_to_driver=False): no stream to route
            return
        _router = _Router(printers[0])
        dispatcher.remove_handler(RAY_PRINTER)
        # Registered under Ray's name, so ray.shutdown() removes it as it would its own printer.
        dispatcher.add_handler(RAY_PRINTER, _router)
        atexit.register(_router.close)
    # Lines that arrive after the session (late output of dying actors) still go to its folder.
    _router.default_dir = _session["log_dir"]


@contextlib.contextmanager
def driver_session(log_dir: str | Path, wait_for: str | None = None, wait_s: float = 15.0) -> Iterator[None]:
    """The console and ``log_dir`` for one job, around the code that runs it.

    In the driver: routes the workers' output (see the module doc) once Ray is up, writes this process's log
    records to ``log_dir/driver.log`` (the console keeps warnings; an error leaves its traceback there), and on
    success waits up to ``wait_s`` for role ``wait_for`` to report that its console lines are sent, so that the
    summary comes after them. Inside a Ray worker (a Tune trial runs its job there) this process becomes the
    job's ``driver`` role of ``log_dir``.
    """
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # Ray Train propagates it to its workers
    if _in_ray_worker():
        announce(log_dir, "driver")
        yield
        return
    nested = _session["log_dir"] == log_dir  # the quickstart's session around the training job's
    handler = _session["handler"] if nested else logging.FileHandler(log_dir / DRIVER_LOG)
    loggers = [] if nested else [logging.getLogger(), logging.getLogger("ray")]
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for logger in loggers:
        logger.addHandler(handler)
    outer = dict(_session)
    _session.update(log_dir=log_dir, last=log_dir, handler=handler)
    try:
        if _ray_initialized():
            attach_router()
        yield
        if _router is not None and wait_for is not None and not _router.wait_done((str(log_dir), wait_for),
                                                                                   wait_s):
            logging.getLogger(__name__).info("%s did not confirm its last console line within %.0f s",
                                             wait_for, wait_s)
    except BaseException as exc:
        # The whole traceback goes to the file (once, however many sessions it passes); the console gets one
        # line (describe_error) from the caller.
        if not getattr(exc, "_rl_seg_logged", False):
            summary = describe_error(exc) if isinstance(exc, Exception) else type(exc).__name__
            handler.handle(logging.LogRecord(__name__, logging.ERROR, __file__, 0, "the job failed: %s",
                                             (summary,), sys.exc_info()))
            with contextlib.suppress(AttributeError, TypeError):
                exc._rl_seg_logged = True
        raise
    finally:
        _session.update(log_dir=outer["log_dir"], handler=outer["handler"])
        for logger in loggers:
            logger.removeHandler(handler)
        if not nested:
            handler.close()


def configure_cli_logging(verbose: bool) -> None:
    """The console's share of this process's log records: warnings and errors (everything with ``--verbose``);
    a driver session adds the run folder's driver.log, which gets INFO and up. Python warnings from libraries
    (peft's hub lookups, torch deprecations) are not something a user acts on: without ``--verbose`` they go
    to driver.log only."""
    set_verbose(verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: "
                        "%(message)s")
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.captureWarnings(True)
    library_warnings = logging.getLogger("py.warnings")
    library_warnings.propagate = verbose
    if not verbose and not any(isinstance(h, _ToDriverLog) for h in library_warnings.handlers):
        library_warnings.addHandler(_ToDriverLog())


class _ToDriverLog(logging.Handler):
    """Hands records to the root logger's file handlers only: the current session's driver.log."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)


def _task_role(error) -> str:
    """The actor (its repr: rl-seg's roles name themselves) or function a RayTaskError came from."""
    header = str(error).split("\n", 1)[0]
    match = re.search(r"repr=([^,)]+)\)", header) or re.search(r"ray::([\w-]+)", header)
    return match.group(1) if match else "a Ray task"


#: The last line of a Python traceback: the exception's (qualified) type and its message.
_RAISED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Exhausted|NonFinite)\w*): (.+)$")


def _creation_failure(text: str, roles: list[str]) -> str:
    """An actor whose __init__ raised: Ray keeps only the text (``ActorDiedError`` holds no cause object), so the
    role comes from the actor's repr and the error from the traceback's last line."""
    role = re.search(r"repr=([\w.-]+)\)", text)
    roles = [*roles, role.group(1) if role else "an actor's creation"]
    raised = [m for m in map(_RAISED.match, (line.strip() for line in text.splitlines())) if m]
    message = f"{raised[-1].group(1)}: {raised[-1].group(2)}" if raised else text.splitlines()[0]
    via = f" (reported by {' <- '.join(reversed(roles[:-1]))})" if len(roles) > 1 else ""
    return f"error in {roles[-1]}{via}: {message}"


def describe_error(exc: BaseException) -> str:
    """One line for the console: the role that raised ``exc`` (a learner rank, a rollout or reward actor, Ray
    Train's controller), the roles it passed through, and the innermost error's type and first line."""
    if "ray" not in sys.modules:  # nothing of Ray's ran here (`rl-seg sft`)
        return f"error in driver: {type(exc).__name__}: {exc}".splitlines()[0]
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    roles = []
    for _ in range(32):  # a chain, not a cycle; bounded all the same
        if isinstance(exc, ActorDiedError) and exc.actor_init_failed:
            return _creation_failure(str(exc), roles)
        if isinstance(exc, WorkerGroupError) and exc.worker_failures:
            rank = min(exc.worker_failures)
            roles.append(f"learner-{rank}")
            exc = exc.worker_failures[rank]
        elif isinstance(exc, ControllerError):
            roles.append("Ray Train controller")
            exc = exc.controller_failure
        elif isinstance(exc, RayTaskError):
            roles.append(_task_role(exc))
            exc = exc.cause
        elif isinstance(exc.__cause__, (RayTaskError, WorkerGroupError, ControllerError)):
            exc = exc.__cause__
        else:
            break
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    message = type(exc).__name__ + (f": {lines[0]}" if lines else "")
    via = f" (reported by {' <- '.join(reversed(roles[:-1]))})" if len(roles) > 1 else ""
    return f"error in {roles[-1] if roles else 'driver'}{via}: {message}"
