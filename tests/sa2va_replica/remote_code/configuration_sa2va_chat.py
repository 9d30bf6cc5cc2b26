"""Replica of Sa2VA's ``Sa2VAChatConfig`` (``configuration_sa2va_chat.py`` of the InternVL-based releases), written
for rl-seg's tests with the public code's fields, defaults and quirks:

- it prints ``self.architectures`` and ``vision_config`` on every construction (loading prints them too);
- without sub-configs it defaults to a Qwen2.5-VL vision config and a Qwen2 LLM when ``architectures`` is unset
  (an InternViT and an InternLM2 otherwise); the LLM config class follows ``llm_config['architectures'][0]``
  (Llama, InternLM2, Qwen2, Qwen3; anything else is a ValueError);
- ``to_dict`` serialises the instance's whole ``__dict__`` (private attributes included) plus the sub-configs.

Replica-only fields ride in ``**kwargs`` like any extra config key: ``replica_sam2_size`` (the SAM2 size switch,
absent = upstream's Hiera-L) and ``replica_forced_answer`` (see ``modeling_sa2va_chat``).
"""

import copy

import transformers
from transformers import LlamaConfig, Qwen2Config
from transformers.configuration_utils import PretrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (Qwen2_5_VLConfig,  # noqa: F401
                                                                     Qwen2_5_VLVisionConfig)
from transformers.utils import logging

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config

logger = logging.get_logger(__name__)

# config.json keys to_dict writes explicitly besides the instance's own attributes
_SERIALISED_FIELDS = ("use_backbone_lora", "use_llm_lora", "pad2square", "select_layer", "force_image_size",
                      "downsample_ratio", "template", "dynamic_image_size", "use_thumbnail", "ps_version",
                      "min_dynamic_patch", "max_dynamic_patch")


def _llm_config_class(architecture: str):
    if architecture == "LlamaForCausalLM":
        return LlamaConfig
    if architecture == "InternLM2ForCausalLM":
        return InternLM2Config
    if architecture == "Qwen2ForCausalLM":
        return Qwen2Config
    if architecture == "Qwen3ForCausalLM":
        # a string comparison of versions, as the public code does
        assert transformers.__version__ >= "4.56.0", "Please upgrade transformers to >=4.56.0 for Qwen3 support."
        from transformers import Qwen3Config
        return Qwen3Config
    raise ValueError(f"Unsupported architecture: {architecture}")


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_chat"

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0, pad2square=False,
                 select_layer=-1, force_image_size=None, downsample_ratio=0.5, template=None,
                 dynamic_image_size=False, use_thumbnail=False, ps_version="v1", min_dynamic_patch=1,
                 max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        print("self.architectures:", self.architectures)
        print("vision_config:", vision_config)
        if self.architectures is None:
            self.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        qwen_vl = self.architectures[0] == "Qwen2_5_VLForConditionalGeneration"

        if vision_config is None or vision_config.get("architectures") is None:
            vision_config = {"architectures": ["Qwen2_5_VisionTransformerPretrainedModel" if qwen_vl
                                               else "InternVisionModel"]}
            logger.info("vision_config is None. Initializing the InternVisionConfig with default values.")
        if llm_config is None:
            llm_config = {"architectures": ["Qwen2ForCausalLM" if qwen_vl else "InternLM2ForCausalLM"]}
            logger.info("llm_config is None. Initializing the LlamaConfig config with default values (`LlamaConfig`).")

        if vision_config.get("architectures")[0] == "Qwen2_5_VisionTransformerPretrainedModel":
            self.vision_config = Qwen2_5_VLVisionConfig(**vision_config)
        else:
            self.vision_config = InternVisionConfig(**vision_config)
        self.llm_config = _llm_config_class(llm_config.get("architectures")[0])(**llm_config)

        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.pad2square = pad2square
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version  # pixel shuffle version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.hidden_size = self.llm_config.hidden_size
        self.tie_word_embeddings = False
        logger.info(f"vision_select_layer: {self.select_layer}")
        logger.info(f"ps_version: {self.ps_version}")
        logger.info(f"min_dynamic_patch: {self.min_dynamic_patch}")
        logger.info(f"max_dynamic_patch: {self.max_dynamic_patch}")

    def to_dict(self):
        out = copy.deepcopy(self.__dict__)
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        out["model_type"] = self.__class__.model_type
        for name in _SERIALISED_FIELDS:
            out[name] = getattr(self, name)
        return out
