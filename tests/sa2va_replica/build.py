"""Writes a tiny Sa2VA checkpoint folder that loads like a real one: ``AutoModel.from_pretrained(folder,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(folder)``.

The folder has what a Sa2VA model repo on the Hugging Face Hub has (public facts about its layout):
``config.json`` with ``architectures: ["Sa2VAChatModel"]``, ``model_type: "sa2va_chat"`` and an ``auto_map`` to the
remote code beside it; the remote-code ``.py`` files (``configuration_sa2va_chat.py``, ``modeling_sa2va_chat.py``
and the modules they import); a tokenizer with Sa2VA's added tokens; and safetensors weights. Two language-model
shapes: ``qwen2`` (Sa2VA-1B/4B: a real transformers ``Qwen2ForCausalLM``) and ``internlm2`` (Sa2VA-8B/26B: the
replica's InternLM2-shaped model, whose tokenizer also prepends a BOS token as InternLM2's does).
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import torch

REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"

#: Tokens Sa2VA adds to its LLM's tokenizer, and the chat-turn tokens of the templates.
SA2VA_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>", "<IMG_CONTEXT>", "<img>", "</img>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]

LOGIT_GAIN = 15.0

AUTO_MAP = {
    "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
    "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
    "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
}


def _remote_module(name: str):
    """The replica's remote-code modules, imported as a package (they use relative imports, as the real ones)."""
    package = "sa2va_replica.remote_code"
    if str(REMOTE_CODE.parents[1]) not in sys.path:
        sys.path.insert(0, str(REMOTE_CODE.parents[1]))
    return importlib.import_module(f"{package}.{name}")


def build_tokenizer(llm: str):
    """Byte-level BPE without merges (every byte is a token, as the base alphabet of Qwen2's tokenizer), plus
    Sa2VA's special tokens; the InternLM2 flavour prepends ``<s>`` when encoding."""
    from tokenizers import Tokenizer, decoders, models, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if llm == "qwen2":
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                            eos_token="<|im_end|>")
        tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS + SA2VA_TOKENS})
    else:
        tok.add_special_tokens(["<s>", "</s>", "<unk>"])
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>", pad_token="</s>")
        tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS + SA2VA_TOKENS})
    return tokenizer


def build_replica(path: str | Path, llm: str = "qwen2", seed: int = 0) -> Path:
    """Write the replica checkpoint to ``path`` (created) and return it."""
    if llm not in ("qwen2", "internlm2"):
        raise ValueError(f"llm must be 'qwen2' or 'internlm2', got {llm!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(llm)

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                  tie_word_embeddings=False)
    if llm == "qwen2":
        llm_config = dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        template = "qwen_chat"
    else:
        llm_config = dict(common, architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                          bos_token_id=tokenizer.bos_token_id, rope_theta=10000.0)
        template = "internlm2_chat"

    config_mod = _remote_module("configuration_sa2va_chat")
    model_mod = _remote_module("modeling_sa2va_chat")
    config = config_mod.Sa2VAChatConfig(
        vision_config=dict(image_size=32, patch_size=4, hidden_size=16, intermediate_size=32,
                           num_attention_heads=2, num_hidden_layers=1),
        llm_config=llm_config, force_image_size=32, downsample_ratio=0.5, template=template, ps_version="v2",
        select_layer=-1, replica_forced_answer="Sure, [SEG].",
        sam2_config=dict(image_size=256, backbone_stride=16, hidden_dim=32, trunk_channels=[8, 16, 24, 32],
                         decoder_heads=2, decoder_mlp_dim=64, decoder_depth=2, mem_dim=16),
    )
    model = model_mod.Sa2VAChatModel(config)
    with torch.no_grad():
        # A trained Sa2VA's decoder says "object present" on images it is asked about; random weights would
        # say so only half the time, and SAM2 then overwrites every logit with -1024.
        decoder = model.grounding_encoder.sam2_model.sam_mask_decoder
        decoder.pred_obj_score_head.layers[-1].bias.fill_(8.0)
        # A trained decoder is confident (logits of several units); random weights give |logits| < 0.5, which
        # would make every threshold between 0.4 and 0.6 look alike.
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_GAIN)
            mlp.layers[-1].bias.mul_(LOGIT_GAIN)
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = ["Sa2VAChatModel"]
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    for src in REMOTE_CODE.glob("*.py"):
        if src.name != "__init__.py":
            shutil.copy2(src, path / src.name)
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"], cfg["architectures"] = dict(AUTO_MAP), ["Sa2VAChatModel"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path
