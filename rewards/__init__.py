"""Vessel-mask metrics, composite rewards and the CPU reward pool.

The metrics and rewards are pure numpy / scikit-image; only :mod:`rewards.pool` imports Ray.
"""

import os as _os

# Before any `import ray` (see rl_seg.ray_env): Ray's token authentication stays on.
_os.environ.setdefault("RAY_AUTH_MODE", "token")

from .composite import COMPONENTS, PRESETS, CompositeReward, RewardResult, get_reward  # noqa: E402
from .metrics import METRICS, MaskPair, Target, compute_metrics  # noqa: E402

__all__ = ["COMPONENTS", "PRESETS", "CompositeReward", "RewardResult", "get_reward", "METRICS", "MaskPair",
           "Target", "compute_metrics"]
