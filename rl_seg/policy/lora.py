"""LoRA adapters on policies, with peft, in PEFT's own on-disk format.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with
``PeftModel.from_pretrained(policy, folder)``; its ``base_model_name_or_path`` names the policy it was trained on
(a registry name such as ``default``, or a checkpoint folder), so ``rl-seg merge`` and ``rl-seg eval --adapter``
find the base without being told.

Targets are full-path regular expressions (peft matches a string ``target_modules`` with ``re.fullmatch``
against each module's qualified name): Sa2VA's SAM2 tower has its own ``q_proj``/``k_proj``/``v_proj``, so a bare
name would put LoRA into the mask decoder and, on InternLM2 models, into no language-model layer at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .base import SegPolicy

if TYPE_CHECKING:
    from peft import PeftModel

# peft is imported where an adapter is made or loaded, not with this module: the config (LoraSettings) is read by
# every process of a run, and peft's import (transformers, torch._dynamo) costs ~3 s of CPU in each.

__all__ = ["LoraSettings", "attach_lora", "load_adapter", "lora_module_names", "trainable_parameters",
           "merge_adapter"]


#: Layer types a target may name: peft's LoRA has a Linear and a Conv2d form (the convolution's update is a
#: k x k conv down to r channels followed by a 1 x 1 conv up, so it can change per-pixel features).
LORA_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


@dataclass
class LoraSettings:
    r: int = field(default=16, metadata={"help": "LoRA rank (the original plan: 16-32)", "min": 1})
    alpha: float = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r", "gt": 0})
    dropout: float = field(default=0.05, metadata={
        "help": "dropout on the LoRA input (SFT; the PPO learner runs with dropout off)", "min": 0, "lt": 1})
    targets: str = field(default="llm", metadata={
        "help": "'default' (the policy's own: the default model 'all', Sa2VA 'llm'), another preset of the "
                "policy's lora_targets (default model: llm, llm+decoder, llm+decoder+pixels, all; Sa2VA: llm, "
                "llm+mlp, llm+decoder) or a full-path regex"})

    def preset(self, policy: SegPolicy) -> str:
        """The preset or regex these settings name for ``policy`` ('default' resolved)."""
        return policy.default_lora_preset if self.targets == "default" else self.targets

    def target_regex(self, policy: SegPolicy) -> str:
        targets = self.preset(policy)
        if targets in policy.lora_targets:
            return policy.lora_targets[targets]
        if self.targets == "default":
            raise ValueError(f"{type(policy).__name__} has no LoRA preset {targets!r} (its presets: "
                             f"{sorted(policy.lora_targets)})")
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValueError(f"lora targets {targets!r} is neither a preset of {type(policy).__name__} "
                             f"({sorted(policy.lora_targets)}) nor a valid regex: {exc}") from None
        return targets

    def target_modules(self, policy: SegPolicy) -> list[str]:
        """The names of the layers of ``policy`` these settings put an adapter on."""
        regex = self.target_regex(policy)
        return [n for n, m in policy.named_modules() if re.fullmatch(regex, n) and isinstance(m, LORA_LAYER_TYPES)]


def attach_lora(policy: SegPolicy, settings: LoraSettings | None = None) -> PeftModel:
    """Wrap ``policy`` with fresh LoRA adapters; only the adapters are trainable afterwards."""
    settings = settings or LoraSettings()
    regex = settings.target_regex(policy)
    if not settings.target_modules(policy):
        raise ValueError(f"lora targets {regex!r} match no Linear or Conv2d layer of {type(policy).__name__} "
                         f"(its presets: {sorted(policy.lora_targets)})")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=regex, bias="none")
    return get_peft_model(policy, config)


def load_adapter(policy: SegPolicy, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    from peft import PeftModel

    return PeftModel.from_pretrained(policy, str(adapter_dir), is_trainable=trainable)


def load_adapter_weights(model: PeftModel, adapter_dir: str | Path) -> None:
    """Copy a saved adapter's LoRA weights into ``model``'s adapter (which stays trainable); its shapes must
    match, and every LoRA weight of ``model`` must be covered, else the start would be half fresh."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
    device = next(model.parameters()).device
    state = {k: v.to(device) for k, v in load_file(str(path)).items()}
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # size mismatch: another rank or targets
        raise ValueError(f"{adapter_dir}: adapter does not fit this model's LoRA layout: {exc}") from None
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(f"{adapter_dir}: adapter does not match this model's LoRA layout (missing "
                         f"{missing[:3]}, unexpected {list(getattr(result, 'unexpected_keys', []))[:3]})")


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the modules that carry LoRA weights."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n})


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def merge_adapter(model: PeftModel) -> SegPolicy:
    """Fold the adapter into the base weights and return the plain policy."""
    return model.merge_and_unload()
