"""Where the TEST STUB torchvision and timm (tests/stubs) come from, for the tests and for the benchmarks that run the
replica on hosts that lack the real packages (no pytest needed here): each stub is put on the path, here and through
PYTHONPATH in child processes and Ray workers, only when the real package is missing."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["STUBS", "STUBBED_PACKAGES", "stub_root", "use_test_stubs"]

STUBS = Path(__file__).resolve().parents[1] / "stubs"
STUBBED_PACKAGES = ("torchvision", "timm")


def stub_root(missing: list[str]) -> Path | None:
    """The directory to put on the path so that exactly the ``missing`` packages come from tests/stubs: tests/stubs
    itself when all are missing, else a temporary directory linking only those (a path entry exposes every package
    in it, and PYTHONPATH entries come before site-packages in Ray workers, so a stub must never sit beside a
    real package it would shadow)."""
    if not missing:
        return None
    if sorted(missing) == sorted(STUBBED_PACKAGES):
        return STUBS
    # One directory per checkout: two clones on one machine must not share links into each other's stubs.
    checkout = hashlib.sha1(str(STUBS).encode()).hexdigest()[:10]
    root = Path(tempfile.gettempdir()) / f"rl-seg-test-stubs-{os.getuid()}-{checkout}-{'-'.join(sorted(missing))}"
    root.mkdir(exist_ok=True)
    for name in [*missing, "_test_stub_support.py"]:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(STUBS / name)
    return root


def use_test_stubs() -> list[str]:
    """Put the TEST STUB torchvision/timm on the path (here and, through PYTHONPATH, in child processes and Ray
    workers) for each of them this environment has no real package of; a machine with the real ones uses those.
    Returns the stubbed package names."""
    missing = [name for name in STUBBED_PACKAGES if importlib.util.find_spec(name) is None]
    root = stub_root(missing)
    if root is None:
        return []
    if str(root) not in sys.path:
        sys.path.append(str(root))
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(root) not in entries:
        os.environ["PYTHONPATH"] = os.pathsep.join([*entries, str(root)])
    return missing
