"""Replica of the Phi-3 module InternVL's remote code ships (``modeling_phi3.py``), written for rl-seg's tests.

What matters for rl-seg is its import: ``modeling_sa2va_chat`` imports this module unconditionally, whatever the
checkpoint's LLM, and this module imports ``transformers.modeling_attn_mask_utils`` at module level, as the public
file does. transformers 5 removed that module, so importing Sa2VA's remote code fails there with
ModuleNotFoundError for every Sa2VA size. The imports below are the public file's (transformers' own
``Phi3Config`` included, not the ``configuration_phi3`` beside it).

The model is a small faithful core (parameter names and shapes of Phi-3: fused ``qkv_proj`` and ``gate_up_proj``,
eager attention, default rotary positions) without a KV cache, flash/SDPA paths or su/yarn rope scaling: no Sa2VA
release uses Phi-3 (``Sa2VAChatConfig`` cannot even build a Phi-3 LLM config).
"""

import inspect
from typing import List, Optional, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache  # noqa: F401
from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.phi3.configuration_phi3 import Phi3Config
from transformers.utils import logging

logger = logging.get_logger(__name__)

_flash_supports_window_size = False
try:
    from flash_attn import flash_attn_func

    _flash_supports_window_size = "window_size" in inspect.signature(flash_attn_func).parameters
    has_flash_attn = True
except ImportError as error:
    logger.warning(f"`flash-attention` package not found, consider installing for better performance: {error}.")
    logger.warning("Current `flash-attenton` does not support `window_size`. Either upgrade or use "
                   "`attn_implementation='eager'`.")
    has_flash_attn = False


class Phi3RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Phi3RotaryEmbedding(nn.Module):
    """Rotary positions computed per call in fp32; ``inv_freq`` is created lazily on the first call."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.register_buffer("inv_freq", None, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids, seq_len=None):
        if self.inv_freq is None:
            steps = torch.arange(0, self.dim, 2, dtype=torch.int64, device=x.device).float()
            self.inv_freq = 1.0 / (self.base ** (steps / self.dim))
        freqs = (self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
                 @ position_ids[:, None, :].float()).transpose(1, 2)
        table = torch.cat((freqs, freqs), dim=-1)
        return table.cos().to(dtype=x.dtype), table.sin().to(dtype=x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class Phi3MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, slen, head_dim = hidden_states.shape
    return hidden_states[:, :, None].expand(batch, kv_heads, n_rep, slen, head_dim).reshape(
        batch, kv_heads * n_rep, slen, head_dim)


class Phi3Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: Optional[int] = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attention_dropout = config.attention_dropout
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.max_position_embeddings = config.max_position_embeddings
        self.original_max_position_embeddings = config.original_max_position_embeddings
        self.rope_theta = config.rope_theta
        self.rope_scaling = config.rope_scaling
        self.is_causal = True
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size must be divisible by num_heads (got `hidden_size`: {self.hidden_size} "
                             f"and `num_heads`: {self.num_heads}).")
        op_size = self.num_heads * self.head_dim + 2 * (self.num_key_value_heads * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.qkv_proj = nn.Linear(self.hidden_size, op_size, bias=False)
        self._init_rope()

    def _init_rope(self):
        if self.rope_scaling is not None:
            raise NotImplementedError("replica modeling_phi3: su/yarn rope scaling is not replicated")
        self.rotary_emb = Phi3RotaryEmbedding(self.head_dim, max_position_embeddings=self.max_position_embeddings,
                                              base=self.rope_theta)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        bsz, q_len, _ = hidden_states.size()
        qkv = self.qkv_proj(hidden_states)
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        query = qkv[..., :q_width].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = qkv[..., q_width:q_width + kv_width].view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        value = qkv[..., q_width + kv_width:].view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary_emb(value, position_ids)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) / self.head_dim ** 0.5
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(value.dtype)
        weights = nn.functional.dropout(weights, p=self.attention_dropout, training=self.training)
        out = torch.matmul(weights, value).transpose(1, 2).contiguous().reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(out), None, None


PHI3_ATTENTION_CLASSES = {"eager": Phi3Attention}


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.self_attn = PHI3_ATTENTION_CLASSES[config._attn_implementation](config, layer_idx=layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        attended = self.self_attn(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                  position_ids=position_ids)[0]
        hidden_states = hidden_states + self.resid_attn_dropout(attended)
        return (hidden_states + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(hidden_states))),)


class Phi3PreTrainedModel(PreTrainedModel):
    config_class = Phi3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn_2 = True
    _supports_sdpa = False
    _supports_cache_class = True
    _version = "0.0.5"

    def __init__(self, config: Phi3Config):
        if not has_flash_attn:
            config._attn_implementation = "eager"
            print("Warning: Flash attention is not available, using eager attention instead.")
        super().__init__(config)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


class Phi3Model(Phi3PreTrainedModel):
    def __init__(self, config: Phi3Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList([Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self._attn_implementation = config._attn_implementation
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None) -> Union[Tuple, BaseModelOutputWithPast]:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=inputs_embeds.device).unsqueeze(0)
        mask = _prepare_4d_causal_attention_mask(attention_mask, (batch, seq_len), inputs_embeds, 0,
                                                 sliding_window=self.config.sliding_window)
        hidden_states = self.embed_dropout(inputs_embeds)
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids)[0]
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=None,
                                       hidden_states=all_hidden)


class Phi3ForCausalLM(Phi3PreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = Phi3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values: Optional[List[torch.FloatTensor]] = None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None) -> Union[Tuple, CausalLMOutputWithPast]:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        logits = self.lm_head(outputs.last_hidden_state).float()
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits[..., :-1, :].reshape(-1, self.vocab_size),
                                      labels[..., 1:].reshape(-1).to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
