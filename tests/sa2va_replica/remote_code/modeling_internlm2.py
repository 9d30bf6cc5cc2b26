"""Replica of InternLM2 (``modeling_internlm2.py`` shipped with Sa2VA-8B/26B), written for rl-seg's tests with the
public module's class names, parameter names and shapes (``tok_embeddings``, ``layers.N.attention.wqkv/wo``,
``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``), call flow and arithmetic, and
with its behaviour under transformers 5 (measured on the public code; keep them, they are what users hit):

- ``InternLM2Attention._init_rope`` reads ``config.rope_scaling['type']`` whenever ``rope_scaling`` is not None.
  transformers 5 turns a ``None`` into ``{'rope_type': 'default', 'rope_theta': ...}``: KeyError 'type' when the
  model is built. (A released config's ``{'type': 'dynamic', 'factor': 2.0}`` keeps its 'type' key and builds.)
- ``InternLM2ForCausalLM._tied_weights_keys`` is a list; transformers 5 expects a dict: ``save_pretrained`` raises
  AttributeError ``'list' object has no attribute 'keys'``.
- The rotary embeddings keep ``inv_freq``, ``cos_cached`` and ``sin_cached`` as non-persistent buffers computed in
  ``__init__`` (a cos/sin table of ``max_position_embeddings`` rows per layer, in the default dtype). They are not
  in the checkpoint, so transformers 5's ``from_pretrained`` (which builds on the meta device) leaves them
  uninitialised: garbage positions and NaN logits, without an error.
- ``InternLM2ForCausalLM`` inherits ``GenerationMixin`` only through ``InternLM2PreTrainedModel``; transformers >=
  4.50 counts direct bases only (``can_generate()`` is False), so the model gets no ``generation_config`` and
  ``generate`` fails (4.57: 'NoneType' object has no attribute 'transformers_version'; 5.x: no attribute
  'generation_config'). With one set by hand, the legacy cache below breaks generation (4.57: AttributeError on
  ``.shape``; 5.24: IndexError in the rotary lookup). Sa2VA-8B/26B's ``predict_forward`` therefore needs an older
  transformers (the public code's generation config names 4.42.3).
- The KV cache is the legacy tuple of (key, value) per layer; ``prepare_inputs_for_generation`` reads
  ``past_key_values[0][0].shape[2]``.
- Attention is eager (flash-attn when importable; the model prints a warning and forces eager otherwise): q/k/v
  come from one ``wqkv`` laid out per key-value group as [q_1..q_g, k, v]; scores are divided by sqrt(head_dim),
  the additive causal/padding mask uses the dtype's minimum, softmax runs in fp32; logits are returned in fp32.
"""

import math
import warnings
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import GenerationMixin
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                                           SequenceClassifierOutputWithPast)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

try:
    from transformers.generation.streamers import BaseStreamer
except Exception:
    BaseStreamer = None

from .configuration_internlm2 import InternLM2Config

logger = logging.get_logger(__name__)

flash_attn_func, flash_attn_varlen_func = None, None
pad_input, index_first_axis, unpad_input = None, None, None


def _import_flash_attn():
    """Bind the flash-attn kernels to this module's globals; ImportError when the package is missing."""
    global flash_attn_func, flash_attn_varlen_func, pad_input, index_first_axis, unpad_input
    try:
        from flash_attn import flash_attn_func as _func
        from flash_attn import flash_attn_varlen_func as _varlen
        from flash_attn.bert_padding import index_first_axis as _index
        from flash_attn.bert_padding import pad_input as _pad
        from flash_attn.bert_padding import unpad_input as _unpad
    except ImportError:
        raise ImportError("flash_attn is not installed.")
    flash_attn_func, flash_attn_varlen_func = _func, _varlen
    pad_input, index_first_axis, unpad_input = _pad, _index, _unpad


try:
    _import_flash_attn()
    has_flash_attn = True
except Exception:
    has_flash_attn = False


def _get_unpad_data(attention_mask):
    """Indices of the kept tokens, cumulative sequence lengths and the longest length, for varlen kernels."""
    lengths = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, lengths.max().item()


def _make_causal_mask(input_ids_shape: torch.Size, dtype: torch.dtype, device: torch.device,
                      past_key_values_length: int = 0):
    """(bsz, 1, tgt, past + tgt) additive mask: 0 on and below the diagonal (and on the past), the dtype's min above."""
    bsz, tgt_len = input_ids_shape
    mask = torch.full((tgt_len, tgt_len), torch.tensor(torch.finfo(dtype).min, device=device), device=device)
    steps = torch.arange(tgt_len, device=device)
    mask.masked_fill_(steps < (steps + 1).view(tgt_len, 1), 0)
    mask = mask.to(dtype)
    if past_key_values_length > 0:
        mask = torch.cat([torch.zeros(tgt_len, past_key_values_length, dtype=dtype, device=device), mask], dim=-1)
    return mask[None, None, :, :].expand(bsz, 1, tgt_len, tgt_len + past_key_values_length)


def _expand_mask(mask: torch.Tensor, dtype: torch.dtype, tgt_len: Optional[int] = None):
    """(bsz, src) 1/0 padding mask -> (bsz, 1, tgt, src) additive mask (0 kept, the dtype's min dropped)."""
    bsz, src_len = mask.size()
    tgt_len = src_len if tgt_len is None else tgt_len
    inverted = 1.0 - mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


class InternLM2RMSNorm(nn.Module):
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
    from functools import partial

    from apex.normalization import FusedRMSNorm

    InternLM2RMSNorm = partial(FusedRMSNorm, eps=1e-6)  # noqa: F811
    print("Discovered apex.normalization.FusedRMSNorm - will use it instead of InternLM2RMSNorm")
except ImportError:
    pass
except Exception:
    print("discovered apex but it failed to load, falling back to InternLM2RMSNorm")


class InternLM2RotaryEmbedding(nn.Module):
    """Rotary positions from a cos/sin table built in ``__init__`` for ``max_position_embeddings`` positions and
    rebuilt (in fp32) when a longer sequence comes. The table and ``inv_freq`` are non-persistent buffers."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._set_cos_sin_cache(seq_len=max_position_embeddings, device=self.inv_freq.device,
                                dtype=torch.get_default_dtype())

    def _positions(self, seq_len, device):
        return torch.arange(seq_len, device=device).to(dtype=self.inv_freq.dtype)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        freqs = torch.einsum("i,j->ij", self._positions(seq_len, device), self.inv_freq)
        table = torch.cat((freqs, freqs), dim=-1)  # the two halves share frequencies (rotate_half pairing)
        self.register_buffer("cos_cached", table.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", table.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=torch.float32)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


class InternLM2LinearScalingRotaryEmbedding(InternLM2RotaryEmbedding):
    """Positions divided by ``scaling_factor``."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None, scaling_factor=1.0):
        self.scaling_factor = scaling_factor
        super().__init__(dim, max_position_embeddings, base, device)

    def _positions(self, seq_len, device):
        return super()._positions(seq_len, device) / self.scaling_factor


class InternLM2DynamicNTKScalingRotaryEmbedding(InternLM2RotaryEmbedding):
    """Dynamic NTK: beyond ``max_position_embeddings`` the base grows with the sequence length (``inv_freq`` is
    recomputed and stays so for shorter sequences afterwards)."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None, scaling_factor=1.0):
        self.scaling_factor = scaling_factor
        super().__init__(dim, max_position_embeddings, base, device)

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        if seq_len > self.max_position_embeddings:
            ratio = (self.scaling_factor * seq_len / self.max_position_embeddings) - (self.scaling_factor - 1)
            base = self.base * ratio ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        super()._set_cos_sin_cache(seq_len, device, dtype)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim=1):
    cos = cos[position_ids].unsqueeze(unsqueeze_dim)
    sin = sin[position_ids].unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class InternLM2MLP(nn.Module):
    """SwiGLU: ``w2(act(w1 x) * w3 x)``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.w1 = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.w3 = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.w2 = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, S, D) -> (B, kv_heads * n_rep, S, D), each key-value head repeated for its query group."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, slen, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, slen, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, slen, head_dim)


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.max_position_embeddings = config.max_position_embeddings
        self.is_causal = True
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size must be divisible by num_heads (got `hidden_size`: {self.hidden_size} "
                             f"and `num_heads`: {self.num_heads}).")
        self.wqkv = nn.Linear(self.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=config.bias)
        self._init_rope()

    def _init_rope(self):
        rope = dict(max_position_embeddings=self.max_position_embeddings, base=self.config.rope_theta)
        if self.config.rope_scaling is None:
            self.rotary_emb = InternLM2RotaryEmbedding(self.head_dim, **rope)
            return self.rotary_emb
        # Any non-None value is read as the legacy {'type', 'factor'} dict (transformers 5's standardised
        # rope dict has no 'type' key: KeyError, as upstream).
        scaling_type = self.config.rope_scaling["type"]
        scaling_factor = self.config.rope_scaling["factor"]
        if scaling_type == "dynamic":
            self.rotary_emb = InternLM2DynamicNTKScalingRotaryEmbedding(self.head_dim, scaling_factor=scaling_factor,
                                                                         **rope)
        elif scaling_type == "linear":
            self.rotary_emb = InternLM2LinearScalingRotaryEmbedding(self.head_dim, scaling_factor=scaling_factor,
                                                                     **rope)
        else:
            raise ValueError("Currently we only support rotary embedding's type being 'dynamic' or 'linear'.")
        return self.rotary_emb

    def _shape(self, tensor: torch.Tensor, seq_len: int, bsz: int):
        return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def _qkv_with_positions(self, hidden_states, position_ids, past_key_value):
        """Queries (B, H, q, D) and keys/values (B, kv, past + q, D), rotary positions applied, cache appended."""
        qkv = rearrange(self.wqkv(hidden_states), "b q (h gs d) -> b q h gs d", gs=2 + self.num_key_value_groups,
                        d=self.head_dim)
        query = rearrange(qkv[..., :self.num_key_value_groups, :], "b q h gs d -> b q (h gs) d").transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)
        kv_seq_len = key.shape[-2] + (past_key_value[0].shape[-2] if past_key_value is not None else 0)
        cos, sin = self.rotary_emb(value, seq_len=kv_seq_len)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, position_ids)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        return query, key, value, kv_seq_len

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_value: Optional[Tuple[torch.Tensor]] = None,
                output_attentions: bool = False, use_cache: bool = False, **kwargs):
        if "padding_mask" in kwargs:
            warnings.warn("Passing `padding_mask` is deprecated and will be removed in v4.37. Please make sure use "
                          "`attention_mask` instead.`")
        bsz, q_len, _ = hidden_states.size()
        query, key, value, kv_seq_len = self._qkv_with_positions(hidden_states, position_ids, past_key_value)
        past_key_value = (key, value) if use_cache else None
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)

        weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim)
        if weights.size() != (bsz, self.num_heads, q_len, kv_seq_len):
            raise ValueError(f"Attention weights should be of size {(bsz, self.num_heads, q_len, kv_seq_len)}, but "
                             f"is {weights.size()}")
        if attention_mask is not None:
            if attention_mask.size() != (bsz, 1, q_len, kv_seq_len):
                raise ValueError(f"Attention mask should be of size {(bsz, 1, q_len, kv_seq_len)}, but is "
                                 f"{attention_mask.size()}")
            weights = weights + attention_mask
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, value)
        if out.size() != (bsz, self.num_heads, q_len, self.head_dim):
            raise ValueError(f"`attn_output` should be of size {(bsz, self.num_heads, q_len, self.head_dim)}, but "
                             f"is {out.size()}")
        out = self.wo(out.transpose(1, 2).contiguous().reshape(bsz, q_len, self.hidden_size))
        return out, (weights if output_attentions else None), past_key_value


class InternLM2FlashAttention2(InternLM2Attention):
    """The same projections through flash-attn's kernels (padding removed around the varlen kernel)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.LongTensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_value: Optional[Tuple[torch.Tensor]] = None,
                output_attentions: bool = False, use_cache: bool = False, **kwargs):
        if "padding_mask" in kwargs:
            warnings.warn("Passing `padding_mask` is deprecated and will be removed in v4.37. Please make sure use "
                          "`attention_mask` instead.`")
            attention_mask = kwargs.pop("padding_mask")
        bsz, q_len, _ = hidden_states.size()
        query, key, value, _ = self._qkv_with_positions(hidden_states, position_ids, past_key_value)
        past_key_value = (key, value) if use_cache else None
        out = self._flash_attention_forward(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                            attention_mask, q_len)
        out = self.wo(out.reshape(bsz, q_len, self.hidden_size).contiguous())
        return out, None, past_key_value

    def _flash_attention_forward(self, query_states, key_states, value_states, attention_mask, query_length,
                                 dropout=0.0, softmax_scale=None):
        causal = self.is_causal and query_length != 1
        if attention_mask is None:
            return flash_attn_func(query_states, key_states, value_states, dropout, softmax_scale=softmax_scale,
                                   causal=causal)
        batch_size = query_states.shape[0]
        q, k, v, indices_q, (cu_q, cu_k), (max_q, max_k) = self._unpad_input(
            query_states, key_states, value_states, attention_mask, query_length)
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                     max_seqlen_k=max_k, dropout_p=dropout, softmax_scale=softmax_scale,
                                     causal=causal)
        return pad_input(out, indices_q, batch_size, query_length)

    def _unpad_input(self, query_layer, key_layer, value_layer, attention_mask, query_length):
        indices_k, cu_seqlens_k, max_k = _get_unpad_data(attention_mask)
        batch_size, kv_seq_len, kv_heads, head_dim = key_layer.shape
        key_layer = index_first_axis(key_layer.reshape(batch_size * kv_seq_len, kv_heads, head_dim), indices_k)
        value_layer = index_first_axis(value_layer.reshape(batch_size * kv_seq_len, kv_heads, head_dim), indices_k)
        if query_length == kv_seq_len:
            query_layer = index_first_axis(query_layer.reshape(batch_size * kv_seq_len, self.num_heads, head_dim),
                                           indices_k)
            cu_seqlens_q, max_q, indices_q = cu_seqlens_k, max_k, indices_k
        elif query_length == 1:
            max_q = 1
            cu_seqlens_q = torch.arange(batch_size + 1, dtype=torch.int32, device=query_layer.device)
            indices_q = cu_seqlens_q[:-1]
            query_layer = query_layer.squeeze(1)
        else:  # left padding assumed
            query_layer, indices_q, cu_seqlens_q, max_q = unpad_input(query_layer, attention_mask[:, -query_length:])
        return (query_layer, key_layer, value_layer, indices_q.to(torch.int64), (cu_seqlens_q, cu_seqlens_k),
                (max_q, max_k))


INTERNLM2_ATTENTION_CLASSES = {"eager": InternLM2Attention, "flash_attention_2": InternLM2FlashAttention2}


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.attention = INTERNLM2_ATTENTION_CLASSES[config.attn_implementation](config=config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_value: Optional[Tuple[torch.Tensor]] = None,
                output_attentions: Optional[bool] = False, use_cache: Optional[bool] = False, **kwargs):
        if "padding_mask" in kwargs:
            warnings.warn("Passing `padding_mask` is deprecated and will be removed in v4.37. Please make sure use "
                          "`attention_mask` instead.`")
        attended, weights, present = self.attention(
            hidden_states=self.attention_norm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_value=past_key_value, output_attentions=output_attentions,
            use_cache=use_cache, **kwargs)
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class InternLM2PreTrainedModel(PreTrainedModel, GenerationMixin):
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn_2 = True

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


class InternLM2Model(InternLM2PreTrainedModel):
    _auto_class = "AutoModel"

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.config = config
        if not has_flash_attn:
            self.config.attn_implementation = "eager"
            print("Warning: Flash attention is not available, using eager attention instead.")
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def _prepare_decoder_attention_mask(self, attention_mask, input_shape, inputs_embeds, past_key_values_length):
        combined = None
        if input_shape[-1] > 1:
            combined = _make_causal_mask(input_shape, inputs_embeds.dtype, device=inputs_embeds.device,
                                         past_key_values_length=past_key_values_length)
        if attention_mask is not None:
            expanded = _expand_mask(attention_mask, inputs_embeds.dtype, tgt_len=input_shape[-1]).to(
                inputs_embeds.device)
            combined = expanded if combined is None else expanded + combined
        return combined

    def forward(self, input_ids: torch.LongTensor = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                past_key_values: Optional[List[torch.FloatTensor]] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None, use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None) -> Union[Tuple, BaseModelOutputWithPast]:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = cfg.use_cache if use_cache is None else use_cache
        return_dict = cfg.use_return_dict if return_dict is None else return_dict
        flash = cfg.attn_implementation == "flash_attention_2"
        if flash:
            _import_flash_attn()

        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        batch_size, seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if position_ids is None:
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            position_ids = torch.arange(past_length, seq_length + past_length, dtype=torch.long,
                                        device=device).unsqueeze(0)
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        if flash:  # the kernels take the 2-D padding mask, or none when nothing is padded
            attention_mask = attention_mask if (attention_mask is not None and 0 in attention_mask) else None
        else:
            if attention_mask is None:
                attention_mask = torch.ones((batch_size, seq_length + past_length), dtype=torch.bool,
                                            device=inputs_embeds.device)
            attention_mask = self._prepare_decoder_attention_mask(attention_mask, (batch_size, seq_length),
                                                                  inputs_embeds, past_length)
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing. Setting "
                                "`use_cache=False`...")
            use_cache = False

        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        cache = () if use_cache else None
        for idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                def run(*inputs, _layer=layer):
                    return _layer(*inputs, output_attentions, None)

                layer_out = torch.utils.checkpoint.checkpoint(run, hidden_states, attention_mask, position_ids, None)
            else:
                layer_out = layer(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_value=past_key_values[idx] if past_key_values is not None else None,
                                  output_attentions=output_attentions, use_cache=use_cache)
            hidden_states = layer_out[0]
            if use_cache:
                cache += (layer_out[2 if output_attentions else 1],)
            if output_attentions:
                all_attn += (layer_out[1],)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden, all_attn) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=cache,
                                       hidden_states=all_hidden, attentions=all_attn)


# InternLM2-chat's default system prompt (the public ``chat`` default)
_INTERNLM_SYSTEM = ("You are an AI assistant whose name is InternLM (书生·浦语).\n"
                    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
                    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
                    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user "
                    "such as English and 中文.")


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    _auto_class = "AutoModelForCausalLM"
    # a list, as in the public code (transformers 5 expects a {target: source} dict; see the module docstring)
    _tied_weights_keys = ["output.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, new_embeddings):
        self.output = new_embeddings

    def set_decoder(self, decoder):
        self.model = decoder

    def get_decoder(self):
        return self.model

    def forward(self, input_ids: torch.LongTensor = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                past_key_values: Optional[List[torch.FloatTensor]] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None) -> Union[Tuple, CausalLMOutputWithPast]:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.use_return_dict if return_dict is None else return_dict
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=return_dict)
        logits = self.output(outputs[0]).float()
        loss = None
        if labels is not None:  # next-token prediction
            shift_logits = logits[..., :-1, :].contiguous().view(-1, cfg.vocab_size)
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = CrossEntropyLoss()(shift_logits, shift_labels)
        if not return_dict:
            output = (logits,) + outputs[1:]
            return (loss,) + output if loss is not None else output
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        output = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                        hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        output["logits"] = output["logits"].to(device)
        return output

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        if past_key_values is not None:
            past_length = past_key_values[0][0].shape[2]
            # drop what the cache already holds (or keep only the last id when the caller already trimmed)
            cut = past_length if input_ids.shape[1] > past_length else input_ids.shape[1] - 1
            input_ids = input_ids[:, cut:]
        position_ids = kwargs.get("position_ids", None)
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -input_ids.shape[1]:]
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update({"position_ids": position_ids, "past_key_values": past_key_values,
                             "use_cache": kwargs.get("use_cache"), "attention_mask": attention_mask})
        return model_inputs

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer)
                     for layer in past_key_values)

    def build_inputs(self, tokenizer, query: str, history: List[Tuple[str, str]] = [], meta_instruction=""):
        prompt = "" if tokenizer.add_bos_token else tokenizer.bos_token
        if meta_instruction:
            prompt += f"<|im_start|>system\n{meta_instruction}<|im_end|>\n"
        for user, bot in history:
            prompt += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{bot}<|im_end|>\n"
        prompt += f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
        return tokenizer([prompt], return_tensors="pt")

    @torch.no_grad()
    def chat(self, tokenizer, query: str, history: List[Tuple[str, str]] = [], streamer=None,
             max_new_tokens: int = 1024, do_sample: bool = True, temperature: float = 0.8, top_p: float = 0.8,
             meta_instruction: str = _INTERNLM_SYSTEM, **kwargs):
        """One chat turn; ``<|im_end|>`` ends the answer as well as the eos token."""
        inputs = {k: v.to(self.device) for k, v in self.build_inputs(tokenizer, query, history,
                                                                     meta_instruction).items() if torch.is_tensor(v)}
        eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(["<|im_end|>"])[0]]
        outputs = self.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, eos_token_id=eos_token_id, **kwargs)
        response = tokenizer.decode(outputs[0].cpu().tolist()[len(inputs["input_ids"][0]):],
                                    skip_special_tokens=True).split("<|im_end|>")[0]
        return response, history + [(query, response)]


class InternLM2ForSequenceClassification(InternLM2PreTrainedModel):
    """A linear ``score`` head on the last non-padding token."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = InternLM2Model(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def forward(self, input_ids: torch.LongTensor = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                past_key_values: Optional[List[torch.FloatTensor]] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None) -> Union[Tuple, SequenceClassifierOutputWithPast]:
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=return_dict)
        logits = self.score(outputs[0])
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if self.config.pad_token_id is None or input_ids is None:
            last = -1
        else:
            last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1).to(logits.device)
        pooled = logits[torch.arange(batch_size, device=logits.device), last]
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = MSELoss()(pooled.squeeze(), labels.squeeze()) if self.num_labels == 1 else \
                    MSELoss()(pooled, labels)
            elif self.config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(pooled.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(pooled, labels)
        if not return_dict:
            output = (pooled,) + outputs[1:]
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=outputs.past_key_values,
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)
