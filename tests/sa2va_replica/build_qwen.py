"""Writes Sa2VA-Qwen checkpoint folders (Qwen2.5-VL and Qwen3-VL based releases) from the replica's remote code.

The folder is what upstream's ``tools/convert_to_hf.py`` leaves (bytedance/Sa2VA; facts about the format):

- ``config.json``: the base Qwen-VL config re-serialised by ``Sa2VAChatConfigQwen`` with ``model_type`` "sa2va_chat",
  ``template`` "qwen_chat", ``auto_map`` to the remote code, ``tie_word_embeddings`` false and the text vocabulary
  resized to the tokenizer (base + Sa2VA's 5 tokens). It is written in transformers 4.57's layout (upstream's pin,
  the version that wrote the released folders); see :func:`released_config`.
- ``model*.safetensors`` keyed as 4.57's ``Sa2VAChatModelQwen.save_pretrained`` keys them, by module path (no
  generation_config.json: the wrapper cannot generate itself);
- the processor as transformers 4.57 saves it: ``preprocessor_config.json``, ``video_preprocessor_config.json``,
  ``chat_template.jinja`` and the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
  ``merges.txt``, ``added_tokens.json``, ``special_tokens_map.json``);
- the remote code: ``configuration_sa2va_chat.py``, ``modeling_sa2va_qwen.py`` (Qwen3-VL: the class names swapped, as
  upstream's two folders differ), and ``sam2.py`` / ``templates.py`` copied from the InternVL-family replica
  (upstream ships byte-identical copies of both in every folder).

The tokenizer is a byte-level BPE without merges (every byte a token) with Qwen's added tokens after it; at real
shapes the vocabulary is padded with filler tokens so that every special token has its real id (151643 onward) and
the embedding has its real size. Shapes: ``tiny`` (CPU tests) and the public releases, whose base configs are in
:data:`SHAPES` (the Qwen-VL-Instruct config.json values).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
import uuid
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from .build import DEFAULT_ANSWER as FORCED_ANSWER
from .build import _default_dtype, _sharpen_mask_heads

REPLICA_DIR = Path(__file__).resolve().parent
REMOTE_CODE_QWEN = REPLICA_DIR / "remote_code_qwen"
REMOTE_CODE = REPLICA_DIR / "remote_code"

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

#: Tokens upstream's Qwen configs add (``special_tokens`` of sa2va_qwen25_*.py / sa2va_qwen3_4b.py), via
#: ``tokenizer.add_tokens(..., special_tokens=True)``; the InternVL markers (<img>, <IMG_CONTEXT>) are not among them.
SA2VA_QWEN_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]

#: Qwen2.5-VL's added tokens in id order from 151643, with their ``special`` flag; Qwen3-VL appends four more.
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN3_EXTRA_TOKENS = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
                      ("</think>", False)]
QWEN_BASE_VOCAB = 151643  # BPE entries before <|endoftext|> in the real tokenizers

#: The Sa2VA wrapper's class names in the Qwen2.5-VL file and what the Qwen3-VL release's file has instead.
QWEN3_RENAMES = {
    "from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig":
        "from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig",
    "Qwen2_5_VLConfig": "Qwen3VLConfig",
    "Qwen2_5_VLForConditionalGeneration": "Qwen3VLForConditionalGeneration",
    "Qwen2_5_VisionTransformerPretrainedModel": "Qwen3VisionTransformerPretrainedModel",
    "Qwen2_5_VLDecoderLayer": "Qwen3VLDecoderLayer",
    "Qwen2.5-VL": "Qwen3-VL",
}

AUTO_MAP = {
    "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
    "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
    "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
}

#: Parameters of upstream's hard-coded SAM2 (Hiera-L) wrapper, counted on the real code.
SAM2_HIERA_L_PARAMETERS = 224_430_130

# --------------------------------------------------------------------------------------------------- base shapes
_Q25_VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
               "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
               "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
               "temporal_patch_size": 2}
_Q3_VISION = {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
              "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
              "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2}


def _qwen2_5_vl_base(text: dict, vision: dict | None = None) -> dict:
    """A Qwen2.5-VL-Instruct config.json (flat text fields, as the public repos ship it)."""
    base = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656, "hidden_act": "silu", "initializer_range": 0.02,
            "max_position_embeddings": 128000, "model_type": "qwen2_5_vl", "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "torch_dtype": "bfloat16", "use_cache": True,
            "use_sliding_window": False, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    base.update(text)
    base["vision_config"] = dict(_Q25_VISION, out_hidden_size=text["hidden_size"], **(vision or {}))
    return base


def _qwen3_vl_base(text: dict, vision: dict | None = None, tie: bool = True) -> dict:
    """A Qwen3-VL-Instruct config.json (nested text_config, as the public repos ship it)."""
    text_config = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                   "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02,
                   "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                           "rope_type": "default"},
                   "rope_theta": 5000000, "tie_word_embeddings": tie, "use_cache": True, "vocab_size": 151936}
    text_config.update(text)
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
            "text_config": text_config, "tie_word_embeddings": tie, "video_token_id": 151656,
            "vision_config": dict(_Q3_VISION, out_hidden_size=text_config["hidden_size"], **(vision or {})),
            "vision_end_token_id": 151653, "vision_start_token_id": 151652}


#: family -> shape -> (base Qwen-VL config.json, published parameter count of that base model). Tiny shapes have
#: no published count; their token ids are filled in from the tiny tokenizer by :func:`base_config`.
SHAPES = {
    "qwen2_5_vl": {
        "tiny": (_qwen2_5_vl_base(
            {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_window_layers": 2, "tie_word_embeddings": True,
             "max_position_embeddings": 32768, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
            {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "fullatt_block_indexes": [1]}),
            None),
        # Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct
        "Sa2VA-Qwen2_5-VL-3B": (_qwen2_5_vl_base(
            {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "max_window_layers": 70, "tie_word_embeddings": True,
             "vocab_size": 151936}), 3_754_622_976),
        "Sa2VA-Qwen2_5-VL-7B": (_qwen2_5_vl_base(
            {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "max_window_layers": 28, "tie_word_embeddings": False,
             "vocab_size": 152064}), 8_292_166_656),
    },
    "qwen3_vl": {
        "tiny": (_qwen3_vl_base(
            {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 32768,
             "rope_scaling": {"mrope_interleaved": True, "mrope_section": [2, 1, 1], "rope_type": "default"}},
            {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
             "deepstack_visual_indexes": [0]}), None),
        # Qwen/Qwen3-VL-2B-Instruct and -4B-Instruct (released as Sa2VA-Qwen3-VL-2B / -4B)
        "Sa2VA-Qwen3-VL-2B": (_qwen3_vl_base(
            {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
             "num_attention_heads": 16}), 2_127_532_032),
        "Sa2VA-Qwen3-VL-4B": (_qwen3_vl_base(
            {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
             "num_attention_heads": 32}), 4_437_815_808),
        # Qwen/Qwen3-VL-8B-Instruct: no Sa2VA release of it was found; the shape upstream's recipe would give it
        "Sa2VA-Qwen3-VL-8B": (_qwen3_vl_base(
            {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32},
            {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "deepstack_visual_indexes": [8, 16, 24]},
            tie=False), 8_767_123_696),
    },
}


def expected_parameters(family: str, shape: str, sam2_parameters: int = SAM2_HIERA_L_PARAMETERS) -> dict:
    """Parameter counts a real ``shape`` must have, from the published count of its base Qwen-VL model: the
    embedding (and the lm_head, untied by the conversion) resized to the tokenizer, plus text_hidden_fcs and SAM2."""
    _check(family, shape)
    base, published = SHAPES[family][shape]
    text = base.get("text_config", base)
    width, base_vocab = text["hidden_size"], text["vocab_size"]
    vocab = QWEN_BASE_VOCAB + len(added_tokens(family))
    tied = base.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    lm_head = vocab * width if tied else (vocab - base_vocab) * width
    qwen = published + (vocab - base_vocab) * width + lm_head
    fcs = width * width + width + width * 256 + 256  # Linear(h, h), Linear(h, SAM2 width 256)
    return {"vocab": vocab, "model": qwen, "text_hidden_fcs": fcs, "grounding_encoder": sam2_parameters,
            "total": qwen + fcs + sam2_parameters}


def _check(family: str, shape: str) -> None:
    if family not in SHAPES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if shape not in SHAPES[family]:
        raise ValueError(f"shape {shape!r} is not a {family} shape; known: {sorted(SHAPES[family])}")


# ----------------------------------------------------------------------------------------------------- tokenizer
def added_tokens(family: str) -> list[tuple[str, bool]]:
    """(token, special) for every token after the BPE vocabulary, Sa2VA's included, in id order."""
    qwen = QWEN_ADDED_TOKENS + (QWEN3_EXTRA_TOKENS if family == "qwen3_vl" else [])
    return qwen + [(t, True) for t in SA2VA_QWEN_TOKENS]


def bpe_vocab(real_ids: bool) -> dict[str, int]:
    """The 256 byte-level symbols; with ``real_ids``, filler entries up to Qwen's 151643 so the added tokens get
    their real ids (BPE without merges never produces a filler: they are longer than one symbol)."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    if real_ids:
        vocab.update({f"<|replica_filler_{i}|>": i for i in range(len(vocab), QWEN_BASE_VOCAB)})
    return vocab


def write_tokenizer(path: Path, family: str, real_ids: bool) -> dict[str, int]:
    """The tokenizer files as transformers 4.57 saves a Qwen2TokenizerFast; returns the added tokens' ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab = bpe_vocab(real_ids)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    extra = added_tokens(family)
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in extra])
    ids = {t: tok.token_to_id(t) for t, _ in extra}
    tok.save(str(path / "tokenizer.json"))

    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "added_tokens.json").write_text(json.dumps(ids, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    specials = [t for t, s in QWEN_ADDED_TOKENS if s and t != "<|endoftext|>"]
    _write_json(path / "special_tokens_map.json", {
        "additional_special_tokens": specials,
        "eos_token": {"content": "<|im_end|>", **entry}, "pad_token": {"content": "<|endoftext|>", **entry}})
    _write_json(path / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): {"content": t, **entry, "special": s} for t, s in extra},
        "additional_special_tokens": specials, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "extra_special_tokens": {},
        "model_max_length": 131072 if family == "qwen2_5_vl" else 262144, "pad_token": "<|endoftext|>",
        "processor_class": _processor_class(family), "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    return ids


# ----------------------------------------------------------------------------------------------------- processor
def _processor_class(family: str) -> str:
    return "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen3VLProcessor"


_FAST_IMAGE_PROCESSOR_FIELDS = {
    "crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
    "disable_grouping": None, "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_pad": None,
    "do_rescale": True, "do_resize": True, "image_processor_type": "Qwen2VLImageProcessorFast",
    "input_data_format": None, "merge_size": 2, "pad_size": None, "resample": 3,
    "rescale_factor": 0.00392156862745098, "return_tensors": None, "temporal_patch_size": 2}
_VIDEO_PROCESSOR_FIELDS = {
    "crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
    "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "input_data_format": None, "max_frames": 768, "merge_size": 2, "min_frames": 4, "num_frames": None,
    "pad_size": None, "resample": 3, "rescale_factor": 0.00392156862745098, "return_metadata": False,
    "temporal_patch_size": 2, "video_metadata": None}
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def processor_configs(family: str) -> tuple[dict, dict]:
    """(preprocessor_config.json, video_preprocessor_config.json) as transformers 4.57 re-saves the base Qwen-VL
    repos' processors (AutoImageProcessor picks the fast class; the values are the base repos')."""
    cls = _processor_class(family)
    if family == "qwen2_5_vl":
        pixels = {"max_pixels": 12845056, "min_pixels": 3136, "size": {"longest_edge": 12845056, "shortest_edge": 3136}}
        image = dict(_FAST_IMAGE_PROCESSOR_FIELDS, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, patch_size=14,
                     processor_class=cls, **pixels)
        video = dict(_VIDEO_PROCESSOR_FIELDS, do_sample_frames=False, fps=None, image_mean=_CLIP_MEAN,
                     image_std=_CLIP_STD, patch_size=14, processor_class=cls,
                     video_processor_type="Qwen2VLVideoProcessor", **pixels)
    else:
        half = [0.5, 0.5, 0.5]
        image = dict(_FAST_IMAGE_PROCESSOR_FIELDS, image_mean=half, image_std=half, patch_size=16, max_pixels=None,
                     min_pixels=None, processor_class=cls, size={"longest_edge": 16777216, "shortest_edge": 65536})
        video = dict(_VIDEO_PROCESSOR_FIELDS, do_sample_frames=True, fps=2, image_mean=half, image_std=half,
                     patch_size=16, processor_class=cls, size={"longest_edge": 25165824, "shortest_edge": 4096},
                     video_processor_type="Qwen3VLVideoProcessor")
    return image, video


def chat_template(family: str) -> str:
    """The Qwen-VL chat format (Jinja): ``<|im_start|>role\\n...<|im_end|>\\n`` turns, each image as
    ``<|vision_start|><|image_pad|><|vision_end|>`` (video: ``<|video_pad|>``) in place. Qwen2.5-VL opens with a
    default system turn "You are a helpful assistant." when the conversation has none; Qwen3-VL does not."""
    default_system = (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}") if family == "qwen2_5_vl" else ""
    return (
        "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
        + default_system +
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}{{- message['content'] }}"
        "{%- else %}{%- for item in message['content'] %}"
        "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
        "{%- set image_count.value = image_count.value + 1 %}"
        "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
        "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
        "{%- elif item['type'] == 'video' or 'video' in item %}"
        "{%- set video_count.value = video_count.value + 1 %}"
        "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
        "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
        "{%- elif 'text' in item %}{{- item['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")


def write_processor(path: Path, family: str) -> None:
    image, video = processor_configs(family)
    _write_json(path / "preprocessor_config.json", image)
    _write_json(path / "video_preprocessor_config.json", video)
    (path / "chat_template.jinja").write_text(chat_template(family))


# -------------------------------------------------------------------------------------------------------- config
def base_config(family: str, shape: str, token_ids: dict[str, int]) -> dict:
    """The base Qwen-VL config.json of ``shape``; tiny shapes get the tiny tokenizer's ids and vocabulary."""
    _check(family, shape)
    cfg = json.loads(json.dumps(SHAPES[family][shape][0]))
    if shape != "tiny":
        return cfg
    ids = {"bos_token_id": token_ids["<|endoftext|>"], "eos_token_id": token_ids["<|im_end|>"]}
    vision = {"vision_start_token_id": token_ids["<|vision_start|>"],
              "vision_end_token_id": token_ids["<|vision_end|>"], "image_token_id": token_ids["<|image_pad|>"],
              "video_token_id": token_ids["<|video_pad|>"]}
    vocab = max(token_ids.values()) + 1 - len(SA2VA_QWEN_TOKENS)
    text = cfg["text_config"] if family == "qwen3_vl" else cfg
    text.update(ids, vocab_size=vocab)
    cfg.update(vision)
    if family == "qwen2_5_vl":
        cfg["vision_token_id"] = token_ids["<|vision_pad|>"]
    return cfg


def released_config(family: str, base: dict, vocab_size: int, dtype: torch.dtype, extras: dict) -> dict:
    """config.json as ``tools/convert_to_hf.py`` leaves it under transformers 4.57 (upstream's pin, which wrote the
    released folders), from the base Qwen-VL config.json: ``model_type`` "sa2va_chat", ``template``, ``auto_map``,
    untied embeddings, the text vocabulary resized, ``dtype`` the saved weights' dtype, ``extras`` (replica keys) on
    top. Layout rules measured on 4.57.6 (the checker compares them with a real 4.57 conversion):

    - Qwen3-VL: the base's nested layout; ``text_config`` loses ``tie_word_embeddings``; ``architectures`` is the
      wrapper.
    - Qwen2.5-VL: the base's flat text fields stay at the top level (``vocab_size`` there keeps the base value) and
      are repeated in a full ``text_config``; ``rope_scaling`` {"type": "mrope"} becomes {"rope_type": "default",
      "type": "default"}; the top-level ``architectures`` stays ``Qwen2_5_VLForConditionalGeneration`` while the
      wrapper's name lands in ``text_config.architectures`` (4.57's config forwards attribute writes to
      ``text_config``).
    """
    base = json.loads(json.dumps(base))
    common = {"auto_map": dict(AUTO_MAP), "dtype": str(dtype).removeprefix("torch."), "model_type": "sa2va_chat",
              "template": "qwen_chat", "tie_word_embeddings": False, "transformers_version": "4.57.6"}
    if family == "qwen3_vl":
        text = {k: v for k, v in base.pop("text_config").items() if k != "tie_word_embeddings"}
        text["vocab_size"] = vocab_size
        out = {**base, **common, "architectures": ["Sa2VAChatModelQwen"], "text_config": dict(sorted(text.items()))}
    else:
        vision = base.pop("vision_config")
        vision.update(in_channels=vision.get("in_chans", 3), initializer_range=base["initializer_range"],
                      model_type="qwen2_5_vl")
        rope = {"mrope_section": base["rope_scaling"]["mrope_section"], "rope_type": "default", "type": "default"}
        base["rope_scaling"] = rope
        for key in ("torch_dtype", "transformers_version", "tie_word_embeddings"):
            base.pop(key, None)
        text_keys = ("attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
                     "initializer_range", "intermediate_size", "max_position_embeddings", "max_window_layers",
                     "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps",
                     "rope_scaling", "rope_theta", "use_cache", "use_sliding_window", "vision_token_id")
        text = {k: base[k] for k in text_keys}
        text.update(architectures=["Sa2VAChatModelQwen"], dtype="bfloat16", model_type="qwen2_5_vl_text",
                    layer_types=["full_attention"] * base["num_hidden_layers"], sliding_window=None,
                    vocab_size=vocab_size)
        out = {**base, **common, "text_config": dict(sorted(text.items())),
               "vision_config": dict(sorted(vision.items()))}
    out.update(extras)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------- remote code
def remote_code_files(family: str) -> dict[str, str]:
    """File name -> source of the remote code a ``family`` folder ships."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    files = {}
    for name in ("configuration_sa2va_chat.py", "modeling_sa2va_qwen.py"):
        src = (REMOTE_CODE_QWEN / name).read_text()
        if family == "qwen3_vl":
            for old, new in QWEN3_RENAMES.items():
                src = src.replace(old, new)
        files[name] = src
    for name in ("sam2.py", "templates.py"):
        files[name] = (REMOTE_CODE / name).read_text()
    return files


def write_remote_code(path: Path, family: str) -> None:
    for name, src in remote_code_files(family).items():
        (path / name).write_text(src)


def import_remote_code(path: str | Path):
    """Import a folder's ``configuration_sa2va_chat`` and ``modeling_sa2va_qwen`` as a fresh package (they use
    relative imports); returns the modeling module."""
    name = f"sa2va_qwen_folder_{uuid.uuid4().hex[:12]}"
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(Path(path).resolve())]
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    return importlib.import_module(f"{name}.modeling_sa2va_qwen")


# ----------------------------------------------------------------------------------------------------------- build
def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def build_model(modeling, config: dict, dtype: torch.dtype, device=None):
    """The wrapper of the ``modeling`` module for a released config dict, made in ``dtype`` on ``device``
    ("meta": shapes only). Built from the config as AutoModel.from_pretrained builds it; the language model follows
    ``text_config.dtype`` (bfloat16 in the released layout) whatever the default dtype, hence the final cast."""
    config = modeling.Sa2VAChatConfigQwen.from_dict(json.loads(json.dumps(config)))
    if str(device) == "meta":
        from accelerate import init_empty_weights

        place = init_empty_weights(include_buffers=False)
    else:
        place = torch.device(device or "cpu")
    with place, _default_dtype(dtype):
        model = modeling.Sa2VAChatModelQwen(config)
    return model.to(dtype)


def build_qwen_replica(path: str | Path, family: str = "qwen2_5_vl", shape: str = "tiny", seed: int = 0,
                       dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                       forced_answer: str | None = FORCED_ANSWER, sam2_size: str | None = "auto") -> Path:
    """Write a Sa2VA-Qwen checkpoint folder to ``path`` (created) and return it.

    ``dtype`` defaults to float32 for ``tiny`` and bfloat16 (the released dtype) for real shapes; ``device`` is where
    the model is built (real shapes: the GPU). ``sam2_size``: "auto" = "tiny" for the tiny shape and upstream's
    Hiera-L otherwise; None = no ``replica_sam2_size`` key (Hiera-L, as released); a name = that size.
    ``forced_answer`` (None: off) steers predict_forward's greedy decoding to a ``[SEG]`` answer.
    """
    _check(family, shape)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny = shape == "tiny"
    dtype = dtype or (torch.float32 if tiny else torch.bfloat16)
    if sam2_size == "auto":
        sam2_size = "tiny" if tiny else None

    token_ids = write_tokenizer(path, family, real_ids=not tiny)
    write_processor(path, family)
    write_remote_code(path, family)
    modeling = import_remote_code(path)

    extras = {}
    if forced_answer:
        extras["replica_forced_answer"] = forced_answer
    if sam2_size is not None:
        extras["replica_sam2_size"] = sam2_size
    released = released_config(family, base_config(family, shape, token_ids), max(token_ids.values()) + 1, dtype,
                               extras)
    torch.manual_seed(seed)
    model = build_model(modeling, released, dtype, device)
    _sharpen_mask_heads(model)
    # keys as 4.57's save_pretrained wrote them: the module paths (model.model.language_model.*, model.model.visual.*,
    # model.lm_head.weight); 5.x's save_pretrained would rename them to the legacy model.model.layers.* / model.visual.*
    save_torch_state_dict(model.state_dict(), path, max_shard_size="5GB", metadata={"format": "pt"})
    _write_json(path / "config.json", released)
    return path
