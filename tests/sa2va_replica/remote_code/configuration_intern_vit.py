"""Replica of InternVL's ``InternVisionConfig`` (``configuration_intern_vit.py`` of Sa2VA's InternVL-based remote
code), written for rl-seg's tests: same fields, defaults (those of InternViT-6B) and ``model_type``."""

import os
from typing import Union

from transformers.configuration_utils import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)


class InternVisionConfig(PretrainedConfig):
    """InternViT: ``norm_type`` 'rms_norm' with ``qk_normalization`` and no qkv bias is the 6B tower (InternVL2.5-26B),
    'layer_norm' with qkv bias and no qk norm the 300M one; ``initializer_factor`` is the initial layer scale."""

    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                 num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                 use_flash_attn=True, hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6, dropout=0.0,
                 drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "PretrainedConfig":
        """Also reads the ``vision_config`` of a whole InternVL/Sa2VA ``config.json``."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        config_dict = config_dict.get("vision_config", config_dict)
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            logger.warning(f"A config of model_type {config_dict['model_type']} instantiates {cls.model_type}; "
                           f"not every field may carry over.")
        return cls.from_dict(config_dict, **kwargs)
