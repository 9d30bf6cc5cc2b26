"""The InternVL-based Sa2VA releases (``Sa2VAChatModel``): InternViT tiles + a Qwen2 / Qwen2.5 / Qwen3 or InternLM2
language model + SAM2. Sa2VA-1B/4B (Qwen2.5), the InternVL3-based 2B/8B/14B (Qwen2.5) and Sa2VA-8B/26B (InternLM2.5).

The [SEG] state: image -> ``vision_model`` -> ``mlp1`` (``model.extract_feature``: ``num_image_token`` embeddings per
448 px tile) written into the LLM input at the ``<IMG_CONTEXT>`` slots -> ``language_model`` over the conversation with
the answer teacher-forced -> last hidden state at ``[SEG]``.

Tiles (``max_tiles``): ``predict_forward`` cuts an image into up to 12 tiles of 448 px on the grid whose aspect ratio is
closest to the image's, plus a 448 px thumbnail of the whole image when there is more than one tile. DRIVE (565 x 584)
and ARCADE (512 x 512) images get one tile under that rule. ``max_tiles=1`` (the default) always gives one squashed
tile: the same as ``predict_forward`` for such images, a coarser view than Sa2VA's for large or elongated ones, and the
cheapest (256 image tokens per image); ``max_tiles=12`` is ``predict_forward``'s rule exactly. Images of one batch may
have different tile counts: their prompts differ in length and are right-padded.

Public facts used (``projects/sa2va/hf/models/modeling_sa2va_chat.py``): ``img_context_token_id`` and
``seg_token_idx`` stay ``None`` until ``preparing_for_generation`` (set here from the tokenizer); the prompt is
``template["INSTRUCTION"]`` around ``<img>`` + N x ``<IMG_CONTEXT>`` + ``</img>\\n`` + the request, encoded with the
tokenizer's special tokens (a BOS on InternLM2); ``preparing_for_generation`` hard-codes 448 px tiles of patch 14
and the tiling rule above.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..base import DEFAULT_PROMPT, register_policy
from .core import DEFAULT_ANSWER, FrozenFeatures, Sa2VABase, Sa2VAInputs, resize_normalize

__all__ = ["Sa2VAPolicy", "LORA_TARGET_PRESETS", "detect_llm_family", "tile_grid", "split_into_tiles"]

SEG_TOKEN, IMG_CONTEXT, IMG_START, IMG_END = "[SEG]", "<IMG_CONTEXT>", "<img>", "</img>"

# Fallback chat templates (xtuner's formats, which Sa2VA's remote code ships as PROMPT_TEMPLATE), used only when a
# checkpoint's model object has no ``template`` dict.
_TEMPLATES = {
    "qwen_chat": {"INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                  "SUFFIX": "<|im_end|>"},
    "internlm2_chat": {"INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                       "SUFFIX": "<|im_end|>"},
}

# Paths are relative to the policy, whose Sa2VA model is ``self.model``. Full paths, never bare names: SAM2's mask
# decoder and memory attention also have q_proj/k_proj/v_proj (memory attention even ``self_attn.q_proj``), so a
# bare or suffix pattern would put LoRA into the grounding encoder, and on InternLM2 (wqkv/wo) into no LLM layer.
_LAYERS = r"model\.language_model\.model\.layers\.\d+"
_QWEN2_ATTN = rf"{_LAYERS}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
_QWEN2_MLP = rf"{_LAYERS}\.mlp\.(gate_proj|up_proj|down_proj)"
_INTERNLM2_ATTN = rf"{_LAYERS}\.attention\.(wqkv|wo)"
_INTERNLM2_MLP = rf"{_LAYERS}\.feed_forward\.(w1|w2|w3)"
SAM2_DECODER = (r"model\.grounding_encoder\.sam2_model\.sam_mask_decoder\.transformer\."
                r"(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
                r"|final_attn_token_to_image)\.(q_proj|k_proj|v_proj|out_proj)")


def _any(*patterns: str) -> str:
    return "(" + "|".join(patterns) + ")"


def lora_presets(attention: str, mlp: str) -> dict[str, str]:
    """'llm': the language model's attention; 'llm+mlp': attention and MLP (what upstream's ``wrap_llm_lora``
    targets); 'llm+decoder': attention plus SAM2 mask-decoder attention (Sa2VA's recipe trains that decoder)."""
    return {"llm": attention, "llm+mlp": _any(attention, mlp), "llm+decoder": _any(attention, SAM2_DECODER)}


#: LoRA target presets per language-model family (module layouts: Qwen2/Qwen2.5/Qwen3/Llama share one).
LORA_TARGET_PRESETS: dict[str, dict[str, str]] = {
    "qwen2": lora_presets(_QWEN2_ATTN, _QWEN2_MLP),
    "internlm2": lora_presets(_INTERNLM2_ATTN, _INTERNLM2_MLP),
}

# Architecture names that share a family's module layout.
_ARCH_FAMILY = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen2", "LlamaForCausalLM": "qwen2",
                "InternLM2ForCausalLM": "internlm2"}


def detect_llm_family(model: torch.nn.Module) -> str:
    """``"qwen2"`` or ``"internlm2"``, from the module names actually present (the architecture name only breaks
    ties), so that a preset can never silently match nothing."""
    names = ["model." + n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    found = {family for family, presets in LORA_TARGET_PRESETS.items()
             if any(re.fullmatch(presets["llm"], n) for n in names)}
    arch = None
    llm_config = getattr(getattr(model, "config", None), "llm_config", None)
    if llm_config is not None and getattr(llm_config, "architectures", None):
        arch = llm_config.architectures[0]
    if len(found) == 1:
        return found.pop()
    if arch in _ARCH_FAMILY and _ARCH_FAMILY[arch] in found:
        return _ARCH_FAMILY[arch]
    raise ValueError(f"cannot tell the language model's layout (architecture {arch!r}): no module matches "
                     f"{sorted(LORA_TARGET_PRESETS)}'s attention patterns")


# --- tiles ------------------------------------------------------------------------------------------------------
def tile_grid(width: int, height: int, max_tiles: int, tile: int, min_tiles: int = 1) -> tuple[int, int]:
    """(columns, rows) of InternVL's dynamic tiling: of the grids with ``min_tiles``..``max_tiles`` tiles, the one
    whose aspect ratio is closest to the image's; on a tie the larger grid, if the image has more than half its
    pixels. Candidates are visited in order of tile count, as ``predict_forward`` visits them."""
    candidates = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                         for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}, key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def split_into_tiles(image: np.ndarray, max_tiles: int, tile: int, thumbnail: bool = True) -> list[np.ndarray]:
    """The image as ``predict_forward`` shows it to the vision tower: resized (bicubic) onto the chosen grid and cut
    into tiles row by row, plus a thumbnail of the whole image when there is more than one tile."""
    pil = Image.fromarray(np.asarray(image))
    if max_tiles <= 1:
        return [np.asarray(pil.resize((tile, tile), Image.BICUBIC))]
    cols, rows = tile_grid(pil.width, pil.height, max_tiles, tile)
    grid = pil.resize((tile * cols, tile * rows), Image.BICUBIC)
    tiles = [np.asarray(grid.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
             for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(np.asarray(pil.resize((tile, tile), Image.BICUBIC)))
    return tiles


@register_policy("sa2va")
class Sa2VAPolicy(Sa2VABase):
    """An InternVL-based Sa2VA checkpoint and its tokenizer."""

    architectures = ("Sa2VAChatModel",)
    load_options = Sa2VABase.load_options | {"max_tiles"}

    def __init__(self, model: torch.nn.Module, tokenizer, source_dir: str | Path | None = None,
                 answer: str = DEFAULT_ANSWER, action_resolution: str = "image", max_tiles: int = 1):
        super().__init__(model, source_dir, answer, action_resolution)
        if not isinstance(max_tiles, int) or not 1 <= max_tiles <= 40:
            raise ValueError(f"policy.max_tiles must be an integer in 1..40, got {max_tiles!r}")
        self.tokenizer = tokenizer
        self.max_tiles = max_tiles
        ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (SEG_TOKEN, IMG_CONTEXT, IMG_START, IMG_END)}
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in ids.items() if i is None or (unk is not None and i == unk)]
        if missing:
            raise ValueError(f"the tokenizer lacks Sa2VA's special tokens {missing}: not a Sa2VA checkpoint")
        self.seg_token_id, self.img_context_token_id = ids[SEG_TOKEN], ids[IMG_CONTEXT]
        # Sa2VA leaves these None until preparing_for_generation; its training path needs them set.
        model.img_context_token_id = self.img_context_token_id
        model.seg_token_idx = self.seg_token_id

        self.llm_family = detect_llm_family(model)
        #: Per instance: the presets depend on which language model the checkpoint has.
        self.lora_targets = dict(LORA_TARGET_PRESETS[self.llm_family])

        config = model.config
        self.vision_size = int(getattr(config, "force_image_size", None) or config.vision_config.image_size)
        template = getattr(model, "template", None)
        if not isinstance(template, dict) or "INSTRUCTION" not in template:
            template = _TEMPLATES[str(getattr(config, "template", "qwen_chat")).replace("-", "_")]
        self.template = template
        self._prompt_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def build(cls, model: torch.nn.Module, path: Path, max_tiles: int = 1, skip_repairs: tuple[str, ...] = (),
              **options) -> "Sa2VAPolicy":
        from . import compat

        tokenizer = compat.load_tokenizer(path, skip=tuple(skip_repairs))
        return cls(model, tokenizer, source_dir=path, max_tiles=max_tiles, **options)

    def save_text_side(self, path: Path) -> None:
        self.tokenizer.save_pretrained(str(path))

    # --- sizes --------------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.llm_config.hidden_size)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per tile."""
        return int(self.model.num_image_token)

    # --- towers -------------------------------------------------------------------------------------------------
    def tower_modules(self) -> dict[str, list[torch.nn.Module]]:
        """SAM2's image side and the vision side: InternViT and ``mlp1`` (together ``extract_feature``)."""
        return {"vision": [self.model.vision_model, self.model.mlp1], **super().tower_modules()}

    def encode_vision(self, inputs: Sa2VAInputs) -> torch.Tensor:
        return self.model.extract_feature(inputs.vision)

    def layer_stacks(self) -> dict[str, torch.nn.ModuleList]:
        return {"llm": self.model.language_model.model.layers, "vision": self.model.vision_model.encoder.layers}

    def llm_module(self) -> torch.nn.Module:
        return self.model.language_model

    # --- inputs -------------------------------------------------------------------------------------------------
    def preprocess_vision(self, images: list[np.ndarray]):
        per_image = [split_into_tiles(im, self.max_tiles, self.vision_size) for im in images]
        tiles = [t for image_tiles in per_image for t in image_tiles]
        return resize_normalize(tiles, self.vision_size), [len(t) for t in per_image], None

    def prompt_text(self, prompt: str = DEFAULT_PROMPT, tiles: int = 1) -> str:
        """The teacher-forced conversation for one request, as Sa2VA formats it (user turn with the image
        placeholder expanded, then the answer holding [SEG] and the turn's end)."""
        image = IMG_START + IMG_CONTEXT * (self.num_image_tokens * tiles) + IMG_END
        user = ("<image>\n" + prompt).replace("<image>", image)
        return (self.template["INSTRUCTION"].format(input=user, round=1, bot_name="BOT") + self.answer
                + self.template.get("SUFFIX", ""))

    def prompt_ids(self, prompts: Sequence[str], tiles: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, right-padded: positions stay 0..n-1 for every row, so an image's logits do
        not depend on the longest prompt in its batch (PPO compares rollout and learner log-probs)."""
        tiles = list(tiles) if tiles is not None else [1] * len(prompts)
        key = tuple(zip(prompts, tiles))
        if key not in self._prompt_cache:
            rows = [self.tokenizer(self.prompt_text(p, t))["input_ids"] for p, t in key]
            for (p, t), row in zip(key, rows):
                n_seg = sum(x == self.seg_token_id for x in row)
                n_img = sum(x == self.img_context_token_id for x in row)
                if n_seg != 1 or n_img != self.num_image_tokens * t:
                    raise ValueError(f"prompt {p!r} gives {n_seg} [SEG] and {n_img} image-context tokens (need 1 "
                                     f"and {self.num_image_tokens * t}); it must not contain them itself")
            pad = self.tokenizer.pad_token_id
            pad = pad if pad is not None else 0
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
                attn[i, :len(row)] = 1
            if len(self._prompt_cache) > 64:
                self._prompt_cache.clear()
            self._prompt_cache[key] = (ids, attn)
        ids, attn = self._prompt_cache[key]
        return ids.to(self.device), attn.to(self.device)

    # --- forward ------------------------------------------------------------------------------------------------
    def _last_hidden(self, embeds: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``hidden_states[-1]`` of the causal LM (the final-normed decoder output), via the decoder stack when it
        is reachable, so that no vocabulary-sized logits are computed at every position."""
        lm = self.model.language_model
        decoder = getattr(lm, "model", None)
        if isinstance(decoder, torch.nn.Module):
            out = decoder(inputs_embeds=embeds, attention_mask=attn, use_cache=False, return_dict=True)
            return out.last_hidden_state
        out = lm(inputs_embeds=embeds, attention_mask=attn, output_hidden_states=True, use_cache=False,
                 return_dict=True)
        return out.hidden_states[-1]

    def seg_hidden_states(self, inputs: Sa2VAInputs, prompts: Sequence[str],
                          frozen: FrozenFeatures | None = None) -> torch.Tensor:
        ids, attn = self.prompt_ids(prompts, inputs.tiles or None)
        # tiles x num_image_token x D, image by image
        image_tokens = frozen.image_tokens if frozen is not None and frozen.image_tokens is not None \
            else self.encode_vision(inputs)
        embeds = self.model.language_model.get_input_embeddings()(ids)
        slots = ids == self.img_context_token_id
        embeds = embeds.masked_scatter(slots[..., None], image_tokens.to(embeds.dtype))
        hidden = self._last_hidden(embeds, attn)
        return hidden[ids == self.seg_token_id]  # exactly one [SEG] per row, so B x D in row order

    # --- Sa2VA's own inference, for comparison ------------------------------------------------------------------
    @torch.no_grad()
    def predict_forward_masks(self, images: Sequence[np.ndarray], prompt: str = DEFAULT_PROMPT) -> list[np.ndarray]:
        """Masks from the checkpoint's own ``predict_forward`` (greedy answer, binarized: what the original threshold
        sweep saw), one bool H x W array per image; all False when the model answers without [SEG].

        ``preparing_for_generation`` is called with the policy's dtype (its default is bfloat16). The released
        remote code moves inputs with ``.cuda()``: on a machine without CUDA this raises.
        """
        model = self.model
        if not getattr(model, "init_prediction_config", False):
            model.preparing_for_generation(tokenizer=self.tokenizer, torch_dtype=self.dtype)
        out = []
        for im in images:
            im = np.asarray(im)
            result = model.predict_forward(image=Image.fromarray(im.astype(np.uint8)), text="<image>\n" + prompt,
                                           tokenizer=self.tokenizer)
            masks = result.get("prediction_masks") or []
            out.append(np.asarray(masks[0][0], dtype=bool) if masks else np.zeros(im.shape[:2], dtype=bool))
        return out
