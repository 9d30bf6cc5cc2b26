"""Replica of ``InternLM2Config`` (``configuration_internlm2.py`` shipped with Sa2VA-8B/26B), written for rl-seg's
tests: the fields, defaults and ``rope_scaling`` validation of the public code, in its order.

That order matters under transformers 5: ``rope_scaling`` is assigned (and validated as a ``{'type', 'factor'}``
dict) before ``PretrainedConfig.__init__`` runs, and 5.x's config then rewrites it into ``rope_parameters``
(``None`` becomes ``{'rope_type': 'default', 'rope_theta': ...}``), which ``InternLM2Attention._init_rope`` trips
over (see modeling_internlm2)."""

from transformers.configuration_utils import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"
    _auto_class = "AutoConfig"

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, bias=True, rope_theta=10000, rope_scaling=None,
                 attn_implementation="eager", **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.bias = bias
        # multi-head attention unless told otherwise
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._rope_scaling_validation()
        self.attn_implementation = "eager" if attn_implementation is None else attn_implementation
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _rope_scaling_validation(self):
        """``rope_scaling`` is None or exactly ``{'type': 'linear'|'dynamic', 'factor': float >= 1}``."""
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or len(scaling) != 2:
            raise ValueError("`rope_scaling` must be a dictionary with with two fields, `type` and `factor`, "
                             f"got {scaling}")
        kind, factor = scaling.get("type"), scaling.get("factor")
        if kind not in ("linear", "dynamic"):
            raise ValueError(f"`rope_scaling`'s type field must be one of ['linear', 'dynamic'], got {kind}")
        if not isinstance(factor, float) or factor < 1.0:
            raise ValueError(f"`rope_scaling`'s factor field must be a float >= 1, got {factor}")
