"""Replica of InternVL's ``flash_attention.py``: a packed-qkv attention module over the ``flash_attn`` package
(varlen kernel; padding removed and restored around it), written for rl-seg's tests.

It imports ``flash_attn`` at module level, as the public file does, so on machines without it (every CPU machine)
importing this module fails and InternViT / Sa2VAChatModel fall back to eager attention (they print
"FlashAttention is not installed.")."""

import torch
import torch.nn as nn
from einops import rearrange

try:  # flash-attn 1.x name
    from flash_attn.flash_attn_interface import flash_attn_unpadded_qkvpacked_func as _varlen_qkvpacked
except ImportError:  # 2.x
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func as _varlen_qkvpacked

from flash_attn.bert_padding import pad_input, unpad_input


class FlashAttention(nn.Module):
    """Softmax attention on packed ``qkv`` (B, S, 3, H, D), or unpadded (nnz, 3, H, D) with ``cu_seqlens``."""

    def __init__(self, softmax_scale=None, attention_dropout=0.0, device=None, dtype=None):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.dropout_p = attention_dropout

    def _kernel(self, qkv, cu_seqlens, max_s, causal):
        return _varlen_qkvpacked(qkv, cu_seqlens, max_s, self.dropout_p if self.training else 0.0,
                                 softmax_scale=self.softmax_scale, causal=causal)

    def forward(self, qkv, key_padding_mask=None, causal=False, cu_seqlens=None, max_s=None, need_weights=False):
        assert not need_weights
        assert qkv.dtype in (torch.float16, torch.bfloat16)
        assert qkv.is_cuda
        if cu_seqlens is not None:
            assert max_s is not None
            return self._kernel(qkv, cu_seqlens, max_s, causal), None
        batch, seqlen = qkv.shape[0], qkv.shape[1]
        if key_padding_mask is None:
            cu = torch.arange(0, (batch + 1) * seqlen, step=seqlen, dtype=torch.int32, device=qkv.device)
            out = self._kernel(rearrange(qkv, "b s ... -> (b s) ..."), cu, seqlen, causal)
            return rearrange(out, "(b s) ... -> b s ...", b=batch), None
        heads = qkv.shape[-2]
        # four results, as flash-attn < 2.6 returns (newer releases return five: this line then fails, as upstream's)
        flat, indices, cu, max_len = unpad_input(rearrange(qkv, "b s three h d -> b s (three h d)"), key_padding_mask)
        out = self._kernel(rearrange(flat, "nnz (three h d) -> nnz three h d", three=3, h=heads), cu, max_len,
                           causal)
        out = pad_input(rearrange(out, "nnz h d -> nnz (h d)"), indices, batch, seqlen)
        return rearrange(out, "b s (h d) -> b s h d", h=heads), None
