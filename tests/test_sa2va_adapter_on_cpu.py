"""The Sa2VA adapter against the replica of the public remote code (tests/sa2va_replica: upstream's structure,
numerics and transformers-5 breakage; real weights cannot be downloaded here), for every family: the InternVL
releases with a Qwen2 or an InternLM2 language model, and the Qwen2.5-VL / Qwen3-VL releases.

What must hold for PPO on Sa2VA: an unmodified checkpoint folder loads under the project's transformers (the
repairs are ``test_sa2va_compat_on_cpu.py``'s subject), the policy returns logits at the image's resolution
upsampled exactly as ``predict_forward`` does (its binarized masks are reproduced), gradients reach LoRA on the
language model through [SEG] and the upsampling, LoRA never lands in SAM2 or a vision tower unless asked, and
checkpoints and adapters round-trip exactly.
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
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import check_target_module_exists

from rl_seg.policy import DEFAULT_PROMPT, load_policy
from rl_seg.policy.base import RemoteCodeError
from rl_seg.policy.lora import LoraSettings, attach_lora, load_adapter, lora_module_names
from rl_seg.policy.sa2va import (LORA_TARGET_PRESETS, QWEN_VL_LORA_PRESETS, Sa2VAInputs, Sa2VAPolicy, Sa2VAQwenPolicy,
                                 binarize_like_predict_forward, split_into_tiles, tile_grid,
                                 upsample_like_predict_forward)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the replica builders live beside this file
from sa2va_replica import build_replica  # noqa: E402
from sa2va_replica.build_qwen import build_qwen_replica  # noqa: E402
from sa2va_replica.cuda_on_cpu import sam2_cuda_on_cpu  # noqa: E402
from sa2va_replica.qwen_on_cpu import load_processor  # noqa: E402

INTERNVL = ["qwen2", "internlm2"]
QWEN_VL = ["qwen2_5_vl", "qwen3_vl"]
IMAGE_SHAPE = (40, 56)  # not square: SAM2's side squashes it, the actions stay on the image's grid


def build(family: str, path: Path) -> Path:
    return build_replica(path, family=family) if family in INTERNVL else build_qwen_replica(path, family=family)


def load(family: str, path: Path, **options):
    """What ``rl-seg train``/``eval`` do with a folder. Qwen-VL processors need a video processor, which needs a
    real torchvision: on these machines the test hands the PIL-backed processor over (qwen_on_cpu)."""
    if family in QWEN_VL:
        options.setdefault("processor", load_processor(path))
    return load_policy(path, trust_remote_code=True, **options)


@pytest.fixture(scope="module", params=INTERNVL + QWEN_VL)
def replica(request, tmp_path_factory):
    family = request.param
    return family, build(family, tmp_path_factory.mktemp(f"sa2va_{family}") / "ckpt")


@pytest.fixture(scope="module")
def policies(replica):
    """One loaded policy per family, shared by the read-only tests (loading runs the canary forward)."""
    family, path = replica
    return load(family, path)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    ims = []
    for _ in range(2):
        im = rng.integers(0, 256, size=(*IMAGE_SHAPE, 3), dtype=np.uint8)
        im[rng.integers(0, IMAGE_SHAPE[0]), :] = 255  # a bright "vessel" row
        ims.append(im)
    return ims


def test_load_recognises_the_family_and_needs_trust(replica, policies):
    family, path = replica
    config = json.loads((path / "config.json").read_text())
    assert not (path / "rl_seg_policy.json").exists()
    # a Qwen2.5-VL release names transformers' own class in architectures; the wrapper only in auto_map
    expected = Sa2VAPolicy if family in INTERNVL else Sa2VAQwenPolicy
    assert isinstance(policies, expected)
    assert config["auto_map"]["AutoModel"].endswith(expected.architectures[0])
    with pytest.raises(RemoteCodeError, match="policy.trust_remote_code=true"):
        load_policy(path)
    if family in INTERNVL:
        assert policies.llm_family == family
        assert policies.lora_targets == LORA_TARGET_PRESETS[family]
    else:
        assert policies.lora_targets == QWEN_VL_LORA_PRESETS
    if family in QWEN_VL:  # tiles are the InternVL family's; Qwen-VL sizes images with its processor
        with pytest.raises(ValueError, match="max_tiles applies to the InternVL family"):
            load_policy(path, trust_remote_code=True, max_tiles=4, processor=policies.processor)
    with pytest.raises(ValueError, match="has no option bogus"):
        load_policy(path, trust_remote_code=True, bogus=1)


def test_logits_at_the_image_resolution_upsampled_as_predict_forward(policies, images):
    policy = policies
    x = policy.preprocess(images)
    assert isinstance(x, Sa2VAInputs) and len(x) == 2
    with torch.no_grad():
        out = policy(x)
    assert out.logits.shape == (2, *IMAGE_SHAPE) == (2, *policy.output_size(IMAGE_SHAPE))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert out.seg_hidden.shape == (2, policy.hidden_size)
    assert out.logits.unique().numel() > 500  # not a binarized mask
    probs = torch.sigmoid(out.logits)
    assert ((probs > 0.3) != (probs > 0.7)).any()  # thresholds matter again

    # image resolution = the native 256 x 256 grid through predict_forward's two bilinear steps, in the graph
    policy.action_resolution = "native"
    try:
        with torch.no_grad():
            native = policy(x).logits
    finally:
        policy.action_resolution = "image"
    assert native.shape == (2, 256, 256) == (2, *policy.native_grid)
    torch.testing.assert_close(upsample_like_predict_forward(native, 1024, IMAGE_SHAPE), out.logits)
    torch.testing.assert_close(policy.upsample_logits(native, IMAGE_SHAPE), out.logits)

    # an image's logits do not depend on its batch mates or their (longer) prompts
    with torch.no_grad():
        alone = policy(policy.preprocess(images[:1])).logits
        mixed = policy(x, [DEFAULT_PROMPT, "Please segment the thin retinal vessels in this fundus image."]).logits
    torch.testing.assert_close(alone, out.logits[:1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[:1], out.logits[:1], atol=1e-4, rtol=1e-4)

    # images of other sizes in one batch (native sizes, micro-batches of several images): each image's logits at
    # its own size, top-left in a batch padded to the largest, equal to what it gets alone
    assert policy.mixed_size_batches
    small = images[1][:32, :48]
    with torch.no_grad():
        padded = policy(policy.collate([x, policy.preprocess([small])])).logits
        small_alone = policy(policy.preprocess([small])).logits
    assert padded.shape == (3, *IMAGE_SHAPE)
    torch.testing.assert_close(padded[:2], out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded[2:, :32, :48], small_alone, atol=1e-4, rtol=1e-4)
    assert (padded[2, 32:] == 0).all() and (padded[2, :, 48:] == 0).all()


def test_reproduces_predict_forward(replica, policies):
    """The checkpoint's own predict_forward (greedy answer -> [SEG] -> SAM2 -> resize -> sigmoid > 0.5) against the
    adapter's logits binarized: the same masks, fp32, on images of DRIVE's and ARCADE's shapes."""
    family, _ = replica
    policy = policies
    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(584, 565, 3), (512, 512, 3)]]
    with torch.no_grad():
        logits = [policy(policy.preprocess([im])).logits for im in ims]
    if family == "internlm2":
        # Under transformers 5 InternLM2's remote LM class does not inherit GenerationMixin, so upstream's
        # predict_forward cannot generate (rl-seg never generates; README says so).
        with sam2_cuda_on_cpu(policy.model), pytest.raises(AttributeError, match="generation_config"):
            policy.predict_forward_masks(ims[:1])
        return
    if family in QWEN_VL:
        # Sa2VAChatModelQwen hard-codes torch_dtype = bfloat16 for SAM2's input (and its CUDA autocast makes that run
        # on a GPU); for an fp32 comparison on CPU the reference runs its own code in fp32
        policy.model.torch_dtype = torch.float32
    with sam2_cuda_on_cpu(policy.model):
        masks = policy.predict_forward_masks(ims)
    for im, mask, lg in zip(ims, masks, logits):
        assert mask.shape == im.shape[:2] and mask.dtype == bool
        ours = binarize_like_predict_forward(lg, im.shape[:2])[0].numpy()
        agreement = float((ours == mask).mean())
        assert agreement >= 0.999, (family, im.shape, agreement)
        assert 0.01 < mask.mean() < 0.99  # a real mask, not an all-or-nothing answer


def test_gradients_reach_the_llm_lora_through_the_upsampling(replica, images):
    family, path = replica
    policy = load(family, path)
    peft_model = attach_lora(policy, LoraSettings(targets="default", dropout=0.0))  # 'default' = 'llm' on Sa2VA
    names = lora_module_names(peft_model)
    assert names and all(re.search(r"language_model\.(model\.)?layers\.\d+\.(self_attn|attention)\.", n) for n in names)
    assert not any("grounding_encoder" in n or "vision_model" in n or ".visual." in n for n in names)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x = policy.preprocess(images)
    target = (torch.rand(2, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)) > 0.5).float()

    def backprop():
        peft_model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(peft_model(x).logits, target).backward()

    # lora_B starts at zero, so only B gets a gradient on the first step; after one update every A and B does
    backprop()
    for n, p in trainable.items():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == ("lora_B" in n), n
    assert not [n for n, p in peft_model.named_parameters() if not p.requires_grad and p.grad is not None]
    with torch.no_grad():
        for p in trainable.values():
            p -= 1.0 * p.grad
    backprop()
    for n, p in trainable.items():
        assert p.grad.abs().sum() > 0, n
    with pytest.raises(ValueError, match="LoRA"):
        policy.save_pretrained(path.parent / "should_not_exist")


def test_lora_presets_per_family(policies):
    policy = policies
    linear = [n for n, m in policy.named_modules() if isinstance(m, torch.nn.Linear)]

    def hits(preset):
        return {n for n in linear if re.fullmatch(policy.lora_targets[preset], n)}

    llm, mlp, decoder = hits("llm"), hits("llm+mlp"), hits("llm+decoder")
    assert llm and all(re.search(r"(self_attn|attention)\.(q_proj|k_proj|v_proj|o_proj|wqkv|wo)$", n) for n in llm)
    extra_mlp = mlp - llm  # upstream's wrap_llm_lora targets: attention and the MLP
    assert extra_mlp and all(re.search(r"(mlp\.(gate|up|down)_proj|feed_forward\.w[123])$", n) for n in extra_mlp)
    extra_decoder = decoder - llm
    assert extra_decoder and all(".sam_mask_decoder.transformer." in n for n in extra_decoder)
    everything = llm | mlp | decoder
    assert not any("vision_model" in n or ".visual." in n or "memory_attention" in n or "image_encoder" in n
                   for n in everything)
    assert LoraSettings(targets="default").preset(policy) == "llm"
    # bare names, as LoRA recipes often write them, would put LoRA into SAM2 (and miss InternLM2's wqkv/wo)
    bare = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert any(".grounding_encoder." in n for n in linear if check_target_module_exists(bare, n))


def test_dynamic_tiling_as_predict_forward():
    # InternVL's rule: DRIVE and ARCADE images are one tile; wide or large images get a grid plus a thumbnail
    assert tile_grid(565, 584, 12, 448) == (1, 1)
    assert tile_grid(512, 512, 12, 448) == (1, 1)
    assert tile_grid(1200, 400, 12, 448) == (3, 1)
    assert tile_grid(1000, 1000, 12, 448) == (3, 3)  # ties with (1, 1) and (2, 2): the image has > half of 3x3 tiles
    assert tile_grid(500, 500, 12, 448) == (1, 1)    # the same tie, a smaller image
    wide = np.zeros((400, 1200, 3), np.uint8)
    assert [t.shape for t in split_into_tiles(wide, 12, 448)] == [(448, 448, 3)] * 4  # 3 tiles + thumbnail
    assert len(split_into_tiles(wide, 1, 448)) == 1


def test_batches_with_different_tile_counts(tmp_path):
    path = build_replica(tmp_path / "ckpt", family="qwen2")
    policy = load("qwen2", path, max_tiles=12)
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, size=(300, 900, 3), dtype=np.uint8)   # 3 tiles + thumbnail
    other = rng.integers(0, 256, size=(300, 900, 3), dtype=np.uint8)
    other[:, :300] = 0
    x = policy.preprocess([wide, other])
    assert x.tiles == [4, 4] and x.vision.shape[0] == 8
    square = policy.preprocess([rng.integers(0, 256, size=(300, 300, 3), dtype=np.uint8)])
    assert square.tiles == [1]
    with torch.no_grad():
        both = policy(x).logits
        first = policy(policy.preprocess([wide])).logits
        ids, _ = policy.prompt_ids([DEFAULT_PROMPT, DEFAULT_PROMPT], [4, 1])
    torch.testing.assert_close(both[:1], first, atol=1e-4, rtol=1e-4)
    assert int((ids[0] == policy.img_context_token_id).sum()) == 4 * policy.num_image_tokens
    assert int((ids[1] == policy.img_context_token_id).sum()) == policy.num_image_tokens


def test_save_pretrained_and_adapter_round_trip(replica, images, tmp_path):
    family, path = replica
    policy = load(family, path)
    x = policy.preprocess(images)
    with torch.no_grad():
        before = policy(x).logits
    saved = policy.save_pretrained(tmp_path / "saved")
    assert json.loads((saved / "rl_seg_policy.json").read_text()) == {"policy": policy.name}
    assert (saved / "sam2.py").is_file() and "auto_map" in json.loads((saved / "config.json").read_text())
    again = load(family, saved)
    with torch.no_grad():
        assert torch.equal(again(again.preprocess(images)).logits, before)

    peft_model = attach_lora(policy, LoraSettings(targets="llm", dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
        adapted = peft_model(x).logits
        with peft_model.disable_adapter():  # the KL reference: same weights, adapter off
            reference = peft_model(x).logits
    assert not torch.allclose(adapted, reference)
    torch.testing.assert_close(reference, before)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(load(family, path), str(adapter_dir))(x).logits
        via_rlseg = load_adapter(load(family, path), adapter_dir)(x).logits
    torch.testing.assert_close(via_peft, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_rlseg, adapted, atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_run_and_agree(replica, policies, images):
    """Sa2VA ships bfloat16 weights and runs SAM2 under autocast; the adapter opens that region itself and still
    returns float32 logits at the image's resolution."""
    family, path = replica
    half = load(family, path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        ref = policies(policies.preprocess(images)).logits
        out = half(half.preprocess(images)).logits
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.95
