import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

# Ray reads its authentication mode at import: set it before any test module imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
STUBS = Path(__file__).resolve().parent / "stubs"
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


def use_test_stubs() -> None:
    """Put the TEST STUB torchvision/timm on the path (here and, through PYTHONPATH, in Ray workers) for each of
    them this environment has no real package of; a machine with the real ones uses those."""
    root = stub_root([name for name in STUBBED_PACKAGES if importlib.util.find_spec(name) is None])
    if root is None:
        return
    if str(root) not in sys.path:
        sys.path.append(str(root))
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(root) not in entries:
        os.environ["PYTHONPATH"] = os.pathsep.join([*entries, str(root)])


use_test_stubs()


@contextlib.contextmanager
def stubs_hidden():
    """Import a library that probes for torchvision (torchmetrics asks whether it is importable, then imports
    torchvision.models, which the stub does not have) as it would load on a machine without torchvision."""
    root = stub_root([name for name in STUBBED_PACKAGES if not _is_real(name)])
    hidden = {name: module for name, module in sys.modules.items()
              if name.split(".")[0] in STUBBED_PACKAGES and not _is_real(name.split(".")[0])}
    for name in hidden:
        del sys.modules[name]
    on_path = root is not None and str(root) in sys.path
    if on_path:
        sys.path.remove(str(root))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if on_path:
            sys.path.append(str(root))
        sys.modules.update(hidden)


def _is_real(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and str(STUBS) not in (spec.origin or "") and "rl-seg-test-stubs" not in (spec.origin or "")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with token authentication on, and its dashboard (the state API needs it)."""
    import ray

    from rl_seg.ray_env import init_ray

    init_ray(num_cpus=4, include_dashboard=True, log_to_driver=False)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    yield ray
    ray.shutdown()
