"""Policies that expose mask logits: the interface, the Bernoulli mask distribution, LoRA, and the built-ins."""

from .base import DEFAULT_PROMPT, POLICIES, PolicyOutput, SegPolicy, load_policy, register_policy
from .distribution import MaskDistribution

__all__ = ["DEFAULT_PROMPT", "POLICIES", "PolicyOutput", "SegPolicy", "load_policy", "register_policy",
           "MaskDistribution"]
