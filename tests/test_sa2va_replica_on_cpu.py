"""The InternVL-family Sa2VA replica (tests/sa2va_replica) behaves as the public remote code does under the installed
transformers: each failure users hit with real checkpoints is reproduced here (they were measured on the public
code; tests/sa2va_replica/check_upstream.py compares both side by side), the folders are laid out as released,
and at the real shapes the module tree has the published parameter counts.

Published sizes used below: InternVL2.5 1B/4B/8B/26B = 0.9B/3.7B/8.1B/25.5B and InternVL3 2B/8B/14B =
2.1B/7.9B/15.1B (InternVL documentation, "Model Preparation" tables; the same ViT-MLP-LLM models Sa2VA starts
from), InternViT-300M-448px = 0.3B and InternViT-6B-448px = 5.5B (InternVL2.5 model cards), SAM2 Hiera-L =
224.4M (SAM2 release notes). A Sa2VA model is its base InternVL (LLM vocabulary + 5 tokens) + SAM2 Hiera-L +
``text_hidden_fcs``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the replica builder lives beside this file
from sa2va_replica.build import (REAL_VOCAB, REMOTE_CODE, SA2VA_TOKENS, SHAPES, _attn_mask_utils_stand_in,  # noqa: E402
                                 build_model, build_replica, released_config, remote_module)
from sa2va_replica.cuda_on_cpu import sam2_cuda_on_cpu  # noqa: E402

HAS_ATTN_MASK_UTILS = importlib.util.find_spec("transformers.modeling_attn_mask_utils") is not None
TRANSFORMERS_5 = int(__import__("transformers").__version__.split(".")[0]) >= 5
UPSTREAM_FILES = ["configuration_intern_vit.py", "configuration_internlm2.py", "configuration_phi3.py",
                  "configuration_sa2va_chat.py", "flash_attention.py", "modeling_intern_vit.py",
                  "modeling_internlm2.py", "modeling_phi3.py", "modeling_sa2va_chat.py", "sam2.py", "templates.py",
                  "tokenization_internlm2.py", "tokenization_internlm2_fast.py"]


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def folder(request, tmp_path_factory):
    return request.param, build_replica(tmp_path_factory.mktemp(f"sa2va_{request.param}"), family=request.param)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    with contextlib.redirect_stdout(None):  # AutoTokenizer reads config.json through the (printing) remote config
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, use_fast=False)


def _model(path: Path):
    """The replica model with the folder's weights, built in-process (the builder's import works around the
    transformers-5 import failure; from_pretrained itself is tested below)."""
    from safetensors.torch import load_file

    model = build_model(json.loads((path / "config.json").read_text())).eval()
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model


@contextlib.contextmanager
def _post_init_added(path: Path):
    """Sa2VAChatModel.__init__ of the folder's remote code followed by post_init() (what 4.x did implicitly)."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with contextlib.redirect_stdout(None):
        AutoConfig.from_pretrained(str(path), trust_remote_code=True)  # config code first, as from_pretrained
        cls = get_class_from_dynamic_module("modeling_sa2va_chat.Sa2VAChatModel", str(path))
    init = cls.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.post_init()

    cls.__init__ = patched
    try:
        yield
    finally:
        cls.__init__ = init


def _from_pretrained(path: Path):
    from transformers import AutoModel

    with contextlib.redirect_stdout(None):
        return AutoModel.from_pretrained(str(path), trust_remote_code=True, torch_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- layout
def test_remote_code_files_are_upstreams():
    assert sorted(p.name for p in REMOTE_CODE.glob("*.py") if p.name != "__init__.py") == UPSTREAM_FILES


def test_folder_is_laid_out_as_released(folder):
    family, path = folder
    tokenizer_files = (["merges.txt", "tokenizer.json", "vocab.json"] if family == "qwen2" else ["tokenizer.model"])
    expected = sorted(UPSTREAM_FILES + tokenizer_files + ["added_tokens.json", "config.json", "model.safetensors",
                                                          "special_tokens_map.json", "tokenizer_config.json"])
    assert sorted(p.name for p in path.iterdir()) == expected
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Sa2VAChatModel"] and config["model_type"] == "sa2va_chat"
    assert config["auto_map"]["AutoModel"] == "modeling_sa2va_chat.Sa2VAChatModel"
    assert config["template"] == {"qwen2": "qwen_chat", "internlm2": "internlm2_chat"}[family]
    llm = config["llm_config"]
    assert llm["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM"}[family]]
    # the LLM vocabulary is the tokenizer's, Sa2VA's tokens included
    tokenizer = _tokenizer(path)
    assert llm["vocab_size"] == len(tokenizer)
    assert all(tokenizer.convert_tokens_to_ids(t) < llm["vocab_size"] for t in SA2VA_TOKENS + ["<IMG_CONTEXT>"])
    if family == "internlm2":  # released InternLM2 configs, in transformers 4.x's format
        assert llm["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
        assert tok_cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_internlm2.InternLM2Tokenizer"
        assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id == 1  # InternLM2 prepends <s>


# --------------------------------------------------------------------------------------- version failures
@pytest.mark.skipif(HAS_ATTN_MASK_UTILS, reason="this transformers still has modeling_attn_mask_utils")
def test_from_pretrained_fails_on_the_phi3_import(folder):
    """Quirk 1: modeling_sa2va_chat imports modeling_phi3 whatever the LLM; it needs a module transformers 5
    removed."""
    with pytest.raises(ModuleNotFoundError, match=r"transformers\.modeling_attn_mask_utils"):
        _from_pretrained(folder[1])


def test_from_pretrained_without_post_init(folder):
    """Quirk 2: Sa2VAChatModel never calls post_init(): transformers 5 fails on the attribute post_init sets."""
    with _attn_mask_utils_stand_in():
        if TRANSFORMERS_5:
            with pytest.raises(AttributeError, match="all_tied_weights_keys"):
                _from_pretrained(folder[1])
        else:
            assert _from_pretrained(folder[1]) is not None


def _internlm2(**overrides):
    config_mod = remote_module("configuration_internlm2")
    model_mod = remote_module("modeling_internlm2")
    config = config_mod.InternLM2Config(**{**dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=1), **overrides})
    with contextlib.redirect_stdout(None):
        return model_mod.InternLM2ForCausalLM(config)


def test_internlm2_rope_scaling_none_is_a_key_error_on_transformers_5():
    """Quirk 3: _init_rope reads rope_scaling['type']; 5.x turns None into a standardised dict without it."""
    if TRANSFORMERS_5:
        with pytest.raises(KeyError, match="type"):
            _internlm2(rope_scaling=None)
    else:
        assert type(_internlm2(rope_scaling=None).model.layers[0].attention.rotary_emb).__name__ == \
            "InternLM2RotaryEmbedding"
    # the released configs' legacy dict keeps its 'type' key and builds
    model = _internlm2(rope_scaling={"type": "dynamic", "factor": 2.0})
    assert type(model.model.layers[0].attention.rotary_emb).__name__ == "InternLM2DynamicNTKScalingRotaryEmbedding"


def test_internlm2_save_pretrained_fails_on_the_tied_keys_list(tmp_path):
    """Quirk 4: _tied_weights_keys is a list; transformers 5 reads it as a dict."""
    model = _internlm2(rope_scaling={"type": "dynamic", "factor": 2.0})
    assert model._tied_weights_keys == ["output.weight"]
    if TRANSFORMERS_5:
        with pytest.raises(AttributeError, match="'list' object has no attribute 'keys'"):
            model.save_pretrained(str(tmp_path))
    else:
        model.save_pretrained(str(tmp_path))


def test_internlm2_rotary_tables_after_from_pretrained(folder):
    """Quirk 5: the rotary inv_freq/cos/sin are non-persistent buffers made in __init__; transformers 5 builds on
    the meta device and never computes them: garbage positions (NaN logits), no error."""
    family, path = folder
    if family != "internlm2":
        pytest.skip("InternLM2 only (Qwen2 is transformers' own class)")
    with _attn_mask_utils_stand_in(), _post_init_added(path):
        model = _from_pretrained(path)
    rotary = [m for m in model.modules() if type(m).__name__.startswith("InternLM2") and hasattr(m, "cos_cached")]
    assert rotary
    wrong = [not torch.allclose(m.inv_freq.float(), 1.0 / (m.base ** (torch.arange(0, m.dim, 2).float() / m.dim)))
             for m in rotary]
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        logits = model.language_model(input_ids=ids, use_cache=False).logits
        expected = _model(path).language_model(input_ids=ids, use_cache=False).logits  # the same weights, built
    if TRANSFORMERS_5:
        assert all(wrong)
        # garbage positions: NaN or merely wrong, depending on what the uninitialised memory held
        assert not torch.allclose(logits, expected, atol=1e-3)
    else:
        assert not any(wrong) and torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("blocked", ["torchvision", "timm", "einops", "peft"])
def test_remote_code_imports_what_upstream_imports(blocked):
    """Quirk 6: the modules import torchvision, timm, einops and peft unconditionally (flash_attn optionally)."""
    code = (f"import sys; sys.modules[{blocked!r}] = None; sys.path[:0] = {[str(REMOTE_CODE.parents[1])]!r}\n"
            "from sa2va_replica.build import remote_module\n"
            "remote_module('modeling_sa2va_chat')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("ModuleNotFoundError"), done.stderr[-500:]
    assert re.search(rf"\b{blocked}\b", last), last


def test_flash_attn_is_optional_and_announced():
    code = (f"import sys; sys.path[:0] = {[str(REMOTE_CODE.parents[1])]!r}\n"
            "import contextlib, importlib\n"
            "from sa2va_replica.build import _attn_mask_utils_stand_in\n"
            "with _attn_mask_utils_stand_in():\n"
            "    importlib.import_module('sa2va_replica.remote_code.modeling_sa2va_chat')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert "FlashAttention is not installed." in done.stdout


# ---------------------------------------------------------------------------------------- inference path
def test_preparing_for_generation_hard_codes_and_does_not_cast(folder):
    """Quirk 7: 448 px tiles of patch 14, 1-12 tiles + thumbnail, DirectResize(1024); torch_dtype (bf16 by
    default) is set for the inputs but the model is not cast, so an fp32 model gets bf16 pixels and fails."""
    family, path = folder
    model, tokenizer = _model(path), _tokenizer(path)
    assert model.img_context_token_id is None
    model.preparing_for_generation(tokenizer)
    assert next(model.parameters()).dtype == torch.float32 and model.torch_dtype == torch.bfloat16
    assert (model.image_size, model.patch_size, model.min_dynamic_patch, model.max_dynamic_patch,
            model.use_thumbnail, model.patch_token, model.extra_image_processor.target_length) == \
        (448, 14, 1, 12, True, 256, 1024)
    assert model.img_context_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    image = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    with sam2_cuda_on_cpu(model), pytest.raises(RuntimeError, match="dtype|type"):
        model.predict_forward(image=image, text="<image>\nsegment", tokenizer=tokenizer)
    if not torch.cuda.is_available():  # predict_forward moves the token ids with .cuda()
        model.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            model.predict_forward(image=image, text="<image>\nsegment", tokenizer=tokenizer)


def test_predict_forward_segments_through_the_forced_answer(folder):
    """Replica-only steering: the answer is forced, the rest is upstream's path (generate with hidden states, the
    [SEG] state, SAM2, bilinear resize to the image, sigmoid > 0.5). Without it, random weights say no [SEG]."""
    family, path = folder
    model, tokenizer = _model(path), _tokenizer(path)
    model.preparing_for_generation(tokenizer, max_new_tokens=8, torch_dtype=torch.float32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    if family == "internlm2":
        # InternLM2ForCausalLM inherits GenerationMixin only indirectly: transformers >= 4.50 gives it no
        # generation_config and generate() fails, as with the public code
        with sam2_cuda_on_cpu(model), pytest.raises(AttributeError):
            model.predict_forward(image=image, text="<image>\nPlease segment the vessel.", tokenizer=tokenizer)
        return
    with sam2_cuda_on_cpu(model), torch.no_grad():
        out = model.predict_forward(image=image, text="<image>\nPlease segment the vessel.", tokenizer=tokenizer)
        assert out["prediction"] == "Sure, [SEG].<|im_end|>"
        assert len(out["prediction_masks"]) == 1
        mask = out["prediction_masks"][0]
        assert mask.shape == (1, 40, 40) and mask.dtype == bool and 0 < mask.mean() < 1
        model.config.replica_forced_answer = None
        free = model.predict_forward(image=image, text="<image>\nPlease segment the vessel.", tokenizer=tokenizer)
    assert "[SEG]" not in free["prediction"] and free["prediction_masks"] == []


def test_training_forward_needs_the_uninitialised_counter(folder):
    """Quirk 8: _llm_forward increments self._count, which nothing sets."""
    family, path = folder
    model, tokenizer = _model(path), _tokenizer(path)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    ids = torch.tensor([tokenizer.encode("<img>") + [model.img_context_token_id] * model.num_image_token
                        + tokenizer.encode("</img> segment Sure, [SEG].")])
    data = {"pixel_values": [torch.randn(1, 3, 448, 448)], "input_ids": ids, "position_ids": None,
            "attention_mask": None, "labels": ids}
    with pytest.raises(AttributeError, match="_count"):
        model(data)
    model._count = 0
    out = model(data)
    assert model._count == 1 and torch.isfinite(out.loss)
    assert out.hidden_states[-1].shape == (1, ids.shape[1], model.config.llm_config.hidden_size)


@pytest.mark.parametrize("size,tiles", [((448, 448), 1), ((896, 448), 3), ((448, 896), 3), ((800, 800), 5),
                                        ((1000, 1000), 10), ((2000, 300), 8), ((7, 3), 11)])
def test_dynamic_tiling_and_ties(size, tiles):
    """Quirk 10: the closest (cols, rows) grid; equal ratios go to the later grid when the image has more than
    half its pixels (800 px square: 2x2; 1000 px: 3x3); a thumbnail is appended when there is more than one."""
    module = remote_module("modeling_sa2va_chat")
    out = module.dynamic_preprocess(Image.new("RGB", size), 1, 12, 448, True)
    assert len(out) == tiles and all(t.size == (448, 448) for t in out)


def test_pixel_shuffle_versions():
    """ps_version 'v2' folds 2x2 neighbours into channels keeping the grid's orientation; 'v1' leaves it
    transposed (and warns)."""
    module = remote_module("modeling_sa2va_chat")
    model = module.Sa2VAChatModel.__new__(module.Sa2VAChatModel)
    torch.nn.Module.__init__(model)
    grid = torch.arange(4 * 6 * 2, dtype=torch.float32).reshape(1, 4, 6, 2)  # N, W, H, C
    model.ps_version = "v2"
    v2 = model.pixel_shuffle(grid, 0.5)
    assert v2.shape == (1, 2, 3, 8)
    model.ps_version = "v1"
    with pytest.warns(UserWarning, match="transposed"):
        v1 = model.pixel_shuffle(grid, 0.5)
    assert torch.equal(v1, v2.permute(0, 2, 1, 3))


# ------------------------------------------------------------------------------------------- real shapes
#: published parameter counts (see the module docstring), in billions, of the base InternVL models
PUBLISHED_INTERNVL_B = {"sa2va-1b": 0.9, "sa2va-4b": 3.7, "sa2va-8b": 8.1, "sa2va-26b": 25.5,
                        "sa2va-internvl3-2b": 2.1, "sa2va-internvl3-8b": 7.9, "sa2va-internvl3-14b": 15.1}
SAM2_HIERA_L_M = 224.4


@pytest.mark.parametrize("shape", sorted(PUBLISHED_INTERNVL_B))
def test_real_shape_parameter_counts(shape):
    family = next(f for f in ("qwen2", "internlm2") if f in SHAPES[shape])
    model = build_model(released_config(family, shape, REAL_VOCAB[family], torch.bfloat16), dtype=torch.bfloat16,
                        device="meta")
    assert next(model.parameters()).device.type == "meta"

    def count(module):
        return sum(p.numel() for p in module.parameters())

    hidden = model.config.llm_config.hidden_size
    sa2va_rows = len(SA2VA_TOKENS) * hidden * 2  # the five added tokens in the embedding and the LM head
    internvl = count(model.vision_model) + count(model.mlp1) + count(model.language_model) - sa2va_rows
    assert round(internvl / 1e9, 1) == PUBLISHED_INTERNVL_B[shape], internvl
    vit = count(model.vision_model)
    assert round(vit / 1e9, 1) == (5.5 if shape == "sa2va-26b" else 0.3), vit
    assert round(count(model.grounding_encoder) / 1e6, 1) == SAM2_HIERA_L_M
    assert count(model.text_hidden_fcs) == hidden * hidden + hidden + hidden * 256 + 256
    assert count(model) == internvl + sa2va_rows + count(model.grounding_encoder) + count(model.text_hidden_fcs)
