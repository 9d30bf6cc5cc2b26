"""The Sa2VA-Qwen replica (tests/sa2va_replica/remote_code_qwen + build_qwen.py) on its own, on CPU: the folder is
what the Qwen2.5-VL / Qwen3-VL based releases ship, the tokenizer and processor round-trip, the public code's quirks
are reproduced (each measured on upstream's code by check_upstream.py --part qwen), and the real shapes have the
published parameter counts (meta device)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the replica builder lives beside this file
from sa2va_replica import build_qwen as bq  # noqa: E402

FAMILIES = bq.FAMILIES
TRANSFORMERS_5 = int(__import__("transformers").__version__.split(".")[0]) >= 5
PROMPT = "<image>Please segment the vessels."

#: what tools/convert_to_hf.py leaves in a Sa2VA-Qwen folder under transformers 4.57 (model + processor + code)
RELEASED_FILES = {"config.json", "model.safetensors", "added_tokens.json", "chat_template.jinja", "merges.txt",
                  "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                  "video_preprocessor_config.json", "vocab.json", "configuration_sa2va_chat.py",
                  "modeling_sa2va_qwen.py", "sam2.py", "templates.py"}

#: Hugging Face's model sizes of the releases (ByteDance's Sa2VA collection), in billions, rounded
PUBLISHED_RELEASE_BILLIONS = {"Sa2VA-Qwen2_5-VL-3B": 4, "Sa2VA-Qwen2_5-VL-7B": 9, "Sa2VA-Qwen3-VL-2B": 3,
                              "Sa2VA-Qwen3-VL-4B": 5}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa2va_qwen")
    return {family: bq.build_qwen_replica(root / family, family=family) for family in FAMILIES}


def _load(folder: Path):
    from transformers import AutoModel

    from sa2va_replica.qwen_on_cpu import post_init_on_load

    # transformers 5 cannot load the wrapper as shipped (no post_init: see test_from_pretrained_fails_as_upstream)
    with post_init_on_load(folder) if TRANSFORMERS_5 else contextlib.nullcontext():
        return AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)


@pytest.fixture(scope="module")
def models(folders):
    return {family: _load(folder) for family, folder in folders.items()}


@pytest.fixture(scope="module")
def processors(folders):
    from sa2va_replica.qwen_on_cpu import load_processor

    return {family: load_processor(folder) for family, folder in folders.items()}


def _image(h=120, w=90, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("family", FAMILIES)
def test_folder_is_laid_out_as_the_releases(folders, family):
    folder = folders[family]
    assert {p.name for p in folder.iterdir()} == RELEASED_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sa2va_chat"
    assert config["auto_map"] == bq.AUTO_MAP
    assert config["template"] == "qwen_chat" and config["tie_word_embeddings"] is False
    tokens = json.loads((folder / "added_tokens.json").read_text())
    assert config["text_config"]["vocab_size"] == max(tokens.values()) + 1 == 256 + len(bq.added_tokens(family))
    # 4.57's layout: RoPE as rope_scaling (5.x's rope_parameters would be ignored by 4.57)
    assert "rope_scaling" in config["text_config"] and "rope_parameters" not in config["text_config"]
    if family == "qwen2_5_vl":  # 4.57 forwards attribute writes to text_config: the wrapper's name lands there
        assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
        assert config["text_config"]["architectures"] == ["Sa2VAChatModelQwen"]
        assert config["hidden_size"] == config["text_config"]["hidden_size"]
    else:
        assert config["architectures"] == ["Sa2VAChatModelQwen"]
    assert config["replica_forced_answer"] == bq.FORCED_ANSWER and config["replica_sam2_size"] == "tiny"

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.lm_head.weight" in names and "text_hidden_fcs.2.weight" in names
    assert any(n.startswith("model.model.language_model.layers.0.self_attn.q_proj") for n in names)
    assert any(n.startswith("model.model.visual.blocks.0.") for n in names)
    assert not any(n.startswith(("model.model.layers.", "model.visual.")) for n in names)  # 5.x's legacy names


def test_qwen3_files_are_upstreams_other_flavour(folders):
    files = {family: {name: (folders[family] / name).read_text() for name in ("configuration_sa2va_chat.py",
                                                                             "modeling_sa2va_qwen.py")}
             for family in FAMILIES}
    assert "Qwen2_5_VLForConditionalGeneration(config)" in files["qwen2_5_vl"]["modeling_sa2va_qwen.py"]
    assert "Qwen3VLForConditionalGeneration(config)" in files["qwen3_vl"]["modeling_sa2va_qwen.py"]
    assert "class Sa2VAChatConfigQwen(Qwen3VLConfig)" in files["qwen3_vl"]["configuration_sa2va_chat.py"]
    assert not any("Qwen2_5" in src for src in files["qwen3_vl"].values())
    for name in ("sam2.py", "templates.py"):
        assert (folders["qwen3_vl"] / name).read_text() == (bq.REMOTE_CODE / name).read_text()


def test_real_shapes_put_the_special_tokens_at_their_real_ids(tmp_path):
    ids = bq.write_tokenizer(tmp_path, "qwen3_vl", real_ids=True)
    assert (ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|image_pad|>"]) == (151643, 151645, 151655)
    assert ids["[SEG]"] == 151669 and max(ids.values()) + 1 == 151674  # Qwen3-VL's 151669 + Sa2VA's five
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 151674
    assert tok.encode("a[SEG]b", add_special_tokens=False) == [tok.convert_tokens_to_ids("a"), 151669,
                                                               tok.convert_tokens_to_ids("b")]


# ------------------------------------------------------------------------------------------ tokenizer, processor
@pytest.mark.parametrize("family", FAMILIES)
def test_processor_round_trip(processors, family):
    from qwen_vl_utils import process_vision_info

    processor = processors[family]
    tok = processor.tokenizer
    seg = tok.convert_tokens_to_ids("[SEG]")
    ids = tok.encode("Sure, [SEG].<|im_end|>", add_special_tokens=False)
    assert seg in ids and tok.decode(ids, skip_special_tokens=False) == "Sure, [SEG].<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Sure, ."  # [SEG] is added as a special token

    image = _image(584, 565)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turn = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if family == "qwen2_5_vl" else ""
    assert text == system + turn
    images, _ = process_vision_info(messages)
    assert images[0].size == (560, 588)  # qwen_vl_utils' own resize to multiples of 28 comes first
    inputs = processor(text=[text], images=images, return_tensors="pt", min_pixels=512 * 28 * 28,
                       max_pixels=2048 * 28 * 28)
    # min_pixels lifts a DRIVE image to 672 x 644 (Qwen2.5-VL, 14 px patches) / 672 x 640 (Qwen3-VL, 16 px)
    grid, tokens = ([1, 48, 46], 552) if family == "qwen2_5_vl" else ([1, 42, 40], 420)
    assert inputs["image_grid_thw"][0].tolist() == grid
    assert int((inputs["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == tokens


# ------------------------------------------------------------------------------------------------------- quirks
@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x loads the wrapper")
@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_fails_as_upstream(folders, family):
    from transformers import AutoModel

    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        AutoModel.from_pretrained(str(folders[family]), trust_remote_code=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_quirks(models, family):
    model = models[family]
    with pytest.raises(TypeError, match="_forward_unimplemented"):  # upstream defines no forward
        model(input_ids=torch.tensor([[1, 2]]))
    assert model.torch_dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    assert (model.min_pixels, model.max_pixels, model.extra_image_processor.target_length) == \
           (512 * 28 * 28, 2048 * 28 * 28, 1024)
    assert model.lm_head is model.model.lm_head
    assert model.get_input_embeddings() is model.model.model.language_model.embed_tokens
    assert type(model.model).__name__ == ("Qwen2_5_VLForConditionalGeneration" if family == "qwen2_5_vl"
                                          else "Qwen3VLForConditionalGeneration")
    assert model.text_hidden_fcs[2].out_features == model.grounding_encoder.hidden_dim


def test_grayscale_grounding_image_is_refused_as_torchvision_does(models):
    from PIL import Image

    gray = np.array(Image.new("L", (30, 40)))
    with pytest.raises(ValueError, match="mode"):  # to_pil_image(image, mode="RGB") on one channel
        models["qwen2_5_vl"].extra_image_processor.apply_image(gray)


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_forward_needs_cuda_and_its_autocast(models, processors, family):
    from sa2va_replica.cuda_on_cpu import sam2_cuda_on_cpu

    model, processor = models[family], processors[family]
    with pytest.raises(AssertionError, match="CUDA"):
        model.predict_forward(image=_image(), text=PROMPT, processor=processor)
    # the grounding image is bfloat16 and only torch.autocast("cuda") lets SAM2's float32 layers take it
    with sam2_cuda_on_cpu(model), pytest.raises(RuntimeError, match="BFloat16"):
        model.predict_forward(image=_image(), text=PROMPT, processor=processor)


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_forward_reads_seg_where_a_teacher_forced_pass_does(models, processors, family):
    from qwen_vl_utils import process_vision_info

    from sa2va_replica.qwen_on_cpu import cuda_on_cpu

    model, processor = models[family], processors[family]
    image = _image()
    captured = []
    hook = model.text_hidden_fcs.register_forward_hook(lambda m, i, o: captured.append(i[0].detach().clone()))
    try:
        with cuda_on_cpu(model), torch.no_grad():
            result = model.predict_forward(image=image, text=PROMPT, processor=processor)
    finally:
        hook.remove()
    assert result["prediction"] == "Sure, [SEG].<|im_end|>"
    (mask,) = result["prediction_masks"]
    assert mask.shape == (1, 120, 90) and mask.dtype == bool and 0 < mask.mean() < 1

    # one forward over prompt + answer (no KV cache): the last layer's state at the [SEG] input position
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": PROMPT.replace("<image>", "")}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info(messages)
    inputs = dict(processor(text=[prompt + "Sure, [SEG]."], images=images, return_tensors="pt",
                            min_pixels=512 * 28 * 28, max_pixels=2048 * 28 * 28))
    with torch.no_grad():
        states = model.model(**inputs, output_hidden_states=True).hidden_states[-1][0]
    at_seg = states[inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("[SEG]")]
    torch.testing.assert_close(captured[0], at_seg, rtol=1e-4, atol=1e-5)

    text_only = model.predict_forward(text="Describe the vessels.", processor=processor)
    assert text_only == {"prediction": "Sure, [SEG].<|im_end|>", "prediction_masks": []}


# ----------------------------------------------------------------------------------------------- real shapes
@pytest.mark.parametrize("family,shape", [(f, s) for f in FAMILIES for s in bq.SHAPES[f] if s != "tiny"])
def test_real_shape_parameter_counts(tmp_path, family, shape):
    bq.write_remote_code(tmp_path, family)
    modeling = bq.import_remote_code(tmp_path)
    expected = bq.expected_parameters(family, shape)
    ids = {t: bq.QWEN_BASE_VOCAB + i for i, (t, _) in enumerate(bq.added_tokens(family))}
    config = bq.released_config(family, bq.base_config(family, shape, ids), expected["vocab"], torch.bfloat16, {})
    model = bq.build_model(modeling, config, torch.bfloat16, device="meta")
    for part in ("model", "text_hidden_fcs", "grounding_encoder"):
        assert sum(p.numel() for p in getattr(model, part).parameters()) == expected[part], part
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # released weights are bf16 throughout
    if shape in PUBLISHED_RELEASE_BILLIONS:
        assert round(expected["total"] / 1e9) == PUBLISHED_RELEASE_BILLIONS[shape]
