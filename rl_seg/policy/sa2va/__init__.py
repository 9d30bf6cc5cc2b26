"""Sa2VA checkpoints (Hugging Face folders with their own remote code) as rl-seg policies.

``core`` holds what every release shares (SAM2 grounding, the action grid, inputs, loading and saving, the
transformers-5 repairs in ``compat``); each family is one module: ``internvl`` (``Sa2VAChatModel``: InternViT + Qwen2 /
Qwen2.5 / Qwen3 / InternLM2) and ``qwen_vl`` (``Sa2VAChatModelQwen``: Qwen2.5-VL / Qwen3-VL). A new release is one new
module with a :class:`~rl_seg.policy.sa2va.core.Sa2VABase` subclass registered under its own name.
"""

from .core import (ACTION_RESOLUTIONS, DEFAULT_ANSWER, FrozenFeatures, Sa2VABase, Sa2VAInputs,
                   binarize_like_predict_forward, upsample_like_predict_forward)
from .internvl import LORA_TARGET_PRESETS, Sa2VAPolicy, detect_llm_family, split_into_tiles, tile_grid
from .qwen_vl import QWEN_VL_LORA_PRESETS, Sa2VAQwenPolicy

__all__ = ["ACTION_RESOLUTIONS", "DEFAULT_ANSWER", "FrozenFeatures", "Sa2VABase", "Sa2VAInputs",
           "binarize_like_predict_forward", "upsample_like_predict_forward", "LORA_TARGET_PRESETS", "Sa2VAPolicy",
           "detect_llm_family", "split_into_tiles", "tile_grid", "QWEN_VL_LORA_PRESETS", "Sa2VAQwenPolicy"]
