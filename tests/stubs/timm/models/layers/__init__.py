"""TEST STUB of timm.models.layers, the deprecated alias of timm.layers (which Sa2VA's InternViT imports DropPath
from); it warns on import as the real one does."""

import warnings

from _test_stub_support import module_getattr
from timm.layers import DropPath, drop_path  # noqa: F401

warnings.warn(f"Importing from {__name__} is deprecated, please import via timm.layers", FutureWarning)

__getattr__ = module_getattr("timm", __name__)
