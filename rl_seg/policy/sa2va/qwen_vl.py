"""The Qwen-VL based Sa2VA releases (``Sa2VAChatModelQwen``): Qwen2.5-VL (Sa2VA-Qwen2_5-VL-3B/7B) or Qwen3-VL
(Sa2VA-Qwen3-VL-4B) + SAM2.

The [SEG] state: the checkpoint's own processor turns the image and the request into token ids and vision patches
exactly as ``predict_forward`` does (``qwen_vl_utils.process_vision_info``, then the processor with Sa2VA's
``min_pixels`` / ``max_pixels``), the answer is teacher-forced after the generation prompt, and the Qwen-VL model's last
hidden state at ``[SEG]`` is read (``Sa2VAChatModelQwen.model`` is transformers' ``Qwen2_5_VLForConditionalGeneration``
or ``Qwen3VLForConditionalGeneration``; its ``.model`` returns the final-normed hidden states without the vocabulary
projection). The number of image tokens depends on the image size, so rows of a batch are right-padded.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..base import DEFAULT_PROMPT, register_policy
from .core import DEFAULT_ANSWER, FrozenFeatures, Sa2VABase, Sa2VAInputs
from .internvl import SAM2_DECODER

__all__ = ["Sa2VAQwenPolicy", "QWEN_VL_LORA_PRESETS"]

_LAYERS = r"model\.model\.model\.language_model\.layers\.\d+"
_ATTN = rf"{_LAYERS}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
_MLP = rf"{_LAYERS}\.mlp\.(gate_proj|up_proj|down_proj)"
#: The same three presets as the InternVL family, on the Qwen-VL text model's layers.
QWEN_VL_LORA_PRESETS = {"llm": _ATTN, "llm+mlp": f"({_ATTN}|{_MLP})", "llm+decoder": f"({_ATTN}|{SAM2_DECODER})"}

#: ``Sa2VAChatModelQwen.__init__``'s pixel bounds, passed to the processor by ``predict_forward``.
MIN_PIXELS, MAX_PIXELS = 512 * 28 * 28, 2048 * 28 * 28


@register_policy("sa2va_qwen")
class Sa2VAQwenPolicy(Sa2VABase):
    """A Qwen-VL based Sa2VA checkpoint and its processor."""

    architectures = ("Sa2VAChatModelQwen",)
    load_options = Sa2VABase.load_options | {"processor", "max_tiles"}
    lora_targets = QWEN_VL_LORA_PRESETS

    def __init__(self, model: torch.nn.Module, processor, source_dir: str | Path | None = None,
                 answer: str = DEFAULT_ANSWER, action_resolution: str = "image"):
        super().__init__(model, source_dir, answer, action_resolution)
        self.processor = processor
        tokenizer = processor.tokenizer
        self.seg_token_id = tokenizer.convert_tokens_to_ids("[SEG]")
        unk = getattr(tokenizer, "unk_token_id", None)
        if self.seg_token_id is None or (unk is not None and self.seg_token_id == unk):
            raise ValueError("the tokenizer lacks Sa2VA's [SEG] token: not a Sa2VA checkpoint")
        model.seg_token_idx = self.seg_token_id
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.min_pixels = int(getattr(model, "min_pixels", MIN_PIXELS))
        self.max_pixels = int(getattr(model, "max_pixels", MAX_PIXELS))

    @classmethod
    def build(cls, model: torch.nn.Module, path: Path, max_tiles: int = 1, processor=None,
              skip_repairs: tuple[str, ...] = (), **options) -> "Sa2VAQwenPolicy":
        """``processor``: the checkpoint's own (``AutoProcessor``) unless one is given (tests on machines without
        torchvision build it from the PIL image processor: transformers' Qwen-VL processors need a video processor,
        which needs torchvision)."""
        from transformers import AutoProcessor

        from . import compat

        if max_tiles != 1:
            raise ValueError("policy.max_tiles applies to the InternVL family; Qwen-VL checkpoints size images "
                             "with their processor's min/max pixels")
        if processor is None:
            with compat.quiet_remote_code():
                processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True)
        return cls(model, processor, source_dir=path, **options)

    def save_text_side(self, path: Path) -> None:
        self.processor.save_pretrained(str(path))

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        return int(text.hidden_size)

    # --- inputs -----------------------------------------------------------------------------------------------
    def _messages(self, image: np.ndarray, prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": prompt}]}]

    def _encode(self, images: Sequence[np.ndarray], prompts: Sequence[str]):
        from qwen_vl_utils import process_vision_info

        texts, vision = [], []
        for image, prompt in zip(images, prompts):
            messages = self._messages(np.asarray(image), prompt.replace("<image>", ""))
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            texts.append(text + self.answer)
            vision.extend(process_vision_info(messages)[0])
        # Right padding keeps every row's positions 0..n-1 (the rollout's and the learner's logits must agree).
        self.processor.tokenizer.padding_side = "right"
        return self.processor(text=texts, images=vision, padding=True, return_tensors="pt",
                              min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def preprocess_vision(self, images: list[np.ndarray]):
        encoded = self._encode(images, [DEFAULT_PROMPT] * len(images))
        return encoded["pixel_values"], [], encoded["image_grid_thw"]

    # --- towers -----------------------------------------------------------------------------------------------
    # The vision tower runs inside the Qwen-VL model's own forward (its outputs are scattered into the token
    # embeddings there, positions computed from the same call): only SAM2's image side is handed over.
    def layer_stacks(self) -> dict[str, torch.nn.ModuleList]:
        vl = self.model.model.model
        return {"llm": vl.language_model.layers, "vision": vl.visual.blocks}

    def llm_module(self) -> torch.nn.Module:
        return self.model.model

    # --- forward ----------------------------------------------------------------------------------------------
    def seg_hidden_states(self, inputs: Sa2VAInputs, prompts: Sequence[str],
                          frozen: FrozenFeatures | None = None) -> torch.Tensor:
        ids, attn = self._prompt_ids(inputs, prompts)
        vl_model = self.model.model.model  # wrapper -> ...ForConditionalGeneration -> the VL model (no LM head)
        extra = {}
        if "mm_token_type_ids" in inspect.signature(vl_model.forward).parameters:
            # transformers 5 computes the 3-D (M-RoPE) positions only when told which tokens are image tokens;
            # without it every token gets a 1-D position and the [SEG] state is not the checkpoint's
            extra["mm_token_type_ids"] = (ids == self.image_token_id).int()
        out = vl_model(input_ids=ids, attention_mask=attn, pixel_values=inputs.vision,
                       image_grid_thw=inputs.grid_thw, use_cache=False, return_dict=True, **extra)
        hidden = out.last_hidden_state
        seg = ids == self.seg_token_id
        if int(seg.sum()) != len(inputs):
            raise ValueError(f"expected one [SEG] per request, found {int(seg.sum())} in {len(inputs)} rows")
        return hidden[seg]

    def _prompt_ids(self, inputs: Sa2VAInputs, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids for these prompts with each image's token count (from its patch grid)."""
        merge = int(getattr(self.processor.image_processor, "merge_size", 2))
        counts = [int(t * h * w) // (merge * merge) for t, h, w in inputs.grid_thw.tolist()]
        pad_token = self.image_token
        texts = []
        for prompt, n in zip(prompts, counts):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            texts.append(text.replace(pad_token, pad_token * n, 1) + self.answer)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right"
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # --- Sa2VA's own inference, for comparison ------------------------------------------------------------------
    @torch.no_grad()
    def predict_forward_masks(self, images: Sequence[np.ndarray], prompt: str = DEFAULT_PROMPT) -> list[np.ndarray]:
        out = []
        for im in images:
            im = np.asarray(im)
            result = self.model.predict_forward(image=Image.fromarray(im), text="<image>" + prompt,
                                                processor=self.processor)
            masks = result.get("prediction_masks") or []
            out.append(np.asarray(masks[0][0], dtype=bool) if masks else np.zeros(im.shape[:2], dtype=bool))
        return out
