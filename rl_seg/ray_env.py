"""Connecting to Ray the way every rl-seg entry point does it: token authentication on, loopback by default.

Ray 2.60 enforces a bearer token on the GCS, the dashboard and the job API when ``RAY_AUTH_MODE=token``; a
local instance generates the token (``~/.ray/auth_token``) on first start, and clients and workers on this
machine read it from there. rl-seg never turns that off: when the mode is unset it is set to ``token`` before Ray
starts, and a user who disabled it explicitly gets a warning on every start.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

__all__ = ["init_ray", "auth_token", "ensure_token_auth"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def ensure_token_auth() -> None:
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if mode != "token":
        log.warning("RAY_AUTH_MODE=%s: Ray's token authentication is OFF; anyone who reaches the cluster can run "
                    "code on it. Unset it (rl-seg defaults to 'token').", mode)


def auth_token() -> str | None:
    """The token a client must present, from the same sources Ray reads, in Ray's order of precedence."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def init_ray(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
             include_dashboard: bool = False, **kwargs) -> ray.runtime_context.RuntimeContext:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local instance on 127.0.0.1.

    A no-op when Ray is already initialized in this process (Ray Train workers, Tune trials, a job driver).
    """
    ensure_token_auth()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs.setdefault("log_to_driver", True)
        kwargs.setdefault("namespace", "rl-seg")
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                     dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, **kwargs)
        from .console import attach_router

        attach_router()  # workers' output to the run folder's logs, when a job's console session is open
    return ray.get_runtime_context()
