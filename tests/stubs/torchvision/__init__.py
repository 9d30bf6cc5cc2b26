"""TEST STUB of torchvision, for machines where the real one cannot be imported.

PyPI has no CPU build of torchvision for the CPU torch these test machines run; its CUDA wheel fails at import
("operator torchvision::nms does not exist") and, installed, even breaks ``import transformers``. Sa2VA's public
remote code and qwen_vl_utils import torchvision for a handful of PIL-image transforms; this stub implements only
those, the way torchvision does them for PIL images (see ``transforms``), plus the import-time names transformers
reads when it sees a torchvision (``transforms.functional.pil_to_tensor``, ``transforms.v2.functional``).
Everything else raises NotImplementedError naming this stub. tests/conftest.py puts it on the path only when no
real torchvision is installed.
"""

from _test_stub_support import module_getattr

from . import io, transforms  # noqa: F401  (the real package imports its submodules too)

# The torchvision release whose behaviour this stub follows; the local label says it is not that release.
__version__ = "0.28.0+teststub"

__getattr__ = module_getattr("torchvision", __name__)
