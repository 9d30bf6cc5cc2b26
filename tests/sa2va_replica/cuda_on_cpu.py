"""TEST ADAPTER, not part of the replica: run Sa2VA's SAM2 inference path, which hard-codes CUDA, on a CPU machine.

The public remote code (and so the replica) puts SAM2's inference state on ``torch.device("cuda")`` in
``init_state``, moves frames and previous logits with ``.cuda()``, and ``predict_forward`` moves token ids with
``.cuda()``. On a CPU-only torch each of these raises ``AssertionError: Torch not compiled with CUDA enabled``.
Inside ``sam2_cuda_on_cpu(model)`` ``Tensor.cuda`` returns the tensor itself and ``init_state`` places the state on
the frames' device, so the same code runs on CPU; it patches the class of the predictor found in ``model``, so it
works on the real remote code and on the replica alike. The autocast region upstream opens names ``cuda``; on a
CPU-only torch it is disabled with a warning, which is what happens without this adapter too.
"""

from __future__ import annotations

import contextlib

import torch


def _predictor_classes(model: torch.nn.Module) -> list[type]:
    classes = {type(m) for m in model.modules() if callable(getattr(type(m), "init_state", None))}
    if not classes:
        raise ValueError(f"no module with an init_state method (a SAM2 video predictor) in {type(model).__name__}")
    return sorted(classes, key=lambda c: c.__qualname__)


@contextlib.contextmanager
def sam2_cuda_on_cpu(model: torch.nn.Module):
    originals = {cls: cls.__dict__.get("init_state") for cls in _predictor_classes(model)}
    tensor_cuda = torch.Tensor.cuda

    def make_init_state(original):
        def init_state(self, images):
            state = original(self, images)
            state["device"] = state["storage_device"] = images.device
            return state
        return init_state

    try:
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        for cls in originals:
            cls.init_state = make_init_state(cls.init_state)
        yield
    finally:
        torch.Tensor.cuda = tensor_cuda
        for cls, original in originals.items():
            if original is None:
                del cls.init_state
            else:
                cls.init_state = original
