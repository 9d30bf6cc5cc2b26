"""The policy interface shared by rollout workers, learners and evaluation.

A policy maps a batch of images (and a text prompt each) to mask logits, B x H x W, with gradients, and the
hidden state of the [SEG] token that produced them (a value head reads it). Nothing here binarizes: reaching the
logits is the reason this project exists (DESIGN.md).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError

__all__ = ["PolicyOutput", "SegPolicy", "POLICIES", "register_policy", "load_policy", "policy_class", "DEFAULT_PROMPT",
           "autocast_for", "RemoteCodeError", "remote_code", "REMOTE_CODE_FLAG"]

#: The Sa2VA-style request every policy is trained and evaluated with unless a dataset says otherwise.
DEFAULT_PROMPT = "Please segment the blood vessels."


@dataclass
class PolicyOutput:
    logits: torch.Tensor  # B x H x W, float, at the policy's native output resolution
    seg_hidden: torch.Tensor  # B x D, the language model's hidden state at the [SEG] token


class SegPolicy(nn.Module, ABC):
    """A segmentation policy whose mask decoder is prompted by a language model's [SEG] token."""

    #: Registry name (``load_policy(name)``).
    name: ClassVar[str] = ""
    #: peft ``target_modules`` regex for LoRA on the language model's attention, full paths only (a bare
    #: ``q_proj`` would also match attention layers inside the vision or mask-decoder towers).
    lora_targets: ClassVar[dict[str, str]] = {}
    #: The preset ``policy.lora.targets=default`` means for this policy.
    default_lora_preset: ClassVar[str] = "llm"
    #: Keyword options ``load_policy`` may pass to ``from_pretrained`` / ``load_default``.
    load_options: ClassVar[frozenset[str]] = frozenset({"device", "trust_remote_code"})
    #: Whether ``forward`` takes images of different sizes in one batch (native sizes with micro-batches of several
    #: images): logits are then padded to the largest, image i at ``logits[i, :H_i, :W_i]``.
    mixed_size_batches: ClassVar[bool] = False

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str] | None = None) -> PolicyOutput:
        """Logits for preprocessed images (``preprocess``); ``prompts`` default to :data:`DEFAULT_PROMPT`."""

    @abstractmethod
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 H x W x 3 images (one size per batch) -> the tensor ``forward`` takes, on the policy's device."""

    @abstractmethod
    def save_pretrained(self, path: str | Path) -> Path:
        """Write weights and config so that ``load_policy(path)`` rebuilds this policy."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "SegPolicy":
        """Rebuild a policy from a checkpoint folder."""

    @classmethod
    def load_default(cls, **kwargs) -> "SegPolicy":
        """The policy a bare registry name loads; policies without shipped weights need a folder."""
        raise ValueError(f"policy {cls.name!r} has no shipped weights: give a checkpoint folder instead")

    @property
    def hidden_size(self) -> int:
        """Width of ``PolicyOutput.seg_hidden``."""
        raise NotImplementedError

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Logit resolution for an input of ``image_size``; the identity for full-resolution decoders."""
        return image_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def upsample_logits(self, logits: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """B x h x w logits of a coarser grid at ``image_size`` (bilinear), for scoring against a full-size mask."""
        return torch.nn.functional.interpolate(logits[:, None].float(), size=tuple(image_size), mode="bilinear",
                                               align_corners=False)[:, 0]

    def collate(self, batch: Sequence) -> torch.Tensor:
        """Several ``preprocess`` results as one batch (policies with structured inputs override this)."""
        return torch.cat(list(batch))

    def encode_frozen(self, inputs):
        """The outputs of the towers no LoRA layer sits in, computed once for ``forward(inputs, frozen=...)``
        (which policies with such towers accept); None: this policy has none to hand over."""
        return None

    def enable_gradient_checkpointing(self) -> list[str]:
        """Activation checkpointing of the policy's transformer layers; returns the layer stacks wrapped."""
        raise ValueError(f"policy.gradient_checkpointing: {type(self).__name__} has no transformer layer stacks to "
                         f"checkpoint (it is for Sa2VA checkpoints)")

    @classmethod
    def recognizes(cls, config: dict) -> bool:
        """Whether a checkpoint folder without rl-seg's marker, whose ``config.json`` is ``config``, is this kind."""
        return False


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on a GPU, full precision on a CPU: the one mixed-precision rule of rollout, learner,
    evaluation and SFT (a fresh context each call: autocast objects are not meant to be re-entered)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


POLICIES: dict[str, type[SegPolicy]] = {}


def register_policy(name: str):
    def wrap(cls):
        if name in POLICIES:
            raise ValueError(f"policy {name!r} is already registered")
        POLICIES[name] = cls
        cls.name = name
        return cls

    return wrap


#: How a user allows remote code: the config field (train, tune, the service) and the flag (rl-seg eval / merge).
REMOTE_CODE_FLAG = "policy.trust_remote_code=true (rl-seg eval/merge: --trust-remote-code)"


class RemoteCodeError(ConfigError):
    """A checkpoint that would run its own Python, loaded without the user allowing it (a setting the user must
    change, so a ConfigError: the command line reports it without a traceback)."""


def remote_code(path: str | Path) -> dict | None:
    """The ``auto_map`` of a checkpoint folder's config.json (Hugging Face remote code: classes defined by .py
    files in the folder, which transformers imports and runs), or None when it has none."""
    config = Path(path) / "config.json"
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    auto_map = values.get("auto_map") if isinstance(values, dict) else None
    return auto_map if isinstance(auto_map, dict) and auto_map else None


def load_policy(name_or_path: str | Path, trust_remote_code: bool = False, check: bool = True,
                **kwargs) -> SegPolicy:
    """A policy by registry name (``default`` loads the shipped checkpoint), or from a checkpoint folder.

    A folder names its policy class in ``rl_seg_policy.json`` (written by ``save_pretrained``); a Hugging Face Sa2VA
    checkpoint is recognised from its ``config.json`` (``auto_map``, ``architectures``). A folder whose config.json
    has an ``auto_map`` carries remote code: it is refused unless ``trust_remote_code`` (then passed on to the policy
    class's ``from_pretrained``). ``kwargs`` are the policy's load options (``device``, Sa2VA's ``dtype``,
    ``action_resolution`` and ``max_tiles``). Unless ``check`` is off, the loaded policy must have finite weights and
    give finite logits on a canary image (``rl_seg.guards``).
    """
    from . import _builtin  # noqa: F401 - registers the built-in policies

    key = str(name_or_path)
    if key in POLICIES:
        cls, path = POLICIES[key], None
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"policy {key!r} is neither a registered name ({sorted(POLICIES)}) nor a folder")
        auto_map = remote_code(path)
        if auto_map is not None:
            if not trust_remote_code:
                raise RemoteCodeError(f"{path} holds remote code (config.json auto_map: {sorted(auto_map)}) that "
                                      f"would run in this process; if you trust it, set {REMOTE_CODE_FLAG}")
            kwargs["trust_remote_code"] = True
        cls = _policy_class(path)
    options = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(options) - cls.load_options)
    if unknown:
        raise ValueError(f"policy {key!r} ({cls.__name__}) has no option {', '.join(unknown)} "
                         f"(its options: {', '.join(sorted(cls.load_options))})")
    policy = cls.load_default(**options) if path is None else cls.from_pretrained(path, **options)
    if check:
        from ..guards import check_policy

        check_policy(policy, key)
    return policy


def policy_class(name_or_path: str | Path) -> type[SegPolicy]:
    """The class ``load_policy`` would build for a registry name or checkpoint folder, without loading weights."""
    from . import _builtin  # noqa: F401 - registers the built-in policies

    key = str(name_or_path)
    return POLICIES[key] if key in POLICIES else _policy_class(Path(name_or_path))


def _policy_class(path: Path) -> type[SegPolicy]:
    marker = path / "rl_seg_policy.json"
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text())["policy"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{marker}: expected {{\"policy\": NAME}}: {exc}") from exc
        if kind not in POLICIES:
            raise ValueError(f"{marker}: unknown policy {kind!r}; known: {sorted(POLICIES)}")
        return POLICIES[kind]
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise ValueError(f"{config_file}: not valid JSON: {exc}") from exc
        for cls in POLICIES.values():
            if cls.recognizes(config):
                return cls
        raise ValueError(f"{path}: not a policy checkpoint (no rl_seg_policy.json, and {config_file.name}'s "
                         f"architectures {config.get('architectures')} is none rl-seg loads: Sa2VAChatModel, "
                         f"Sa2VAChatModelQwen)")
    raise ValueError(f"{path}: not a policy checkpoint (no rl_seg_policy.json and no config.json)")
