"""Ray Tune sweeps over reward weights, learning rate and PPO settings; see :mod:`tune.sweep`."""

import os as _os

# Before any `import ray` (see rl_seg.ray_env): Ray's token authentication stays on.
_os.environ.setdefault("RAY_AUTH_MODE", "token")
