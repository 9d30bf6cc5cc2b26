"""TEST STUB of timm: only ``DropPath`` (``timm.layers`` and the deprecated ``timm.models.layers`` path that Sa2VA's
InternViT imports). The real timm requires torchvision, which cannot be imported on the CPU test machines (see the
torchvision stub); tests/conftest.py puts this stub on the path only when no real timm is installed."""

from _test_stub_support import module_getattr

from . import layers, models  # noqa: F401

# The timm release whose DropPath this stub follows; the local label says it is not that release.
__version__ = "1.0.31+teststub"

__getattr__ = module_getattr("timm", __name__)
