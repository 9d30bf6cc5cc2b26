"""rl-seg: PPO fine-tuning of vision-language vessel-segmentation models on Ray."""

import os as _os

# Ray reads its authentication mode when it is first imported, so this must precede any `import ray`
# (rl_seg.ray_env explains the policy: token authentication stays on).
_os.environ.setdefault("RAY_AUTH_MODE", "token")

__version__ = "0.1.0"
