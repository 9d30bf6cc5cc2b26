"""TEST STUB of torchvision.transforms.v2: present only because transformers imports ``transforms.v2.functional``
at module level whenever it sees a torchvision; nothing in it is implemented."""

from _test_stub_support import module_getattr

from . import functional  # noqa: F401

__getattr__ = module_getattr("torchvision", __name__)
