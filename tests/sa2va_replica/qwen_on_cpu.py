"""TEST ADAPTER, not part of the replica: what it takes to run a Sa2VA-Qwen checkpoint (upstream's code or the
replica's) on this CPU machine and under transformers 5. Each helper names the obstacle it steps around; the
obstacles themselves are measured facts about the public code and are asserted by the tests, not hidden.

- ``load_processor``: transformers' Qwen-VL processors need a video processor, and video processors exist only
  with torchvision (4.57 and 5.x alike: ``ImportError ... requires the Torchvision library``). With the TEST STUB
  torchvision (tests/stubs) the default image processor is transformers' torchvision backend, whose tensor ops the
  stub does not implement; the PIL image processor from the same preprocessor_config.json is used instead (its
  resize differs from the torchvision backend by rounding only).
- ``post_init_on_load``: the wrapper never calls ``post_init()``, so ``from_pretrained`` on transformers 5 stops at
  ``AttributeError: ... 'all_tied_weights_keys'``; inside this context the wrapper class calls it after __init__.
- ``cuda_on_cpu``: SAM2's inference path hard-codes CUDA (see cuda_on_cpu.sam2_cuda_on_cpu) and, for the Qwen
  wrapper, predict_forward hands SAM2 a bfloat16 image and relies on ``torch.autocast("cuda", bfloat16)`` to run
  SAM2's float32 or bfloat16 layers on it; on a CPU-only torch that autocast is disabled and the first convolution
  fails ("Input type (c10::BFloat16) and bias type (float) should be the same"). Inside this context the CUDA
  autocast regions are CPU autocast regions, which is what they are on a GPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .cuda_on_cpu import sam2_cuda_on_cpu


def torchvision_is_test_stub() -> bool:
    import torchvision

    return str(getattr(torchvision, "__version__", "")).endswith("+teststub")


def load_processor(path: str | Path):
    from transformers import AutoImageProcessor, AutoProcessor

    if torchvision_is_test_stub():
        image_processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
        return AutoProcessor.from_pretrained(str(path), trust_remote_code=True, image_processor=image_processor)
    return AutoProcessor.from_pretrained(str(path), trust_remote_code=True)


@contextlib.contextmanager
def post_init_on_load(path: str | Path, class_ref: str = "modeling_sa2va_qwen.Sa2VAChatModelQwen"):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module(class_ref, str(path))
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.post_init()

    cls.__init__ = __init__
    try:
        yield cls
    finally:
        cls.__init__ = init


@contextlib.contextmanager
def cuda_autocast_on_cpu():
    autocast = torch.autocast

    class CpuForCudaAutocast(autocast):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    torch.autocast = CpuForCudaAutocast
    try:
        yield
    finally:
        torch.autocast = autocast


@contextlib.contextmanager
def cuda_on_cpu(model: torch.nn.Module):
    with sam2_cuda_on_cpu(model), cuda_autocast_on_cpu():
        yield
