import contextlib
import importlib.util
import os
import sys
from pathlib import Path

# Ray reads its authentication mode at import: set it before any test module imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train starts a preemption watcher per run (an actor polling the nodes' drain state, for spot instances): a
# process that imports Ray Train, ~3 s of CPU on the 2-core CI machine, per run; nothing here is ever preempted.
# Every Ray instance the tests start inherits this (ray.init and `ray start` take the environment of this process).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sa2va_replica.stubs import STUBBED_PACKAGES, STUBS, stub_root, use_test_stubs  # noqa: E402,F401


#: The packages this environment takes from tests/stubs (none where the real ones are installed).
STUBBED_HERE = use_test_stubs()


@contextlib.contextmanager
def stubs_hidden():
    """Import a library that probes for torchvision (torchmetrics asks whether it is importable, then imports
    torchvision.models, which the stub does not have) as it would load on a machine without torchvision."""
    root = stub_root(STUBBED_HERE)
    hidden = {name: module for name, module in sys.modules.items() if name.split(".")[0] in STUBBED_HERE}
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


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with token authentication on, and its dashboard (the state API needs it)."""
    import ray

    from rl_seg.ray_env import init_ray

    init_ray(num_cpus=4, include_dashboard=True, log_to_driver=False)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """The default model at its tiny size (seed 0), saved as a checkpoint folder."""
    import torch

    from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel

    torch.manual_seed(0)
    return DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(tmp_path_factory.mktemp("tiny") / "policy")


@pytest.fixture(scope="session")
def colocated_run(ray_local, tiny_policy, tmp_path_factory):
    """One colocated PPO run (``ppo_runs.COMPARED``), shared by the tests that compare other runs with it (an exact
    resume, placement=hybrid) and check it end to end: a Ray run costs the 2-core CI machine about 25 s."""
    from ppo_runs import COMPARED, config
    from rl_seg.train import run_training

    cfg = config(tmp_path_factory.mktemp("colocated"), tiny_policy, "colocated", *COMPARED)
    return cfg, run_training(cfg)
