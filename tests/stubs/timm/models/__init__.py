"""TEST STUB of timm.models: no model is implemented; only the deprecated ``layers`` alias exists."""

from _test_stub_support import module_getattr

__getattr__ = module_getattr("timm", __name__)
