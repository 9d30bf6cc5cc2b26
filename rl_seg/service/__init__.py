"""The status service: read what runs and sweeps write, submit and stop runs (``rl-seg serve``)."""

from .app import ServiceSettings, create_app
from .server import StatusServer, load_or_create_token, serve

__all__ = ["ServiceSettings", "create_app", "StatusServer", "serve", "load_or_create_token"]
