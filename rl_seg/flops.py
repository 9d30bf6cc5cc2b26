"""FLOPs as torch counts them (``torch.utils.flop_counter``), for model-FLOPs utilization (MFU) figures.

``flop_counter()`` is ``FlopCounterMode`` with formulas for the fused attention kernels that torch's own registry
gets wrong before torch 2.12: grouped-query attention (fewer key/value heads than query heads, as Qwen2 has) is
rejected there, while every query head is computed against the shared key/value heads by the kernels.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = ["flop_counter", "ATTENTION_FLOPS", "FLOP_FORMULAS"]


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", x))  # a tensor, or already a shape where torch wraps the formula itself


def _attention_forward_flops(query, key, value, *args, **kwargs) -> int:
    b, h, sq, d = _shape(query)
    sk, dv = _shape(key)[-2], _shape(value)[-1]
    return 2 * b * h * sq * sk * (d + dv)  # Q K^T, then P V, every query head


def _attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    b, h, sq, d = _shape(query)
    sk, dv = _shape(key)[-2], _shape(value)[-1]
    return 2 * b * h * sq * sk * (2 * d + 3 * dv)  # scores recomputed, dP, dV, dQ, dK


for _f in (_attention_forward_flops, _attention_backward_flops):
    _f._get_raw = True  # FlopCounterMode passes tensors, not shapes

ATTENTION_FLOPS = {
    **{getattr(torch.ops.aten, f"_scaled_dot_product_{kind}_attention"): _attention_forward_flops
       for kind in ("efficient", "flash", "cudnn") if hasattr(torch.ops.aten, f"_scaled_dot_product_{kind}_attention")},
    **{getattr(torch.ops.aten, f"_scaled_dot_product_{kind}_attention_backward"): _attention_backward_flops
       for kind in ("efficient", "flash", "cudnn")
       if hasattr(torch.ops.aten, f"_scaled_dot_product_{kind}_attention_backward")},
}
FLOP_FORMULAS = {**flop_registry, **ATTENTION_FLOPS}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
