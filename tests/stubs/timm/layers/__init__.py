"""TEST STUB of timm.layers: stochastic depth only."""

import torch
from torch import nn
from _test_stub_support import module_getattr

__all__ = ["DropPath", "drop_path"]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Zero whole samples of the batch with probability ``drop_prob`` while training (the survivors divided by the
    keep probability when ``scale_by_keep``); the identity otherwise."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        keep.div_(keep_prob)
    return x * keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


__getattr__ = module_getattr("timm", __name__)
