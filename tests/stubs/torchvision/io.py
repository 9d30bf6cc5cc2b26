"""TEST STUB of torchvision.io: video and image decoding are not implemented (qwen_vl_utils imports the module and
only uses it to read videos, which the tests do not do)."""

from _test_stub_support import module_getattr

__getattr__ = module_getattr("torchvision", __name__)
