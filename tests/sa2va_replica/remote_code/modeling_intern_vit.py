"""A tiny stand-in for InternViT, the vision tower of Sa2VA (``model.vision_model``).

Same outline as the public InternVisionModel: patch + class + position embeddings, pre-norm encoder layers whose
attention is a fused ``attn.qkv`` / ``attn.proj`` pair with layer-scale (``ls1``/``ls2``), and an output whose
``last_hidden_state`` starts with the class token (Sa2VA drops it before pixel-shuffling). Written for rl-seg's
tests; sizes are tiny.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel

from .configuration_intern_vit import InternVisionConfig


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, stride=config.patch_size)
        n = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class InternMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(d))
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = InternMLP(config)
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, output_hidden_states=False):
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


class InternVisionModel(PreTrainedModel):
    config_class = InternVisionConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["InternVisionEncoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        pass  # keep PyTorch's default initialisation (the builder seeds it)

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None, **_):
        hidden = self.embeddings(pixel_values)
        last, states = self.encoder(hidden, output_hidden_states=bool(output_hidden_states))
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last[:, 0], hidden_states=states)
