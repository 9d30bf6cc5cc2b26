"""Replica of Sa2VA's ``Sa2VAChatConfig`` (model_type ``sa2va_chat``): a vision config, an LLM config chosen by
``llm_config["architectures"][0]``, and InternVL's image-token settings.

Public facts it follows (Sa2VA's Hugging Face remote code, ``configuration_sa2va_chat.py``): the composite config
holds ``vision_config`` and ``llm_config`` sub-configs, ``template`` names the chat template (``qwen_chat`` for
the Qwen2-based 1B/4B models, ``internlm2_chat`` for 8B/26B), and ``downsample_ratio`` / ``force_image_size`` /
``ps_version`` / ``select_layer`` describe the image tokens. ``sam2_config`` is a replica-only extension: the real
SAM2 grounding encoder is hard-coded at 1024 px, the replica's is sized here so tests run in seconds.
"""

import copy

from transformers import Qwen2Config
from transformers.configuration_utils import PretrainedConfig

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config

DEFAULT_SAM2 = {"image_size": 256, "backbone_stride": 16, "hidden_dim": 32, "trunk_channels": [8, 16, 24, 32],
                "decoder_heads": 2, "decoder_mlp_dim": 64, "decoder_depth": 2, "mem_dim": 16}


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_chat"

    def __init__(self, vision_config=None, llm_config=None, sam2_config=None, use_backbone_lora=0,
                 use_llm_lora=0, select_layer=-1, force_image_size=None, downsample_ratio=0.5, template="qwen_chat",
                 dynamic_image_size=False, use_thumbnail=False, ps_version="v2", min_dynamic_patch=1,
                 max_dynamic_patch=1, replica_forced_answer=None, **kwargs):
        vision_config = vision_config or {}
        llm_config = llm_config or {"architectures": ["Qwen2ForCausalLM"]}
        if isinstance(vision_config, PretrainedConfig):
            vision_config = vision_config.to_dict()
        if isinstance(llm_config, PretrainedConfig):
            llm_config = llm_config.to_dict()
        self.vision_config = InternVisionConfig(**vision_config)
        arch = llm_config["architectures"][0]
        if arch == "Qwen2ForCausalLM":
            self.llm_config = Qwen2Config(**llm_config)
        elif arch == "InternLM2ForCausalLM":
            self.llm_config = InternLM2Config(**llm_config)
        else:
            raise ValueError(f"unsupported language model architecture {arch!r}")
        self.sam2_config = {**DEFAULT_SAM2, **(sam2_config or {})}
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        # Replica only: random weights never say "[SEG]" on their own, so greedy decoding in predict_forward is
        # steered to this answer (the real model learned to produce it).
        self.replica_forced_answer = replica_forced_answer
        super().__init__(**kwargs)
        self.hidden_size = self.llm_config.hidden_size
        self.tie_word_embeddings = False

    def to_dict(self):
        out = super().to_dict()
        for key in ("vision_config", "llm_config"):
            sub = getattr(self, key)
            if isinstance(sub, PretrainedConfig):
                out[key] = sub.to_dict()
        out["sam2_config"] = copy.deepcopy(self.sam2_config)
        out["model_type"] = self.model_type
        return out
