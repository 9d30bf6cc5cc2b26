"""Numerical guards: a NaN stops work with a message that says what, where and what to do, never a run that
"completes" on it.

At load (:func:`check_policy`): every weight and buffer must be finite, and a canary forward on a synthetic image must
give finite logits; when it does not, forward hooks name the first module whose output went non-finite (under
transformers 5, remote code whose rotary buffers were left uninitialised fails here, in the attention). In training,
the learner checks logits, log-probs, advantages, the loss and the gradients (``rl_seg.roles.learner``) and stops
the run through :class:`NonFiniteError`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

__all__ = ["NonFiniteError", "check_finite_weights", "canary_forward", "check_policy", "non_finite"]


class NonFiniteError(ValueError):
    """Non-finite numbers where finite ones are required; the message always contains "non-finite"."""


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [name for name, t in tensors if t is not None and t.is_floating_point() and not torch.isfinite(t).all()]


def _finite_in_place(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds only finite values, without temporaries of its size. PyTorch's
    ``torch.isfinite(t)`` is ``(t == t) * (t.abs() != inf)``: for bf16 five bytes per element alive at once (717 MiB
    for 143M elements, measured on CPU), 1.45 GiB for a 4B model's 151,674 x 2,048 embedding, which made the load
    check the peak of a colocated rollout actor on an H200 (BENCHMARKS "Sa2VA scale on one H200"). NaN and inf
    propagate through a sum (no copy: half types accumulate in float32 inside the kernel); only a sum that is not
    finite (that, or an overflow) is checked exactly, in slices."""
    if not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    flat = t.reshape(-1)
    step = 1 << 24
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def check_finite_weights(module: torch.nn.Module, source: str) -> None:
    """Refuse a model with a NaN or infinite parameter or buffer, naming the checkpoint and the first ones."""
    bad = [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
           if not _finite_in_place(t.detach())]
    if bad:
        raise NonFiniteError(f"{source}: {len(bad)} weight tensor(s) hold non-finite values (NaN or inf), e.g. "
                             f"{', '.join(bad[:3])}: the checkpoint is damaged; use an earlier one")


def canary_image(size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A fixed, smooth RGB image with a dark line across it: every tower sees ordinary pixel values."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full_like(x, 128)], -1)
    image[h // 2 - 1:h // 2 + 1] = 20
    return image.astype(np.uint8)


@torch.no_grad()
def canary_forward(policy, source: str) -> None:
    """One forward on :func:`canary_image`; non-finite logits or [SEG] state -> :class:`NonFiniteError` naming the
    checkpoint and, when the hooks saw it, the first module whose output was non-finite."""
    first: list[str] = []
    names = {m: n for n, m in policy.named_modules()}

    def hook(module, _inputs, output):
        if first:
            return
        outs = output if isinstance(output, (tuple, list)) else (output,)
        if any(isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all() for o in outs):
            first.append(f"{names.get(module, '?')} ({type(module).__name__})")

    handles = [m.register_forward_hook(hook) for m in policy.modules()]
    try:
        out = policy(policy.preprocess([canary_image()]))
    finally:
        for h in handles:
            h.remove()
    bad = non_finite([("logits", out.logits), ("[SEG] hidden state", out.seg_hidden)])
    if bad:
        where = f"; the first non-finite output came from {first[0]}" if first else ""
        raise NonFiniteError(f"{source}: a test forward at load gives non-finite {' and '.join(bad)}{where}. The "
                             f"weights are finite, so the model computes NaN/inf: for remote code, check the "
                             f"transformers version (rl-seg's Sa2VA support table in README.md)")


def check_policy(policy, source: str) -> None:
    """Both load-time checks."""
    check_finite_weights(policy, source)
    was_training = policy.training
    policy.eval()
    try:
        canary_forward(policy, source)
    finally:
        policy.train(was_training)
