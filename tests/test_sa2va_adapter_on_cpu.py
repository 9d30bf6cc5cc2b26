"""The Sa2VA adapter against a structural replica of a Hugging Face Sa2VA checkpoint (built here: real weights
cannot be downloaded on these machines), for both language-model shapes: Qwen2 (Sa2VA-1B/4B) and InternLM2
(Sa2VA-8B/26B).

What must hold for PPO to work on Sa2VA: the policy returns the mask decoder's logits (not the binarized masks
``predict_forward`` returns), gradients reach LoRA on the language model through the [SEG] state, LoRA never lands
in SAM2 or the vision tower, and checkpoints and adapters round-trip exactly.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists

from rl_seg.policy import DEFAULT_PROMPT, load_policy
from rl_seg.policy.lora import LoraSettings, attach_lora, load_adapter, lora_module_names
from rl_seg.policy.sa2va import LORA_TARGET_PRESETS, Sa2VAPolicy, binarize_like_predict_forward

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the replica builder lives beside this file
from sa2va_replica import build_replica  # noqa: E402

LLMS = ["qwen2", "internlm2"]
IMAGE_SHAPE = (40, 56)  # not square: SAM2's side squashes it, the logits stay on the decoder's grid


@pytest.fixture(scope="module", params=LLMS)
def replica(request, tmp_path_factory):
    llm = request.param
    return llm, build_replica(tmp_path_factory.mktemp(f"sa2va_{llm}"), llm=llm, seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    ims = []
    for _ in range(2):
        im = rng.integers(0, 256, size=(*IMAGE_SHAPE, 3), dtype=np.uint8)
        im[rng.integers(0, IMAGE_SHAPE[0]), :] = 255  # a bright "vessel" row
        ims.append(im)
    return ims


def _load(path) -> Sa2VAPolicy:
    # load_policy recognises a Hugging Face Sa2VA folder by config.json's architectures (no rl-seg marker needed).
    policy = load_policy(path)
    assert isinstance(policy, Sa2VAPolicy)
    return policy


def test_load_policy_recognises_a_sa2va_checkpoint(replica):
    llm, path = replica
    assert not (path / "rl_seg_policy.json").exists()
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Sa2VAChatModel"]
    policy = _load(path)
    assert policy.llm_family == llm
    assert policy.lora_targets == LORA_TARGET_PRESETS[llm]
    assert policy.hidden_size == policy.model.config.llm_config.hidden_size
    assert policy.output_size(IMAGE_SHAPE) == (64, 64)  # 256 px SAM2 input / stride 16 x 4 (Sa2VA: 1024 -> 256)


def test_logits_are_low_res_floats_not_masks(replica, images):
    _, path = replica
    policy = _load(path)
    x = policy.preprocess(images)
    with torch.no_grad():
        out = policy(x)
    assert out.logits.shape == (2, *policy.output_size(IMAGE_SHAPE))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert out.seg_hidden.shape == (2, policy.hidden_size)
    assert out.logits.unique().numel() > 1000  # a binarized mask has two values
    probs = torch.sigmoid(out.logits)
    low, high = probs > 0.3, probs > 0.7
    assert (low != high).any() and high.any() and (~low).any()  # thresholds matter again

    # batch independence: an image's logits do not depend on its batch mates or their (longer) prompts
    with torch.no_grad():
        alone = policy(x[:1]).logits
        mixed = policy(x, [DEFAULT_PROMPT, "Please segment the thin retinal vessels in this fundus image."]).logits
    torch.testing.assert_close(alone, out.logits[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[:1], out.logits[:1], atol=1e-5, rtol=1e-5)


def test_predict_forward_binarizes_the_same_logits(replica, images):
    _, path = replica
    policy = _load(path)
    with torch.no_grad():
        logits = policy(policy.preprocess(images)).logits
    masks = policy.predict_forward_masks(images)
    for i, mask in enumerate(masks):
        assert mask.shape == IMAGE_SHAPE and mask.dtype == bool
        assert set(np.unique(mask)) <= {False, True}
        # Sa2VA's own pipeline is "our logits, resized, > 0": the adapter reaches the logits before that line.
        ours = binarize_like_predict_forward(logits[i:i + 1], IMAGE_SHAPE, policy.grounding_size)[0].numpy()
        assert (ours == mask).mean() > 0.995
        # ...and only the logits let a threshold move the mask
        up = F.interpolate(logits[i:i + 1, None], size=IMAGE_SHAPE, mode="bilinear", align_corners=False)[0, 0]
        assert not np.array_equal((up.sigmoid() > 0.3).numpy(), (up.sigmoid() > 0.7).numpy())
    assert policy.dtype == torch.float32  # predict_forward's bfloat16 cast was not triggered


def test_prompt_has_one_seg_and_one_slot_per_image_token(replica, images):
    llm, path = replica
    policy = _load(path)
    text = policy.prompt_text(DEFAULT_PROMPT)
    assert text.count("[SEG]") == 1
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT>")
    assert text.endswith("<|im_start|>assistant\nSure, [SEG].<|im_end|>")
    ids, attn = policy.prompt_ids([DEFAULT_PROMPT])
    assert int((ids == policy.seg_token_id).sum()) == 1
    _, vision = policy.unpack(policy.preprocess(images[:1]))
    with torch.no_grad():
        n_image_tokens = policy.model.extract_feature(vision).shape[1]
    assert int((ids == policy.img_context_token_id).sum()) == n_image_tokens == policy.num_image_tokens
    if llm == "internlm2":
        assert int(ids[0, 0]) == policy.tokenizer.bos_token_id  # encoded as Sa2VA encodes: with InternLM2's BOS
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        policy.prompt_ids(["Please segment [SEG] twice."])

    # the adapter's shortcut (decoder stack only) is the hidden_states[-1] Sa2VA's training path reads
    lm = policy.model.language_model
    embeds = lm.get_input_embeddings()(ids)
    with torch.no_grad():
        full = lm(inputs_embeds=embeds, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(policy._last_hidden(embeds, attn), full)


def test_lora_on_the_llm_gets_gradients_and_nothing_else(replica, images):
    llm, path = replica
    policy = _load(path)
    peft_model = attach_lora(policy, LoraSettings(targets="llm", dropout=0.0))
    names = lora_module_names(peft_model)
    per_layer = 4 if llm == "qwen2" else 2  # q,k,v,o vs fused wqkv, wo
    assert len(names) == per_layer * policy.model.config.llm_config.num_hidden_layers
    assert all(".model.language_model.model.layers." in n for n in names)
    assert not any("grounding_encoder" in n or "vision_model" in n for n in names)

    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x = policy.preprocess(images)
    target = (torch.rand(2, *policy.output_size(IMAGE_SHAPE), generator=torch.Generator().manual_seed(0)) > 0.5)

    def backprop():
        peft_model.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(peft_model(x).logits, target.float())
        loss.backward()

    # lora_B starts at zero, so dL/dA = 0 on the first step and only B gets a gradient ...
    backprop()
    for n, p in trainable.items():
        assert p.grad is not None, n
        assert (p.grad.abs().sum() > 0) == ("lora_B" in n), n
    frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen
    # ... after one update B is non-zero and every A and B gets a gradient through [SEG] -> SAM2 -> logits
    with torch.no_grad():
        for p in trainable.values():
            p -= 1.0 * p.grad
    backprop()
    for n, p in trainable.items():
        assert p.grad.abs().sum() > 0, n

    with pytest.raises(ValueError, match="LoRA"):
        policy.save_pretrained(path.parent / "should_not_exist")


def test_bare_lora_names_would_hit_sam2(replica):
    llm, path = replica
    policy = _load(path)
    linear = [n for n, m in policy.named_modules() if isinstance(m, torch.nn.Linear)]

    # peft's own matching, as LoRA recipes usually write targets (a list of names matches by suffix)
    bare = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    hits = [n for n in linear if check_target_module_exists(bare, n)]
    assert any(n.startswith("model.grounding_encoder.sam2_model.sam_mask_decoder.") for n in hits)
    llm_hits = [n for n in hits if n.startswith("model.language_model.")]
    assert bool(llm_hits) == (llm == "qwen2")  # on InternLM2 (wqkv/wo) bare names miss the LLM entirely
    # even the Qwen2 suffix "self_attn.q_proj" exists in SAM2's memory attention
    suffix = LoraConfig(target_modules=["self_attn.q_proj"])
    assert any("memory_attention" in n for n in linear if check_target_module_exists(suffix, n))
    # and a regex written as ".*q_proj" is no better
    assert any("grounding_encoder" in n for n in linear if re.fullmatch(r".*q_proj", n))

    # applied for real, the bare list puts LoRA into the mask decoder
    wrapped = get_peft_model(policy, LoraConfig(target_modules=["q_proj"], r=2))
    assert any("grounding_encoder" in n for n in lora_module_names(wrapped))

    # the presets never do; "llm+decoder" adds exactly the mask decoder's attention projections
    presets = LORA_TARGET_PRESETS[llm]
    only_llm = [n for n in linear if re.fullmatch(presets["llm"], n)]
    with_decoder = [n for n in linear if re.fullmatch(presets["llm+decoder"], n)]
    assert only_llm and all(n.startswith("model.language_model.model.layers.") for n in only_llm)
    extra = sorted(set(with_decoder) - set(only_llm))
    assert extra and all(n.startswith("model.grounding_encoder.sam2_model.sam_mask_decoder.transformer.")
                         for n in extra)
    assert not any("memory_attention" in n or "vision_model" in n for n in with_decoder)


def test_llm_plus_decoder_preset_trains_the_mask_decoder_attention(replica, images):
    _, path = replica
    policy = _load(path)
    peft_model = attach_lora(policy, LoraSettings(targets="llm+decoder", dropout=0.0))
    names = lora_module_names(peft_model)
    decoder = [n for n in names if ".sam_mask_decoder.transformer." in n]
    assert decoder and len(decoder) + sum(".language_model." in n for n in names) == len(names)
    loss = peft_model(policy.preprocess(images)).logits.square().mean()
    loss.backward()
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_save_pretrained_round_trip(replica, images, tmp_path):
    _, path = replica
    policy = _load(path)
    x = policy.preprocess(images)
    with torch.no_grad():
        before = policy(x).logits
    saved = policy.save_pretrained(tmp_path / "saved")
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["Sa2VAChatModel"] and "AutoModel" in config["auto_map"]
    assert (saved / "modeling_sa2va_chat.py").is_file() and (saved / "sam2.py").is_file()
    assert json.loads((saved / "rl_seg_policy.json").read_text()) == {"policy": "sa2va"}
    again = _load(saved)
    with torch.no_grad():
        after = again(again.preprocess(images)).logits
    assert torch.equal(before, after)


def test_lora_adapter_round_trip(replica, images, tmp_path):
    _, path = replica
    policy = _load(path)
    peft_model = attach_lora(policy, LoraSettings(targets="llm", dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    x = policy.preprocess(images)
    with torch.no_grad():
        adapted = peft_model(x).logits
        with peft_model.disable_adapter():  # the KL reference: same weights, adapter off
            reference = peft_model(x).logits
    assert not torch.allclose(adapted, reference)

    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    fresh = _load(path)
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(fresh, str(adapter_dir))(x).logits
        via_rlseg = load_adapter(_load(path), adapter_dir)(x).logits
    torch.testing.assert_close(via_peft, adapted, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(via_rlseg, adapted, atol=1e-6, rtol=1e-6)


def test_bfloat16_checkpoint_runs_and_agrees(replica, images):
    """Sa2VA ships bfloat16 weights and runs SAM2 under autocast (SAM2 mixes float32 coordinates with the weights'
    dtype); the adapter opens that region itself and still returns float32 logits."""
    _, path = replica
    full = _load(path)
    half = load_policy(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        ref = full(full.preprocess(images)).logits
        out = half(half.preprocess(images)).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.98
