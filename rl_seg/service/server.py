"""Running the status service: a uvicorn server in this process (``rl-seg serve``), or inside the cluster as a
Ray actor (``rl-seg serve --in-cluster``) so that it lives with the runs and comes back when its node does."""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

from .app import ServiceSettings, create_app

__all__ = ["serve", "StatusServer", "load_or_create_token", "ACTOR_NAME", "start_in_cluster"]

LOOPBACK = "127.0.0.1"
ACTOR_NAME = "rl-seg-status"
TOKEN_ENV = "RL_SEG_SERVICE_TOKEN"


def load_or_create_token(path: Path) -> str:
    """The control token: $RL_SEG_SERVICE_TOKEN, else the token file (created, owner-only, on first use)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = Path(path)
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


class StatusServer:
    """A uvicorn server on a background thread: started, asked for its URL, stopped."""

    def __init__(self, settings: ServiceSettings, host: str = LOOPBACK, port: int = 8000, log_level: str = "warning"):
        import uvicorn

        config = uvicorn.Config(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
        self.server = uvicorn.Server(config)
        self.host = host
        self.thread = threading.Thread(target=self.server.run, name="rl-seg-status", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "StatusServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the status service did not start on {self.host} (port taken?)")
            time.sleep(0.05)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(settings: ServiceSettings, host: str = LOOPBACK, port: int = 8000) -> None:
    """Serve in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


def start_in_cluster(settings: ServiceSettings, host: str = LOOPBACK, port: int = 8000):
    """A detached, restartable Ray actor serving the app on the node it lands on; returns (actor, url)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class StatusServiceActor:
        def __init__(self, settings: dict, host: str, port: int):
            self.server = StatusServer(ServiceSettings(**settings), host, port).start()

        def url(self) -> str:
            return self.server.url

    actor = StatusServiceActor.options(name=ACTOR_NAME, lifetime="detached", get_if_exists=True).remote(
        settings.model_dump(mode="json"), host, port)
    return actor, ray.get(actor.url.remote())
