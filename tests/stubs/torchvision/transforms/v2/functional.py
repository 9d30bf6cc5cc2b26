"""TEST STUB of torchvision.transforms.v2.functional: importable (transformers' image-processor modules import it
when they see a torchvision), ``InterpolationMode`` only; every function raises NotImplementedError naming the stub.
transformers' torchvision image-processor backend therefore cannot run on the stub: ask for ``backend="pil"``."""

from _test_stub_support import module_getattr

from ..functional import InterpolationMode  # noqa: F401

__getattr__ = module_getattr("torchvision", __name__)
