"""rl-seg: PPO fine-tuning of vision-language vessel-segmentation models on Ray."""

import os as _os

# Ray reads its authentication mode when it is first imported, so this must precede any `import ray`
# (rl_seg.ray_env explains the policy: token authentication stays on).
_os.environ.setdefault("RAY_AUTH_MODE", "token")


def _torch_extensions_in_this_environment() -> None:
    """DeepSpeed's CPU ops are compiled into torch's extensions folder, shared by default by every environment of
    the user and keyed by op name only: two checkouts (or a CI clone beside a work tree) would rebuild the same op
    over each other's, a minute each time. Each environment keeps its own when it can write there."""
    import sys

    folder = _os.path.join(sys.prefix, "torch_extensions")
    if sys.prefix != sys.base_prefix and _os.access(sys.prefix, _os.W_OK):
        _os.environ.setdefault("TORCH_EXTENSIONS_DIR", folder)


_torch_extensions_in_this_environment()

__version__ = "0.1.0"
