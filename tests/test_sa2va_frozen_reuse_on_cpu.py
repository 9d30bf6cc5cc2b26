"""Frozen-tower reuse, activation checkpointing and the attention switch of the Sa2VA policy, on the tiny replica
of the public remote code (InternVL family, Qwen2 language model).

Reuse must be invisible in the numbers: the towers no LoRA layer sits in (InternViT + mlp1, SAM2's image encoder)
are computed once and handed back, and logits, [SEG] states, reference logits and LoRA gradients are the same bit
for bit (fp32, CPU). Where a LoRA target puts an adapter into a tower, that tower is not reused. Checkpointing
must give the same logits and gradients while keeping less for backward.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from rl_seg.policy import load_policy
from rl_seg.policy.lora import LoraSettings, attach_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sa2va_replica import build_replica  # noqa: E402

VISION_QKV = r"model\.vision_model\.encoder\.layers\.\d+\.attn\.qkv"
SAM2_TRUNK_QKV = r"model\.grounding_encoder\.sam2_model\.image_encoder\.trunk\.blocks\.\d+\.attn\.qkv"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = build_replica(tmp_path_factory.mktemp("sa2va") / "qwen2", family="qwen2")
    return load_policy(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def inputs(policy):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    image[17] = 255
    return policy.preprocess([image])


@pytest.fixture(scope="module")
def frozen(policy, inputs):
    """The frozen towers' outputs, computed once for the module (they depend on the base weights only)."""
    model = attach_lora(policy, LoraSettings(targets="llm", dropout=0.0))
    try:
        return policy.encode_frozen(inputs)
    finally:
        model.unload()


def lora(policy, targets: str):
    """A fresh adapter with nonzero B (a zero B would hide the adapter from the reference comparison)."""
    model = attach_lora(policy, LoraSettings(targets=targets, dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_reuse_gives_identical_logits_reference_and_lora_gradients(policy, inputs, frozen):
    model = lora(policy, "llm+decoder")  # LoRA in the LLM and SAM2's mask decoder: both towers stay frozen
    try:
        assert policy.frozen_towers() == ("vision", "grounding")
        assert frozen.image_tokens.shape[0] == 1 and len(frozen.grounding) == 3
        assert not frozen.image_tokens.requires_grad

        plain = model(inputs)
        plain.logits.square().mean().backward()
        g_plain = grads(model)
        reused = model(inputs, frozen=frozen)
        reused.logits.square().mean().backward()
        g_reused = grads(model)

        assert torch.equal(plain.logits, reused.logits) and torch.equal(plain.seg_hidden, reused.seg_hidden)
        assert g_plain.keys() == g_reused.keys() and any("sam_mask_decoder" in k for k in g_plain)
        for name in g_plain:
            assert torch.equal(g_plain[name], g_reused[name]), name
        assert any(g.abs().max() > 0 for g in g_plain.values())
        with torch.no_grad(), model.disable_adapter():
            ref_plain, ref_reused = model(inputs).logits, model(inputs, frozen=frozen).logits
        assert torch.equal(ref_plain, ref_reused)
        assert not torch.equal(ref_plain, plain.logits.detach())  # the adapter did change the policy
        with pytest.raises(ValueError, match="frozen features of 1 images for 2 images"):
            model(policy.collate([inputs, inputs]), frozen=frozen)
    finally:
        model.unload()


@pytest.mark.parametrize("targets, towers", [
    ("llm", ("vision", "grounding")),
    (VISION_QKV, ("grounding",)),
    (SAM2_TRUNK_QKV, ("vision",)),
    (f"({VISION_QKV}|{SAM2_TRUNK_QKV})", ()),
])
def test_a_tower_with_lora_is_not_reused(policy, inputs, targets, towers):
    model = lora(policy, targets)
    try:
        assert policy.frozen_towers() == towers
        if "grounding" not in towers:  # (SAM2's encoder at 1024 px is the slow part: run where it is skipped)
            features = policy.encode_frozen(inputs)
            if towers:
                assert features.image_tokens is not None and features.grounding is None
            else:
                assert features is None
    finally:
        model.unload()


def test_gradient_checkpointing_same_numbers_less_kept(policy, inputs, frozen):
    model = lora(policy, "llm")
    try:
        def step():
            out = model(inputs, frozen=frozen)
            out.logits.square().mean().backward()
            return out.logits.detach()

        before_bytes = saved_bytes(lambda: model(inputs, frozen=frozen).logits.square().mean())
        logits, g = step(), grads(model)
        assert policy.enable_gradient_checkpointing() == ["llm"]  # no LoRA in the vision tower: nothing to keep there
        after_bytes = saved_bytes(lambda: model(inputs, frozen=frozen).logits.square().mean())
        logits_ckpt, g_ckpt = step(), grads(model)
        assert torch.equal(logits, logits_ckpt)
        for name in g:
            assert torch.equal(g[name], g_ckpt[name]), name
        assert after_bytes < before_bytes, (after_bytes, before_bytes)
        with torch.no_grad():  # no gradient: the layers run as they are
            assert torch.equal(model(inputs, frozen=frozen).logits, logits)
    finally:
        model.unload()


def test_checkpointing_the_vision_tower_only_where_lora_is(policy):
    model = lora(policy, f"({VISION_QKV}|{policy.lora_targets['llm']})")
    try:
        assert policy.enable_gradient_checkpointing() == ["llm", "vision"]
        layers = policy.layer_stacks()
        assert all(getattr(layer, "_rl_seg_checkpointed", False)
                   for name in ("llm", "vision") for layer in layers[name])
    finally:
        model.unload()


def test_attention_switch(policy, inputs, frozen):
    assert policy.llm_module().config._attn_implementation == "sdpa"  # the default where the model allows it
    with torch.no_grad():
        sdpa = policy(inputs, frozen=frozen).logits
        assert policy.use_attention("eager") == "eager"
        eager = policy(inputs, frozen=frozen).logits
        policy.use_attention("sdpa")
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="'sdpa', 'eager' or null"):
        policy.use_attention("flash")
