"""Connecting to Ray the way every rl-seg entry point does it: token authentication on, loopback by default.

Ray 2.60 enforces a bearer token on the GCS, the dashboard and the job API when ``RAY_AUTH_MODE=token``; a
local instance generates the token (``~/.ray/auth_token``) on first start, and clients and workers on this
machine read it from there. rl-seg never turns that off: when the mode is unset it is set to ``token`` before Ray
starts, and a user who disabled it explicitly gets a warning on every start.

A local instance is bound to the loopback interface where Ray lets it be: Ray replaces a node address of
127.0.0.1 by the machine's reachable address, and its gRPC servers then listen on every interface, unless its
single-machine mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at import); ``init_ray`` turns that
mode on for the instance it starts, and to join a cluster at a loopback address (whose servers listen only there;
Ray would otherwise dial the machine's reachable address instead). README, "What listens where", lists what still
listens elsewhere.

Addresses: ``ray.init`` wants the cluster's GCS address (``host:6379``), ``ray job submit`` the dashboard's HTTP
address. ``cluster/local.sh``'s head.env exports both (``RAY_ADDRESS`` = GCS, ``RAY_API_SERVER_ADDRESS`` =
HTTP, Ray's own variable for the job API); given an HTTP address, ``init_ray`` joins the GCS that
``RL_SEG_GCS_ADDRESS`` names, or says what to set.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import ray

from .config import ConfigError

__all__ = ["init_ray", "auth_token", "ensure_token_auth", "cluster_address", "GCS_ADDRESS_ENV"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Ray's single-machine switch: with it off, a node's address stays 127.0.0.1 and its servers listen there only.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: The GCS address beside an HTTP RAY_ADDRESS (cluster/local.sh writes it to head.env).
GCS_ADDRESS_ENV = "RL_SEG_GCS_ADDRESS"


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


def cluster_address(address: str | None) -> str | None:
    """The address ``ray.init`` takes: a GCS address as given; a dashboard's HTTP address mapped to the GCS address
    in $RL_SEG_GCS_ADDRESS; None for a local instance."""
    if address and address.startswith(("http://", "https://")):
        gcs = os.environ.get(GCS_ADDRESS_ENV)
        if gcs:
            return gcs
        raise ConfigError(f"ray_address: {address} is a dashboard (job API) address, which `ray job submit` takes; "
                          "rl-seg joins a cluster at its GCS address (host:6379 unless changed): set RAY_ADDRESS or "
                          f"ray_address to that, or {GCS_ADDRESS_ENV} beside it (cluster/local.sh's head.env sets "
                          f"both) (got {address!r})")
    return address or None


def _on_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


@contextmanager
def _single_machine():
    """Ray's single-machine mode while a local instance starts: this process reads the switch from Ray's constants
    (set at import, before rl-seg knew it would start one), the processes it starts read the variable."""
    from ray._private import ray_constants

    previous_constant, previous_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(SINGLE_MACHINE_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[SINGLE_MACHINE_ENV] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_constant
        if previous_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = previous_env


def init_ray(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
             include_dashboard: bool = False, **kwargs) -> ray.runtime_context.RuntimeContext:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local instance on 127.0.0.1.

    A no-op when Ray is already initialized in this process (Ray Train workers, Tune trials, a job driver).
    """
    ensure_token_auth()
    if not ray.is_initialized():
        address = cluster_address(address or os.environ.get("RAY_ADDRESS"))
        kwargs.setdefault("log_to_driver", True)
        kwargs.setdefault("namespace", "rl-seg")
        if address and not _on_loopback(address):
            ray.init(address=address, **kwargs)
        elif address:  # a cluster on this machine's loopback: join it as one of its own processes would
            with _single_machine():
                ray.init(address=address, **kwargs)
        else:
            with _single_machine():
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                         dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, **kwargs)
        from .console import attach_router

        attach_router()  # workers' output to the run folder's logs, when a job's console session is open
    return ray.get_runtime_context()
