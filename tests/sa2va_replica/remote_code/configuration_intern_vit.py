"""Replica of the vision-tower configuration a Sa2VA checkpoint ships (an InternViT stand-in, tiny).

Field names follow the public InternVL/Sa2VA ``vision_config`` (image_size, patch_size, hidden_size, ...); the
replica only reads the ones it needs. Written for rl-seg's tests, not taken from InternVL.
"""

from transformers.configuration_utils import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=4, image_size=32, hidden_size=16, intermediate_size=32,
                 num_attention_heads=2, num_hidden_layers=1, layer_norm_eps=1e-6, initializer_factor=0.1,
                 use_flash_attn=False, **kwargs):
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.layer_norm_eps = layer_norm_eps
        self.initializer_factor = initializer_factor
        self.use_flash_attn = use_flash_attn
        super().__init__(**kwargs)
