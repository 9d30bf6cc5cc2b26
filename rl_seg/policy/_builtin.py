"""Imports the built-in policies so that they register themselves (kept out of base.py to avoid import cycles)."""

from . import default_model  # noqa: F401
from . import sa2va  # noqa: F401
