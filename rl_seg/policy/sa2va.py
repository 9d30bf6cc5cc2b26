"""Sa2VA as an rl-seg policy: its mask logits, with gradients, from a Hugging Face Sa2VA checkpoint folder.

Why an adapter and not ``predict_forward``: Sa2VA's own inference generates the answer greedily under
``torch.no_grad()`` and returns masks already binarized (``sigmoid() > 0.5`` after a bilinear resize), so it can
neither be sampled from nor differentiated, and a threshold sweep over its output changes nothing (DESIGN.md).
This adapter runs the modules Sa2VA's *training* path runs, in the same order, and stops before the binarization:

    image -> ``vision_model`` -> ``mlp1`` (``model.extract_feature``) -> image embeddings written into the LLM input
    at the ``<IMG_CONTEXT>`` slots -> ``language_model`` over the conversation with the answer "Sure, [SEG]."
    teacher-forced -> last hidden state at ``[SEG]`` -> ``text_hidden_fcs`` -> appended to SAM2's sparse prompt
    tokens -> ``grounding_encoder.sam2_model.sam_mask_decoder`` -> low-resolution mask logits (256 x 256 on Sa2VA).

Teacher forcing is what Sa2VA trains with, and it is the only differentiable route to the [SEG] state: a
generated answer is a discrete, non-differentiable choice, and greedy decoding always makes the same one (the
[SEG] hidden state depends only on the tokens before it, so when the model would answer "Sure, [SEG]." the two
routes give the same state). The action space is the decoder's native grid, as the design asks.

Public Sa2VA facts this relies on (read in Sa2VA's Apache-2.0 code, magic-research/Sa2VA as mirrored by its
public forks and bytedance/Sa2VA: ``projects/llava_sam2/hf/models/modeling_sa2va_chat.py`` and ``sam2.py`` (the
Hugging Face remote code), ``projects/llava_sam2/models/llava_sam2.py`` (training forward),
``projects/sa2va/models/sam2_train.py`` (``inject_language_embd``), and SAM2's ``SAM2Base``; no code copied):

- ``Sa2VAChatModel`` has ``vision_model``, ``mlp1``, ``language_model``, ``grounding_encoder`` (a SAM2 wrapper with
  ``sam2_model`` and ``hidden_dim``), ``text_hidden_fcs``, ``extract_feature(pixel_values)``, ``num_image_token``,
  ``template`` (an xtuner prompt-template dict with ``INSTRUCTION``), and ``img_context_token_id`` /
  ``seg_token_idx``, which stay ``None`` until ``preparing_for_generation`` (the adapter sets them itself).
- The prompt: ``<image>`` in the user text becomes ``<img>`` + ``num_image_token`` x ``<IMG_CONTEXT>`` + ``</img>``,
  formatted with ``template["INSTRUCTION"]`` and encoded with the tokenizer's special tokens (a BOS on InternLM2).
- The training path reads ``hidden_states[-1]`` at positions where ``input_ids == seg_token_idx``, applies
  ``text_hidden_fcs`` and feeds the result to SAM2 as a language embedding: SAM2 pads one empty point (label -1),
  appends the embedding to the sparse prompt tokens, adds ``no_mem_embed`` to the top-level image features, uses
  the two high-resolution levels, asks for multimask output and keeps the mask with the highest predicted IoU.
- SAM2 images are resized to ``image_size`` x ``image_size`` (1024) ignoring aspect ratio and normalized with
  ImageNet mean/std after scaling to [0, 1]; InternVL tiles are 448 px with the same normalization.
- LLM module names: Qwen2 (Sa2VA-1B/4B) ``language_model.model.layers.N.self_attn.{q,k,v,o}_proj``; InternLM2
  (Sa2VA-8B/26B) ``language_model.model.layers.N.attention.{wqkv,wo}``. SAM2's mask decoder and memory attention
  have their own ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (and ``self_attn.q_proj`` in memory attention).

Two deliberate departures from Sa2VA's inference, both documented where they happen: the LLM sees one 448 px
tile per image (Sa2VA's dynamic tiling picks exactly one tile for DRIVE's 565 x 584 and ARCADE's 512 x 512 images,
but more for large or elongated ones, which would give images of one batch different token counts), and the
logits skip SAM2's "no object" override (see :meth:`Sa2VAPolicy.decode_masks`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import DEFAULT_PROMPT, PolicyOutput, SegPolicy, register_policy

__all__ = ["Sa2VAPolicy", "LORA_TARGET_PRESETS", "DEFAULT_ANSWER", "binarize_like_predict_forward",
           "detect_llm_family"]

#: The answer Sa2VA is trained to give to a segmentation request; teacher-forced so that [SEG] is in the input.
DEFAULT_ANSWER = "Sure, [SEG]."
SEG_TOKEN, IMG_CONTEXT, IMG_START, IMG_END = "[SEG]", "<IMG_CONTEXT>", "<img>", "</img>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fallback chat templates (xtuner's formats, which Sa2VA's remote code ships as PROMPT_TEMPLATE), used only when a
# checkpoint's model object has no ``template`` dict.
_TEMPLATES = {
    "qwen_chat": {"INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                  "SUFFIX": "<|im_end|>"},
    "internlm2_chat": {"INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                       "SUFFIX": "<|im_end|>"},
}

# Paths are relative to the policy, whose Sa2VA model is ``self.model``. Full paths, never bare names: SAM2's
# mask decoder and memory attention also have q_proj/k_proj/v_proj (memory attention even ``self_attn.q_proj``),
# so a bare or suffix pattern would put LoRA into the grounding encoder, and on InternLM2 (wqkv/wo) into no
# language-model layer at all.
_QWEN2_LLM = r"model\.language_model\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
_INTERNLM2_LLM = r"model\.language_model\.model\.layers\.\d+\.attention\.(wqkv|wo)"
_SAM2_DECODER = (r"model\.grounding_encoder\.sam2_model\.sam_mask_decoder\.transformer\."
                 r"(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
                 r"|final_attn_token_to_image)\.(q_proj|k_proj|v_proj|out_proj)")

#: LoRA target presets per language-model family: "llm" (the recipe's LLM attention) and "llm+decoder" (plus the
#: attention projections of SAM2's mask decoder, which Sa2VA's own fine-tune recipe trains).
LORA_TARGET_PRESETS: dict[str, dict[str, str]] = {
    "qwen2": {"llm": _QWEN2_LLM, "llm+decoder": f"({_QWEN2_LLM}|{_SAM2_DECODER})"},
    "internlm2": {"llm": _INTERNLM2_LLM, "llm+decoder": f"({_INTERNLM2_LLM}|{_SAM2_DECODER})"},
}

# Architecture names that share a family's module layout (Qwen2/Qwen3/Llama all use self_attn.{q,k,v,o}_proj).
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


def binarize_like_predict_forward(logits: torch.Tensor, image_size: tuple[int, int],
                                  grounding_size: int | None = None) -> torch.Tensor:
    """What Sa2VA's ``predict_forward`` does with these logits: bilinear resize (through the square grounding
    resolution when given, as SAM2 first returns masks at its input size) to the image size, then
    ``sigmoid() > 0.5``. Only for comparisons: every policy here hands out the logits instead."""
    x = logits[:, None].float()
    if grounding_size is not None:
        x = F.interpolate(x, size=(grounding_size, grounding_size), mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)
    return x[:, 0].sigmoid() > 0.5


def _resize_normalize(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Bicubic square resize of uint8 images with PIL (as Sa2VA's preprocessing does), then ImageNet norm."""
    out = []
    for im in images:
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"expected uint8 H x W x 3 images, got shape {im.shape}")
        pil = Image.fromarray(im.astype(np.uint8, copy=False)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0))
    x = torch.stack(out).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return (x - mean) / std


@register_policy("sa2va")
class Sa2VAPolicy(SegPolicy):
    """A loaded Sa2VA checkpoint (``self.model``, remote code) and its tokenizer, behind the ``SegPolicy`` API.

    ``preprocess`` returns one tensor holding both of Sa2VA's inputs per image, packed along the height: rows
    ``[0, S)`` are the SAM2 image (S x S, S = ``grounding_size``) and rows ``[S, S + V)``, columns ``[0, V)``, the
    InternVL tile (V x V, V = ``vision_size``), so that batching, slicing and ``.to(device)`` keep working on
    what the rest of rl-seg treats as an opaque tensor. Resizing each from the original image keeps them what
    Sa2VA itself feeds its two towers.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, source_dir: str | Path | None = None,
                 answer: str = DEFAULT_ANSWER):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.answer = answer
        self.name_or_path = str(source_dir) if source_dir is not None else "sa2va"

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
        #: Per-instance (the preset depends on which LLM the checkpoint has): full-path regexes, see module docs.
        self.lora_targets = dict(LORA_TARGET_PRESETS[self.llm_family])

        sam = model.grounding_encoder.sam2_model
        self.grounding_size = int(sam.image_size)
        # SAM2: image embedding at image_size / backbone_stride, mask decoder upsamples it 4x.
        side = 4 * (self.grounding_size // int(sam.backbone_stride))
        self._low_res = (side, side)
        config = model.config
        self.vision_size = int(getattr(config, "force_image_size", None) or config.vision_config.image_size)
        template = getattr(model, "template", None)
        if not isinstance(template, dict) or "INSTRUCTION" not in template:
            template = _TEMPLATES[str(getattr(config, "template", "qwen_chat")).replace("-", "_")]
        self.template = template
        self._prompt_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # --- what peft needs from a custom model ---------------------------------------------------------------
    def prepare_inputs_for_generation(self, *args, **kwargs):  # pragma: no cover - never generates
        raise NotImplementedError

    # --- loading and saving ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, **kwargs) -> "Sa2VAPolicy":
        """Load a Hugging Face Sa2VA checkpoint folder (remote code included) and its tokenizer."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json, not a Hugging Face Sa2VA checkpoint")
        load_kwargs = dict(kwargs)
        if dtype is not None:
            load_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        model = AutoModel.from_pretrained(str(path), trust_remote_code=True, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
        policy = cls(model, tokenizer, source_dir=path)
        if device is not None:
            policy.to(device)
        return policy.eval()

    def save_pretrained(self, path: str | Path) -> Path:
        """A Sa2VA checkpoint folder again (weights, config, tokenizer, remote code), plus rl-seg's marker, so that
        both ``load_policy`` and ``AutoModel.from_pretrained(..., trust_remote_code=True)`` read it."""
        if any(".lora_A." in n or ".base_layer." in n for n, _ in self.model.named_parameters()):
            raise ValueError("this policy carries LoRA layers: merge them first (rl_seg.policy.lora.merge_adapter) "
                             "or save the adapter alone (PeftModel.save_pretrained)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
        if self.source_dir is not None and self.source_dir.resolve() != path.resolve():
            for src in self.source_dir.glob("*.py"):
                shutil.copy2(src, path / src.name)  # the remote code travels with the weights
        config_file = path / "config.json"
        config = json.loads(config_file.read_text())
        auto_map = getattr(self.model.config, "auto_map", None)
        if auto_map and "auto_map" not in config:
            config["auto_map"] = dict(auto_map)
            config_file.write_text(json.dumps(config, indent=2) + "\n")
        (path / "rl_seg_policy.json").write_text(json.dumps({"policy": self.name}) + "\n")
        return path

    # --- sizes --------------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.llm_config.hidden_size)

    @property
    def num_image_tokens(self) -> int:
        return int(self.model.num_image_token)

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The mask decoder's native grid whatever the image size (SAM2 squashes every image to a square)."""
        return self._low_res

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- inputs -------------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Both towers' inputs, packed (see the class docstring). The InternVL side is a single square tile, not
        Sa2VA's dynamic tiling: the same input for DRIVE- and ARCADE-sized images, and a fixed token count per
        image, which batching needs; large or elongated images get a coarser view than Sa2VA would give them."""
        s, v = self.grounding_size, self.vision_size
        grounding = _resize_normalize(images, s)
        vision = _resize_normalize(images, v)
        packed = grounding.new_zeros(len(images), 3, s + v, max(s, v))
        packed[:, :, :s, :s] = grounding
        packed[:, :, s:, :v] = vision
        return packed.to(device=self.device, dtype=self.dtype)

    def unpack(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(SAM2 images B x 3 x S x S, InternVL tiles B x 3 x V x V) from a ``preprocess`` tensor."""
        s, v = self.grounding_size, self.vision_size
        if pixel_values.ndim != 4 or pixel_values.shape[-2:] != (s + v, max(s, v)):
            raise ValueError(f"expected a tensor from Sa2VAPolicy.preprocess (B x 3 x {s + v} x {max(s, v)}), "
                             f"got {tuple(pixel_values.shape)}")
        return pixel_values[:, :, :s, :s], pixel_values[:, :, s:, :v]

    def prompt_text(self, prompt: str = DEFAULT_PROMPT) -> str:
        """The teacher-forced conversation for one request, exactly as Sa2VA formats it (user turn with the image
        placeholder expanded, then the answer holding [SEG] and the turn's end)."""
        image = IMG_START + IMG_CONTEXT * self.num_image_tokens + IMG_END
        user = ("<image>\n" + prompt).replace("<image>", image)
        return (self.template["INSTRUCTION"].format(input=user, round=1, bot_name="BOT") + self.answer
                + self.template.get("SUFFIX", ""))

    def prompt_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, right-padded: positions stay 0..n-1 for every row, so an image's logits
        do not depend on the longest prompt in its batch (PPO compares rollout and learner log-probs)."""
        key = tuple(prompts)
        if key not in self._prompt_cache:
            rows = [self.tokenizer(self.prompt_text(p))["input_ids"] for p in prompts]
            for p, row in zip(prompts, rows):
                n_seg = sum(t == self.seg_token_id for t in row)
                n_img = sum(t == self.img_context_token_id for t in row)
                if n_seg != 1 or n_img != self.num_image_tokens:
                    raise ValueError(f"prompt {p!r} gives {n_seg} [SEG] and {n_img} image-context tokens "
                                     f"(need 1 and {self.num_image_tokens}); it must not contain them itself")
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

    def seg_hidden_states(self, vision_pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The LLM's last hidden state at [SEG], B x D, for InternVL tiles and requests."""
        ids, attn = self.prompt_ids(prompts)
        image_tokens = self.model.extract_feature(vision_pixels)  # B x num_image_token x D
        embeds = self.model.language_model.get_input_embeddings()(ids)
        slots = ids == self.img_context_token_id
        embeds = embeds.masked_scatter(slots[..., None], image_tokens.to(embeds.dtype))
        hidden = self._last_hidden(embeds, attn)
        return hidden[ids == self.seg_token_id]  # exactly one [SEG] per row, so B x D in row order

    def decode_masks(self, grounding_pixels: torch.Tensor, language_embd: torch.Tensor) -> torch.Tensor:
        """SAM2's heads prompted by ``language_embd`` (B x N x C), low-resolution logits B x h x w (float32).

        The same steps as Sa2VA's ``inject_language_embd`` -> ``_forward_sam_heads``, minus one: when the decoder's
        object score is not positive, SAM2 overwrites *every* logit with -1024. For a Bernoulli policy that is a
        deterministic all-background action with zero gradient, and a jump of ~1000 nats in log-probability when
        the score changes sign between rollout and update; so the raw decoder logits are returned.
        """
        low_precision = self.dtype in (torch.bfloat16, torch.float16)
        # SAM2 mixes float32 (point coordinates, positional encodings) with the weights' dtype and relies on the
        # autocast region Sa2VA always runs it in; an enclosing autocast (evaluation on CUDA) is left alone.
        region = torch.autocast(device_type=grounding_pixels.device.type, dtype=self.dtype) if low_precision \
            else contextlib.nullcontext()
        with region:
            return self._sam_heads(grounding_pixels, language_embd)

    def _sam_heads(self, grounding_pixels: torch.Tensor, language_embd: torch.Tensor) -> torch.Tensor:
        sam = self.model.grounding_encoder.sam2_model
        feats = sam.forward_image(grounding_pixels)
        _, vision_feats, _, feat_sizes = sam._prepare_backbone_features(feats)
        b, c = grounding_pixels.shape[0], int(sam.hidden_dim)
        h, w = feat_sizes[-1]
        pix = (vision_feats[-1] + sam.no_mem_embed).permute(1, 2, 0).reshape(b, c, h, w)
        high_res = [x.permute(1, 2, 0).reshape(b, x.size(2), *s) for x, s in zip(vision_feats[:-1], feat_sizes[:-1])]
        coords = torch.zeros(b, 1, 2, device=pix.device)
        labels = -torch.ones(b, 1, dtype=torch.int32, device=pix.device)
        sparse, dense = sam.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        sparse = torch.cat([sparse.to(language_embd.dtype), language_embd], dim=1)
        multimask = sam._use_multimask(is_init_cond_frame=True, point_inputs=None) \
            if hasattr(sam, "_use_multimask") else True
        low, ious, _, _ = sam.sam_mask_decoder(
            image_embeddings=pix, image_pe=sam.sam_prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(pix.dtype), multimask_output=multimask, repeat_image=False,
            high_res_features=high_res)
        if low.shape[1] > 1:  # multimask: the mask with the highest predicted IoU, as SAM2 picks it
            low = low[torch.arange(b, device=low.device), ious.argmax(dim=-1)]
        else:
            low = low[:, 0]
        return low.float()

    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str] | None = None) -> PolicyOutput:
        grounding, vision = self.unpack(pixel_values)
        b = grounding.shape[0]
        prompts = list(prompts) if prompts is not None else [DEFAULT_PROMPT] * b
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for {b} images")
        seg_hidden = self.seg_hidden_states(vision, prompts)
        language_embd = self.model.text_hidden_fcs(seg_hidden)[:, None]
        logits = self.decode_masks(grounding, language_embd)
        return PolicyOutput(logits=logits, seg_hidden=seg_hidden)

    # --- Sa2VA's own inference, for comparison ------------------------------------------------------------------
    @torch.no_grad()
    def predict_forward_masks(self, images: Sequence[np.ndarray], prompt: str = DEFAULT_PROMPT) -> list[np.ndarray]:
        """Masks from the checkpoint's own ``predict_forward`` (greedy answer, binarized: what the original
        threshold sweep saw), one bool H x W array per image; all False when the model answers without [SEG].

        ``preparing_for_generation`` is called with the policy's current dtype: Sa2VA's default casts the whole
        model to bfloat16 as a side effect. (The released remote code also hard-codes ``.cuda()`` here.)
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
