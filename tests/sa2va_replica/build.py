"""Writes Sa2VA checkpoint folders from the replica's remote code, laid out as the released ones are:
``build_replica(path, family, shape, seed, dtype, device)``.

A released InternVL-family Sa2VA folder (tools/convert_to_hf.py of bytedance/Sa2VA: the base InternVL model's
config with the LLM vocabulary grown by Sa2VA's five tokens, ``template`` and ``auto_map`` set, weights saved by
``save_pretrained``) holds: ``config.json`` (``architectures: ["Sa2VAChatModel"]``, ``model_type: "sa2va_chat"``,
``auto_map`` to the remote code, ``llm_config`` / ``vision_config`` as the base model's transformers 4.x wrote
them, e.g. InternLM2's ``rope_scaling: {"type": "dynamic", "factor": 2.0}``), the remote-code ``.py`` files,
safetensors weights (sharded at 5 GB with an index when larger), and the tokenizer files: Qwen2's (vocab.json,
merges.txt, tokenizer.json) for Qwen2-based releases, InternLM2's sentencepiece ``tokenizer.model`` with its own
tokenizer code (``auto_map`` in tokenizer_config.json) for Sa2VA-8B/26B. This builder writes those files itself:
the replica has upstream's transformers-5 failures (importing it needs a stand-in for
``transformers.modeling_attn_mask_utils``, InternLM2's ``save_pretrained`` fails, and 5.x would write configs in
its own rope format), so it builds the model with those worked around and writes the folder in the released format.

Shapes: ``tiny`` (both families; ``tiny-6b`` for InternLM2 with the InternViT-6B block type of Sa2VA-26B) keeps
what predict_forward hard-codes (448 px tiles, patch 14, SAM2 input 1024 px) with narrow widths, two LLM layers
and the tiny SAM2 (``replica_sam2_size: "tiny"``). The real shapes are the released models' (see ``SHAPES``); they
are for a GPU host (built there in bf16) or the meta device (parameter counts). Random weights never answer
``[SEG]``: ``config.replica_forced_answer`` (default "Sure, [SEG].") steers generation (see modeling_sa2va_chat).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import torch

REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"
PACKAGE = "sa2va_replica.remote_code"

#: tokens InternVL adds to its LLM's tokenizer, then the five Sa2VA adds (tools/convert_to_hf.py grows the LLM's
#: vocabulary by them)
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SA2VA_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# InternLM2's chat tokens (pieces of its sentencepiece model, declared special in tokenizer_config.json)
INTERNLM2_CHAT = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                  "<|im_start|>"]

AUTO_MAP = {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
            "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel"}
DEFAULT_ANSWER = "Sure, [SEG]."
#: a trained decoder is confident (logits of several units); random weights give |logits| < 0.5, which would make
#: every threshold between 0.4 and 0.6 look alike, so the builder scales the mask heads' last layers
LOGIT_GAIN = 15.0

# ----------------------------------------------------------------------------------------------------- shapes
VIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                norm_type="layer_norm", qk_normalization=False, qkv_bias=True)
VIT_6B = dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
              norm_type="rms_norm", qk_normalization=True, qkv_bias=False)
VIT_TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
# InternVL2.5 configs: no stochastic depth, layer scale 1.0; InternVL3: drop path 0.1, layer scale 0.1
VIT_INIT_25 = dict(drop_path_rate=0.0, initializer_factor=1.0, initializer_range=0.02)
VIT_INIT_3 = dict(drop_path_rate=0.1, initializer_factor=0.1, initializer_range=1e-10)

QWEN25 = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, hidden_act="silu",
              bos_token_id=151643, eos_token_id=151643, use_sliding_window=False, sliding_window=None)
INTERNLM25 = dict(rms_norm_eps=1e-5, rope_theta=1000000, max_position_embeddings=32768, hidden_act="silu",
                  bias=False, rope_scaling={"type": "dynamic", "factor": 2.0}, attn_implementation="eager",
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
DYNAMIC_QWEN_ROPE = {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}  # as InternVL3's configs carry it
TINY_LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)


def _tiny_vit(block: dict) -> dict:
    """Tiny widths with the block type (norm, qk normalisation, qkv bias) of a real InternViT."""
    return dict(VIT_TINY, **{k: block[k] for k in ("norm_type", "qk_normalization", "qkv_bias")})


#: name -> {family: (vision config, LLM config, template)}. LLM sizes are the base LLMs' (Qwen2.5-0.5B/3B/1.5B/7B/14B,
#: InternLM2.5-7B/20B); parameter totals match the published InternVL sizes (see tests) plus SAM2 Hiera-L. The Qwen
#: rope_scaling of the InternVL3-based shapes is InternVL3's configs'; the InternVL2.5 Qwen ones carry none here.
SHAPES = {
    "tiny": {
        "qwen2": (_tiny_vit(VIT_300M), dict(QWEN25, **TINY_LLM), "qwen_chat"),
        "internlm2": (_tiny_vit(VIT_300M), dict(INTERNLM25, **TINY_LLM), "internlm2_chat"),
    },
    "tiny-6b": {"internlm2": (_tiny_vit(VIT_6B), dict(INTERNLM25, **TINY_LLM), "internlm2_chat")},
    "sa2va-1b": {"qwen2": (dict(VIT_300M, **VIT_INIT_25), dict(
        QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2), "qwen_chat")},
    "sa2va-4b": {"qwen2": (dict(VIT_300M, **VIT_INIT_25), dict(
        QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2), "qwen_chat")},
    "sa2va-8b": {"internlm2": (dict(VIT_300M, **VIT_INIT_25), dict(
        INTERNLM25, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8), "internlm2_chat")},
    "sa2va-26b": {"internlm2": (dict(VIT_6B, **VIT_INIT_25), dict(
        INTERNLM25, hidden_size=6144, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=48,
        num_key_value_heads=8), "internlm2_chat")},
    "sa2va-internvl3-2b": {"qwen2": (dict(VIT_300M, **VIT_INIT_3), dict(
        QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, rope_scaling=DYNAMIC_QWEN_ROPE), "qwen_chat")},
    "sa2va-internvl3-8b": {"qwen2": (dict(VIT_300M, **VIT_INIT_3), dict(
        QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rope_scaling=DYNAMIC_QWEN_ROPE), "qwen_chat")},
    "sa2va-internvl3-14b": {"qwen2": (dict(VIT_300M, **VIT_INIT_3), dict(
        QWEN25, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, rope_scaling=DYNAMIC_QWEN_ROPE), "qwen_chat")},
}
#: vocabulary of the released LLM configs (the base InternVL tokenizer's length plus Sa2VA's five tokens)
REAL_VOCAB = {"qwen2": 151674 + len(SA2VA_TOKENS), "internlm2": 92553 + len(SA2VA_TOKENS)}
FAMILIES = ("qwen2", "internlm2")


# ----------------------------------------------------------------------------------------------- remote code
@contextlib.contextmanager
def _attn_mask_utils_stand_in():
    """While the replica package is imported: a stand-in for ``transformers.modeling_attn_mask_utils`` when the
    installed transformers has none (5.x), which modeling_phi3 imports at module level. Only this builder's own
    import of the code sees it; a checkpoint folder loaded through ``trust_remote_code`` imports its copy afresh."""
    name = "transformers.modeling_attn_mask_utils"
    if importlib.util.find_spec(name) is not None:
        yield
        return
    stand_in = types.ModuleType(name)

    def _prepare_4d_causal_attention_mask(*args, **kwargs):
        raise NotImplementedError("replica builder: stand-in for transformers.modeling_attn_mask_utils")

    stand_in._prepare_4d_causal_attention_mask = _prepare_4d_causal_attention_mask
    sys.modules[name] = stand_in
    try:
        yield
    finally:
        sys.modules.pop(name, None)


def remote_module(name: str):
    """One of the replica's remote-code modules, imported as a package (they use relative imports, as upstream)."""
    if str(REMOTE_CODE.parents[1]) not in sys.path:
        sys.path.insert(0, str(REMOTE_CODE.parents[1]))
    with _attn_mask_utils_stand_in(), contextlib.redirect_stdout(None):  # the public modules print on import
        return importlib.import_module(f"{PACKAGE}.{name}")


# ------------------------------------------------------------------------------------------------- tokenizers
_CORPUS_WORDS = ("segment the vessel in this image please the retinal blood vessels are thin and curved "
                 "a coronary angiogram shows arteries sure here is the mask of the object you asked for "
                 "what is in the picture describe the image region left right top bottom small large").split()


def _corpus(lines: int = 400):
    """Deterministic English-like lines to train the tiny tokenizers on."""
    rng = torch.Generator().manual_seed(1234)
    for _ in range(lines):
        idx = torch.randint(0, len(_CORPUS_WORDS), (12,), generator=rng).tolist()
        yield " ".join(_CORPUS_WORDS[i] for i in idx) + "."


def _added(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_qwen2_tokenizer(path: Path) -> int:
    """A small byte-level BPE in Qwen2's file format (vocab.json, merges.txt, tokenizer.json and a
    tokenizer_config.json naming ``Qwen2Tokenizer``) with Qwen's, InternVL's and Sa2VA's added tokens after the
    merges. Returns its length."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Qwen2's pre-tokenisation: its split regex, then byte-level mapping without a prefix space
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen_split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    added = QWEN_SPECIAL + INTERNVL_TOKENS + SA2VA_TOKENS
    tok.add_special_tokens(added)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    tok.model.save(str(path))  # vocab.json, merges.txt
    ids = {t: tok.token_to_id(t) for t in added}
    _write_json(path / "added_tokens.json", ids)
    special = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>"}
    _write_json(path / "special_tokens_map.json", special)
    _write_json(path / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added(t) for t, i in ids.items()},
        **special, "bos_token": None, "clean_up_tokenization_spaces": False, "errors": "replace",
        "model_max_length": 32768, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None})
    return tok.get_vocab_size()


def write_internlm2_tokenizer(path: Path) -> int:
    """A small sentencepiece BPE with byte fallback in InternLM2's layout (<unk>, <s>, </s> = 0, 1, 2; its chat
    tokens are pieces declared special), trained here, plus InternVL's and Sa2VA's added tokens; the tokenizer is
    InternLM2's own code (``auto_map`` to tokenization_internlm2). Returns its length."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(), model_writer=model, model_type="bpe", vocab_size=420, byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=INTERNLM2_CHAT,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        num_threads=1, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    extra = {t: n + i for i, t in enumerate(INTERNVL_TOKENS + SA2VA_TOKENS)}
    decoder = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")}
    decoder.update({str(sp.piece_to_id(t)): _added(t) for t in INTERNLM2_CHAT})
    decoder.update({str(i): _added(t) for t, i in extra.items()})
    _write_json(path / "added_tokens.json", extra)
    special = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                             "<|interpreter|>", "<|plugin|>"],
               "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    _write_json(path / "special_tokens_map.json", special)
    _write_json(path / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, **special,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False, "model_max_length": 32768,
        "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer"})
    return n + len(extra)


TOKENIZER_WRITERS = {"qwen2": write_qwen2_tokenizer, "internlm2": write_internlm2_tokenizer}


# ----------------------------------------------------------------------------------------------------- config
def released_config(family: str, shape: str, vocab_size: int, dtype: torch.dtype,
                    forced_answer: str | None = DEFAULT_ANSWER) -> dict:
    """config.json as the released folders carry it (sub-configs in transformers 4.x's format)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    if family not in SHAPES[shape]:
        raise ValueError(f"shape {shape!r} is a {'/'.join(SHAPES[shape])} model, not {family!r}")
    vision, llm, template = SHAPES[shape][family]
    dtype_name = str(dtype).removeprefix("torch.")
    arch = "Qwen2ForCausalLM" if family == "qwen2" else "InternLM2ForCausalLM"
    llm_config = dict(llm, architectures=[arch], model_type=family, vocab_size=vocab_size, tie_word_embeddings=False,
                      torch_dtype=dtype_name, use_cache=True)
    if family == "internlm2":
        llm_config["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                                  "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                                  "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    vision_config = dict(vision, architectures=["InternVisionModel"], model_type="intern_vit_6b", image_size=448,
                         patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6, dropout=0.0,
                         attention_dropout=0.0, use_flash_attn=False, torch_dtype=dtype_name)
    config = {
        "architectures": ["Sa2VAChatModel"], "auto_map": dict(AUTO_MAP), "model_type": "sa2va_chat",
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 448, "llm_config": llm_config,
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "pad2square": False, "ps_version": "v2",
        "select_layer": -1, "template": template, "tie_word_embeddings": False, "torch_dtype": dtype_name,
        "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True, "vision_config": vision_config,
    }
    if shape.startswith("tiny"):
        config["replica_sam2_size"] = "tiny"
    if forced_answer:
        config["replica_forced_answer"] = forced_answer
    return config


# ------------------------------------------------------------------------------------------------------ model
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: dict, dtype: torch.dtype = torch.float32, device=None):
    """The replica ``Sa2VAChatModel`` for a released-format config dict, built in ``dtype`` on ``device``
    ("meta" for shapes only: parameters on the meta device, buffers computed for real)."""
    config_mod = remote_module("configuration_sa2va_chat")
    model_mod = remote_module("modeling_sa2va_chat")
    with contextlib.redirect_stdout(None):  # the public config class prints on construction
        cfg = config_mod.Sa2VAChatConfig(**json.loads(json.dumps(config)))
    if str(device) == "meta":
        from accelerate import init_empty_weights

        place = init_empty_weights(include_buffers=False)
    else:
        place = torch.device(device or "cpu")
    with place, _default_dtype(dtype), contextlib.redirect_stdout(None):
        model = model_mod.Sa2VAChatModel(cfg)
    return model


def _sharpen_mask_heads(model) -> None:
    decoder = model.grounding_encoder.sam2_model.sam_mask_decoder
    with torch.no_grad():
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_GAIN)
            mlp.layers[-1].bias.mul_(LOGIT_GAIN)


def build_replica(path: str | Path, family: str = "qwen2", shape: str = "tiny", seed: int = 0,
                  dtype: torch.dtype | None = None, device=None, llm: str | None = None,
                  forced_answer: str | None = DEFAULT_ANSWER) -> Path:
    """Write a Sa2VA checkpoint folder of ``family`` ("qwen2" | "internlm2") and ``shape`` (``SHAPES``) to
    ``path`` (created) and return it. ``dtype`` defaults to float32 for tiny shapes and bfloat16 for real ones
    (released weights are bf16); ``device`` is where the weights are made. ``llm`` is the older name of
    ``family``."""
    family = llm or family
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    dtype = dtype or (torch.float32 if shape.startswith("tiny") else torch.bfloat16)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_len = TOKENIZER_WRITERS[family](path)
    vocab = tokenizer_len if shape.startswith("tiny") else REAL_VOCAB[family]
    config = released_config(family, shape, vocab, dtype, forced_answer)

    torch.manual_seed(seed)
    model = build_model(config, dtype=dtype, device=device)
    _sharpen_mask_heads(model)
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(model.state_dict(), path, max_shard_size="5GB", metadata={"format": "pt"})
    import transformers

    _write_json(path / "config.json", dict(config, transformers_version=transformers.__version__))
    for src in sorted(REMOTE_CODE.glob("*.py")):
        if src.name != "__init__.py":
            shutil.copy2(src, path / src.name)
    return path
