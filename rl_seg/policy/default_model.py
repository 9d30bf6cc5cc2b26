"""The embedded default policy: a small vision-language segmentation model of Sa2VA's shape.

Sa2VA's pipeline, scaled down so that every quickstart and test runs on a CPU:

    image -> image encoder -> pooled image tokens -> ``mlp1`` -> spliced into a causal language model's input at
    <IMG_CONTEXT> positions -> hidden state at the [SEG] token of the answer "Sure, [SEG]." -> ``text_hidden_fcs``
    (Linear-ReLU-Linear) -> prompt embedding of a mask decoder that attends to the image features -> logits.

Two deliberate differences from Sa2VA, both for thin vessels: the image encoder keeps features at full
resolution (U-Net skips) and the mask decoder outputs logits at the input resolution instead of a 256x256 grid
(DESIGN.md: 1-2 px vessels are below one of Sa2VA's logit pixels). The language model is a real transformers
``Qwen2ForCausalLM`` (small config, random init), so LoRA targets the same module paths as on Sa2VA-1B/4B:
``language_model.model.layers.N.self_attn.{q,k,v,o}_proj``. GroupNorm rather than BatchNorm everywhere: a
sample's logits must not depend on what else is in its batch, or PPO's ratios would drift between rollout and
learner.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from .base import DEFAULT_PROMPT, PolicyOutput, SegPolicy, register_policy
from .tokenizer import IMG_CONTEXT, build_tokenizer, conversation

__all__ = ["DefaultModelConfig", "DefaultSegModel", "DEFAULT_CHECKPOINT"]

#: The shipped checkpoint (trained by ``rl-seg sft``; its model card is the README.md beside the weights).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "default_model"


@dataclass
class DefaultModelConfig:
    enc_channels: tuple[int, ...] = field(default=(32, 64, 128, 256), metadata={
        "help": "encoder widths at full, 1/2, 1/4 and 1/8 resolution"})
    image_grid: int = field(default=8, metadata={"help": "image tokens for the language model: grid x grid"})
    llm_hidden: int = field(default=128, metadata={"help": "language model width"})
    llm_layers: int = field(default=2, metadata={"help": "language model decoder layers"})
    llm_heads: int = field(default=4, metadata={"help": "attention heads"})
    llm_kv_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention, as Qwen2)"})
    llm_intermediate: int = field(default=256, metadata={"help": "MLP width of the language model"})
    decoder_dim: int = field(default=128, metadata={"help": "mask decoder token width (the prompt embedding)"})
    decoder_layers: int = field(default=2, metadata={"help": "two-way attention blocks in the mask decoder"})
    decoder_heads: int = field(default=4, metadata={"help": "mask decoder attention heads"})
    pixel_dim: int = field(default=16, metadata={"help": "per-pixel embedding width at full resolution"})

    @classmethod
    def tiny(cls) -> "DefaultModelConfig":
        """For tests: the same architecture, a fraction of the width."""
        return cls(enc_channels=(8, 16, 24, 32), image_grid=4, llm_hidden=32, llm_layers=1, llm_heads=2,
                   llm_kv_heads=1, llm_intermediate=64, decoder_dim=32, decoder_layers=1, decoder_heads=2,
                   pixel_dim=8)

    @classmethod
    def from_dict(cls, d: dict) -> "DefaultModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown default-model config field(s) {sorted(unknown)}")
        d = dict(d)
        if "enc_channels" in d:
            d["enc_channels"] = tuple(d["enc_channels"])
        return cls(**d)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.GELU(),
        )


class ImageEncoder(nn.Module):
    """A plain convolutional pyramid: features at 1, 1/2, 1/4, 1/8 of the input (thin vessels survive level 0)."""

    def __init__(self, channels: Sequence[int], in_channels: int = 3):
        super().__init__()
        stages, cin = [], in_channels
        for i, c in enumerate(channels):
            stages.append(ConvBlock(cin, c, stride=1 if i == 0 else 2))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def sine_positions(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """Fixed 2-D sinusoidal positions (h*w x dim), so the decoder works at any image size."""
    quarter = dim // 4
    freq = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(1e4) / quarter))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq
    pe = torch.cat([
        torch.sin(ys)[:, None, :].expand(h, w, quarter), torch.cos(ys)[:, None, :].expand(h, w, quarter),
        torch.sin(xs)[None, :, :].expand(h, w, quarter), torch.cos(xs)[None, :, :].expand(h, w, quarter),
    ], dim=-1)
    pe = F.pad(pe, (0, dim - 4 * quarter))
    return pe.reshape(h * w, dim).to(dtype)


class TwoWayBlock(nn.Module):
    """SAM's decoder block: tokens attend to themselves and to the image, then the image attends to the tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_token_to_image = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_image_to_token = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens, image, pos):
        q = self.norms[0](tokens)
        tokens = tokens + self.self_attn(q, q, q, need_weights=False)[0]
        q = self.norms[1](tokens)
        tokens = tokens + self.cross_token_to_image(q, image + pos, image, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norms[2](tokens))
        k = self.norms[3](tokens)
        image = image + self.cross_image_to_token(image + pos, k, k, need_weights=False)[0]
        return tokens, image


class MaskDecoder(nn.Module):
    """Prompted by the [SEG] embedding: two-way attention at 1/8, then a U-Net upsampling path back to full
    resolution, FiLM-modulated by the prompt at every scale; the mask token (after attention) sets, through a
    small hypernetwork, the weights that turn per-pixel embeddings into logits (as SAM's output tokens do)."""

    def __init__(self, enc_channels: Sequence[int], dim: int, layers: int, heads: int, pixel_dim: int):
        super().__init__()
        self.input_proj = nn.Conv2d(enc_channels[-1], dim, 1)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(TwoWayBlock(dim, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        widths = [pixel_dim if i == 0 else c // 2 for i, c in enumerate(enc_channels[:-1])]
        ups, films, cin = [], [], dim
        for level in reversed(range(len(enc_channels) - 1)):
            ups.append(ConvBlock(cin + enc_channels[level], widths[level]))
            films.append(nn.Linear(dim, 2 * widths[level]))
            cin = widths[level]
        self.ups, self.films = nn.ModuleList(ups), nn.ModuleList(films)
        for film in self.films:  # start as identity modulation
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        self.hyper = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, pixel_dim))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, feats: list[torch.Tensor], prompt: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(feats[-1])
        b, c, h, w = x.shape
        image = x.flatten(2).transpose(1, 2)
        pos = sine_positions(h, w, c, x.device, x.dtype)[None]
        tokens = torch.cat([self.mask_token.expand(b, -1, -1), prompt[:, None, :]], dim=1)
        for block in self.blocks:
            tokens, image = block(tokens, image, pos)
        tokens = self.final_norm(tokens)
        x = image.transpose(1, 2).reshape(b, c, h, w)
        cond = tokens[:, 1]
        for up, film, skip in zip(self.ups, self.films, reversed(feats[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
            gamma, beta = film(cond).chunk(2, dim=-1)
            x = x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        weights = self.hyper(tokens[:, 0])
        return torch.einsum("bchw,bc->bhw", x, weights) + self.bias


def _any_of(*patterns: str) -> str:
    return "(" + "|".join(patterns) + ")"


# LoRA target fragments of the default model (full module paths; each preset below is a union of them).
_LLM_ATTENTION = r"language_model\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
_DECODER_READOUT = (r"grounding_decoder\.blocks\.\d+\.mlp\.(0|2)", r"grounding_decoder\.hyper\.(0|2)")
_DECODER_PIXELS = (r"grounding_decoder\.films\.\d+", r"grounding_decoder\.ups\.\d+\.(0|3)")
_ENCODER_AND_PROJECTIONS = (r"vision_model\.stages\.\d+\.(0|3)", r"mlp1\.(1|3)", r"text_hidden_fcs\.(0|2)",
                            r"grounding_decoder\.input_proj")


@register_policy("default")
class DefaultSegModel(SegPolicy):
    # Measured (BENCHMARKS.md, issue 4, third attempt): PPO moves this model off its threshold curve only when the
    # adapter reaches the per-pixel features.
    default_lora_preset = "all"
    lora_targets = {
        "llm": _LLM_ATTENTION,
        "llm+decoder": _any_of(_LLM_ATTENTION, *_DECODER_READOUT),
        # 'llm+decoder' can only re-weight the decoder's per-pixel features (per image, through the prompt's FiLM
        # and the hypernetwork's read-out); this also adapts the convolutions of the upsampling path that compute
        # them at 1/4 .. full resolution, where thin vessels are told from background (Sa2VA's own recipe trains
        # SAM2's mask decoder for the same reason).
        "llm+decoder+pixels": _any_of(_LLM_ATTENTION, *_DECODER_READOUT, *_DECODER_PIXELS),
        # Every layer a LoRA update reaches: also the image encoder's convolutions (the full-resolution skip
        # features), its projection into the language model and the [SEG] projection. Not the decoder's attention
        # out_proj layers: nn.MultiheadAttention reads their weight directly, so a LoRA there would do nothing.
        "all": _any_of(_LLM_ATTENTION, *_DECODER_READOUT, *_DECODER_PIXELS, *_ENCODER_AND_PROJECTIONS),
    }

    def __init__(self, config: DefaultModelConfig | None = None):
        super().__init__()
        self.config = config or DefaultModelConfig()
        c = self.config
        self.tokenizer = build_tokenizer()
        self.seg_token_id = self.tokenizer.convert_tokens_to_ids("[SEG]")
        self.img_context_token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.vision_model = ImageEncoder(c.enc_channels)
        self.mlp1 = nn.Sequential(nn.LayerNorm(c.enc_channels[-1]), nn.Linear(c.enc_channels[-1], c.llm_hidden),
                                  nn.GELU(), nn.Linear(c.llm_hidden, c.llm_hidden))
        llm_config = Qwen2Config(
            vocab_size=len(self.tokenizer), hidden_size=c.llm_hidden, intermediate_size=c.llm_intermediate,
            num_hidden_layers=c.llm_layers, num_attention_heads=c.llm_heads, num_key_value_heads=c.llm_kv_heads,
            max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=self.tokenizer.pad_token_id,
        )
        llm_config._attn_implementation = "sdpa"
        self.language_model = Qwen2ForCausalLM(llm_config)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(c.llm_hidden, c.llm_hidden), nn.ReLU(),
                                             nn.Linear(c.llm_hidden, c.decoder_dim))
        self.grounding_decoder = MaskDecoder(c.enc_channels, c.decoder_dim, c.decoder_layers, c.decoder_heads,
                                             c.pixel_dim)
        self._prompt_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # --- what peft needs from a custom model ---------------------------------------------------------------
    def prepare_inputs_for_generation(self, *args, **kwargs):  # pragma: no cover - never generates
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return self.config.llm_hidden

    @property
    def num_image_tokens(self) -> int:
        return self.config.image_grid ** 2

    # --- inputs ---------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Per-image, per-channel standardization: fundus photographs and X-ray angiograms differ wildly in
        brightness, and the model should not have to learn that."""
        batch = torch.from_numpy(np.stack([np.asarray(im) for im in images])).to(self.device)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected uint8 H x W x 3 images, got a batch of shape {tuple(batch.shape)}")
        return standardize(batch.permute(0, 3, 1, 2).float())

    def prompt_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of the teacher-forced conversation, left-padded (cached per prompt set)."""
        key = tuple(prompts)
        if key not in self._prompt_cache:
            texts = [conversation(p, self.num_image_tokens) for p in prompts]
            enc = self.tokenizer(texts, padding=True, return_tensors="pt")
            ids, attn = enc["input_ids"], enc["attention_mask"]
            if not ((ids == self.seg_token_id).sum(1) == 1).all():
                raise ValueError("every conversation must contain exactly one [SEG] token")
            self._prompt_cache[key] = (ids, attn)
        ids, attn = self._prompt_cache[key]
        return ids.to(self.device), attn.to(self.device)

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str] | None = None) -> PolicyOutput:
        b, _, h, w = pixel_values.shape
        prompts = list(prompts) if prompts is not None else [DEFAULT_PROMPT] * b
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for {b} images")
        pad_h, pad_w = (-h) % 8, (-w) % 8
        x = F.pad(pixel_values, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else pixel_values
        feats = self.vision_model(x)
        grid = self.config.image_grid
        image_tokens = self.mlp1(F.adaptive_avg_pool2d(feats[-1], grid).flatten(2).transpose(1, 2))

        ids, attn = self.prompt_ids(prompts)
        embeds = self.language_model.get_input_embeddings()(ids)
        image_slots = ids == self.img_context_token_id
        embeds = embeds.masked_scatter(image_slots[..., None], image_tokens.to(embeds.dtype))
        hidden = self.language_model.model(inputs_embeds=embeds, attention_mask=attn).last_hidden_state
        seg_hidden = hidden[ids == self.seg_token_id]  # one [SEG] per row, so B x D in row order

        prompt = self.text_hidden_fcs(seg_hidden)
        logits = self.grounding_decoder(feats, prompt)[:, :h, :w]
        return PolicyOutput(logits=logits, seg_hidden=seg_hidden)

    # --- persistence ----------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        (path / "rl_seg_policy.json").write_text(json.dumps({"policy": self.name}) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        state.pop("language_model.lm_head.weight", None)  # tied to the input embeddings
        save_file(state, str(path / "model.safetensors"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        trust_remote_code: bool = False) -> "DefaultSegModel":
        # trust_remote_code is accepted for a uniform load_policy call: this checkpoint runs only rl-seg's own code.
        path = Path(path).resolve()
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: missing from the default-model checkpoint")
        try:
            config = DefaultModelConfig.from_dict(json.loads((path / "config.json").read_text()))
        except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path / 'config.json'}: not a valid default-model config: {exc}") from exc
        try:
            state = load_file(str(path / "model.safetensors"))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"{path / 'model.safetensors'}: cannot be read as safetensors: {exc}") from exc
        model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch
            raise ValueError(f"{path / 'model.safetensors'}: weights do not fit {path / 'config.json'}: "
                             f"{str(exc).splitlines()[0]}") from exc
        missing = [k for k in missing if k != "language_model.lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path / 'model.safetensors'}: weights do not fit {path / 'config.json'} "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        model.name_or_path = str(path)
        return model.to(device) if device is not None else model

    @classmethod
    def load_default(cls, **kwargs) -> "DefaultSegModel":
        if not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
            raise FileNotFoundError(f"the shipped default checkpoint is missing at {DEFAULT_CHECKPOINT}")
        model = cls.from_pretrained(DEFAULT_CHECKPOINT, **kwargs)
        model.name_or_path = "default"
        return model


def standardize(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1.0)
    return (x - mean) / std
