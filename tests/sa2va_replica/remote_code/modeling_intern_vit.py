"""Replica of InternVL's vision tower (``modeling_intern_vit.py`` of Sa2VA's InternVL-based remote code), written for
rl-seg's tests with the public module's class names, parameter names and shapes, call flow and arithmetic:

- patch embedding (Conv2d, stride = patch) + a class token + learned positions, resized bicubically (in fp32) to
  the patch grid actually seen;
- pre-norm blocks: ``x + drop_path(attn(norm1(x)) * ls1)``, ``x + drop_path(mlp(norm2(x)) * ls2)``; the norm is
  RMSNorm (InternViT-6B) or LayerNorm (InternViT-300M) by ``norm_type``; ``qk_normalization`` (6B) RMS-normalises
  queries and keys over all heads; layer scales start at ``initializer_factor``; DropPath comes from timm (imported
  through the deprecated ``timm.models.layers`` path, as upstream);
- eager attention multiplies queries by head_dim^-0.5 before the product and softmaxes in the input dtype;
  flash-attn is used when importable (never on CPU: the module then prints "FlashAttention is not installed.");
- ``InternVisionModel`` never calls ``post_init()`` (its weights are PyTorch's defaults until a checkpoint loads),
  and ``InternVisionEncoder.gradient_checkpointing`` is on by default (it only acts in training mode).
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from timm.models.layers import DropPath
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .configuration_intern_vit import InternVisionConfig

try:
    from .flash_attention import FlashAttention
    has_flash_attn = True
except Exception:  # the public code catches everything here too (a broken flash-attn install included)
    print("FlashAttention is not installed.")
    has_flash_attn = False

logger = logging.get_logger(__name__)


class InternRMSNorm(nn.Module):
    """RMS normalisation computed in fp32, scaled by ``weight`` after casting back to the input dtype."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


try:  # apex's fused kernel replaces it when installed, as upstream
    from apex.normalization import FusedRMSNorm

    InternRMSNorm = FusedRMSNorm  # noqa: F811
    logger.info("Discovered apex.normalization.FusedRMSNorm - will use it instead of InternRMSNorm")
except ImportError:
    pass
except Exception:
    logger.warning("discovered apex but it failed to load, falling back to InternRMSNorm")

NORM2FN = {"rms_norm": InternRMSNorm, "layer_norm": nn.LayerNorm}


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def _get_pos_embed(self, pos_embed, H, W):
        """The learned square grid of patch positions, bicubically resized (in fp32) to H x W, as (1, H*W, C)."""
        dtype = pos_embed.dtype
        side = self.image_size // self.patch_size
        grid = pos_embed.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H, W), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, H * W).permute(0, 2, 1).to(dtype)

    def forward(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values)  # B, C, h, w
        batch, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, 1, -1).to(dtype)
        embeddings = torch.cat([cls, patches], dim=1)
        positions = torch.cat([self.position_embedding[:, :1, :],
                               self._get_pos_embed(self.position_embedding[:, 1:, :], height, width)], dim=1)
        return embeddings + positions.to(dtype)


class InternAttention(nn.Module):
    """Multi-head self-attention over a fused ``qkv`` projection, optionally with RMS-normalised q and k."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.use_flash_attn = config.use_flash_attn and has_flash_attn
        if config.use_flash_attn and not has_flash_attn:
            print("Warning: Flash Attention is not available, use_flash_attn is set to False.")
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"embed_dim must be divisible by num_heads (got `embed_dim`: {self.embed_dim} and "
                             f"`num_heads`: {self.num_heads}).")
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_drop = nn.Dropout(config.attention_dropout)
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        if self.use_flash_attn:
            self.inner_attn = FlashAttention(attention_dropout=config.attention_dropout)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _naive_attn(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_normalization:
            # normalised across all heads at once: (B, H, N, D) -> (B, N, H*D) -> back
            _, H, _, D = q.shape
            q = self.q_norm(q.transpose(1, 2).flatten(-2, -1)).view(B, N, H, D).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(-2, -1)).view(B, N, H, D).transpose(1, 2)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def _flash_attn(self, x, key_padding_mask=None, need_weights=False):
        qkv = rearrange(self.qkv(x), "b s (three h d) -> b s three h d", three=3, h=self.num_heads)
        if self.qk_normalization:
            q, k, v = qkv.unbind(2)
            q = self.q_norm(q.flatten(-2, -1)).view(q.shape)
            k = self.k_norm(k.flatten(-2, -1)).view(k.shape)
            qkv = torch.stack([q, k, v], dim=2)
        context, _ = self.inner_attn(qkv, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                     causal=False)
        return self.proj_drop(self.proj(rearrange(context, "b s h d -> b s (h d)")))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_flash_attn:
            return self._flash_attn(hidden_states)
        return self._naive_attn(hidden_states)


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig, drop_path_rate: float):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.norm_type = config.norm_type
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = NORM2FN[self.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.norm2 = NORM2FN[self.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path1(self.attn(self.norm1(hidden_states)) * self.ls1)
        return hidden_states + self.drop_path2(self.mlp(self.norm2(hidden_states)) * self.ls2)


class InternVisionEncoder(nn.Module):
    """The stack of layers; stochastic depth grows linearly from 0 to ``drop_path_rate`` over the depth."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        rates = [r.item() for r in torch.linspace(0, config.drop_path_rate, config.num_hidden_layers)]
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config, rate) for rate in rates])
        self.gradient_checkpointing = True

    def forward(self, inputs_embeds, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None) -> Union[Tuple, BaseModelOutput]:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.use_return_dict
        states = () if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if output_hidden_states:
                states = states + (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states)
            else:
                hidden_states = layer(hidden_states)
        if output_hidden_states:
            states = states + (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states)


class InternVisionModel(PreTrainedModel):
    main_input_name = "pixel_values"
    _supports_flash_attn_2 = True
    config_class = InternVisionConfig
    _no_split_modules = ["InternVisionEncoderLayer"]

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def resize_pos_embeddings(self, old_size, new_size, patch_size):
        """Resample the learned positions from an ``old_size`` to a ``new_size`` pixel grid (bicubic, fp32)."""
        pos = self.embeddings.position_embedding
        embed_dim = pos.shape[-1]
        cls = pos[:, :1, :]
        grid = pos[:, 1:, :].reshape(1, old_size // patch_size, old_size // patch_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=new_size // patch_size, mode="bicubic", align_corners=False)
        grid = grid.to(cls.dtype).reshape(1, embed_dim, -1).permute(0, 2, 1)
        self.embeddings.position_embedding = nn.Parameter(torch.cat([cls, grid], dim=1))
        self.embeddings.image_size = new_size
        logger.info(f"Resized position embeddings from {old_size} to {new_size}")

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, pixel_values: Optional[torch.FloatTensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, pixel_embeds: Optional[torch.FloatTensor] = None
                ) -> Union[Tuple, BaseModelOutputWithPooling]:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.use_return_dict
        if pixel_values is None and pixel_embeds is None:
            raise ValueError("You have to specify pixel_values or pixel_embeds")
        if pixel_embeds is not None:
            hidden_states = pixel_embeds
        elif len(pixel_values.shape) == 4:
            hidden_states = self.embeddings(pixel_values)
        else:
            raise ValueError(f"wrong pixel_values size: {pixel_values.shape}")
        encoded = self.encoder(inputs_embeds=hidden_states, output_hidden_states=output_hidden_states,
                               return_dict=return_dict)
        last = encoded.last_hidden_state
        pooled = last[:, 0, :]
        if not return_dict:
            return (last, pooled) + encoded[1:]
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled,
                                          hidden_states=encoded.hidden_states, attentions=encoded.attentions)
