"""The per-pixel Bernoulli mask policy: sampling, log-probabilities, entropy and KL, in one place.

An action is a binary mask drawn pixel by pixel from p = sigmoid(logits / temperature). Pixels outside the
field of view are not actions: they are never sampled as vessel, and they contribute nothing to log-probs,
entropies or KL. Everything works in logit space (``logsigmoid``) so that confident pixels stay finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MaskDistribution", "sample_masks"]


class MaskDistribution:
    """Independent Bernoulli pixels over a batch of masks (B x H x W logits), optionally restricted to ``valid``."""

    def __init__(self, logits: torch.Tensor, temperature: float = 1.0, valid: torch.Tensor | None = None):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if valid is not None and valid.shape != logits.shape:
            raise ValueError(f"valid mask shape {tuple(valid.shape)} differs from logits shape {tuple(logits.shape)}")
        self.logits = logits / temperature
        self.temperature = temperature
        self.valid = None if valid is None else valid.to(torch.bool)

    @property
    def probs(self) -> torch.Tensor:
        p = torch.sigmoid(self.logits)
        return p if self.valid is None else p * self.valid

    def _mask(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.valid is None else values * self.valid

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A boolean mask per image; invalid pixels are always False."""
        u = torch.rand(self.logits.shape, generator=generator, device=self.logits.device, dtype=self.logits.dtype)
        masks = u < torch.sigmoid(self.logits)
        return masks if self.valid is None else masks & self.valid

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """Per-pixel log pi(a), B x H x W, zero outside the valid region."""
        a = actions.to(self.logits.dtype)
        lp = a * F.logsigmoid(self.logits) + (1 - a) * F.logsigmoid(-self.logits)
        return self._mask(lp)

    def entropy(self) -> torch.Tensor:
        """Per-pixel entropy, B x H x W, zero outside the valid region."""
        p = torch.sigmoid(self.logits)
        h = -(p * F.logsigmoid(self.logits) + (1 - p) * F.logsigmoid(-self.logits))
        return self._mask(h)

    def kl(self, other: "MaskDistribution") -> torch.Tensor:
        """Per-pixel KL(self || other) in closed form, B x H x W, zero outside the valid region."""
        p = torch.sigmoid(self.logits)
        kl = p * (F.logsigmoid(self.logits) - F.logsigmoid(other.logits)) + (1 - p) * (
            F.logsigmoid(-self.logits) - F.logsigmoid(-other.logits)
        )
        return self._mask(kl)

    def num_valid(self) -> torch.Tensor:
        """Valid pixels per image, B (the denominator of per-image means)."""
        if self.valid is None:
            b, h, w = self.logits.shape
            return torch.full((b,), h * w, device=self.logits.device, dtype=self.logits.dtype)
        return self.valid.flatten(1).sum(1).to(self.logits.dtype)


def sample_masks(logits: torch.Tensor, k: int, temperature: float, seed: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """K boolean masks from one image's logits (1 x H x W or H x W), drawn with a generator seeded by ``seed`` on
    the logits' device: the same logits and seed give the same masks in a rollout actor and in a learner rank."""
    logits = logits.reshape(1, *logits.shape[-2:]).float()
    if valid is not None:
        valid = valid.reshape(1, *valid.shape[-2:]).to(logits.device).expand(k, -1, -1)
    dist = MaskDistribution(logits.expand(k, -1, -1), temperature, valid)
    return dist.sample(torch.Generator(device=logits.device).manual_seed(int(seed)))
