"""What every Sa2VA family shares: the SAM2 grounding side, the action grid, the inputs, loading and saving.

A Sa2VA checkpoint (any release) is a language model whose ``[SEG]`` hidden state, through ``text_hidden_fcs``,
prompts SAM2's mask decoder. The families differ in the language/vision side only (InternVL: InternViT tiles +
Qwen2/Qwen2.5/Qwen3/InternLM2 in ``internvl.py``; Qwen2.5-VL / Qwen3-VL in ``qwen_vl.py``); the SAM2 side, written
once here, is the same ``sam2.py`` in every release. A new release is one new module with a subclass of
:class:`Sa2VABase` that says how to get the [SEG] hidden state.

Why an adapter and not ``predict_forward``: Sa2VA's own inference generates the answer greedily under
``torch.no_grad()`` and returns masks already binarized (``sigmoid() > 0.5`` after a bilinear resize), so it can
neither be sampled from nor differentiated (DESIGN.md). The adapter runs the modules Sa2VA's training path runs,
with the answer "Sure, [SEG]." teacher-forced (the [SEG] state depends only on the tokens before it, so when the
model would answer that, greedy decoding gives the same state), and stops before the binarization.

Actions (``action_resolution``):
- ``"image"`` (default): the decoder's 256 x 256 logits upsampled exactly as ``predict_forward`` does - bilinear to
  SAM2's square input size (1024), then bilinear to the image's own size - inside the autograd graph, so a sampled
  pixel is a pixel of the image and 1-2 px vessels are actions. Rewards and validation are scored where users
  score them.
- ``"native"``: the decoder's own grid (256 x 256 on every release); targets are resized to it.

Public Sa2VA facts this relies on (bytedance/Sa2VA ``projects/sa2va/hf/models*/``, Apache-2.0; read, not copied):
SAM2's images are resized to 1024 x 1024 ignoring aspect ratio (PIL, bicubic) and normalised with ImageNet mean/std;
the language embedding is appended to SAM2's sparse prompt after one padding point (label -1); ``no_mem_embed`` is
added to the top-level features (an initial conditioning frame); the two high-resolution levels go to the decoder;
multimask output is on and the mask with the highest predicted IoU is kept. Sa2VA's override of SAM2's heads has the
"no object" overwrite (every logit set to -1024) commented out, so the logits here are the decoder's, always.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..base import REMOTE_CODE_FLAG, PolicyOutput, RemoteCodeError, SegPolicy
from . import compat

__all__ = ["Sa2VABase", "Sa2VAInputs", "FrozenFeatures", "DEFAULT_ANSWER", "ACTION_RESOLUTIONS",
           "binarize_like_predict_forward", "upsample_like_predict_forward", "grounding_pixels", "resize_normalize",
           "IMAGENET_MEAN", "IMAGENET_STD", "has_lora", "checkpoint_layers"]

log = logging.getLogger(__name__)

#: The answer Sa2VA is trained to give to a segmentation request; teacher-forced so that [SEG] is in the input.
DEFAULT_ANSWER = "Sure, [SEG]."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTION_RESOLUTIONS = ("image", "native")
#: Files of a checkpoint folder that hold its tokenizer, processor and generation settings (copied on save).
TEXT_SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template*", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "generation_config.json")
#: The mask decoder's grid on every Sa2VA release: SAM2 Hiera-L at 1024 px, stride 16, decoder upsampling x4.
SAM2_NATIVE_GRID = 256


def resize_normalize(images: Sequence[np.ndarray], size: tuple[int, int] | int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """PIL bicubic resize of uint8 H x W x 3 images to ``size`` (h, w), then ImageNet normalisation (as Sa2VA's
    ``T.Resize(BICUBIC)`` + ``ToTensor`` + ``Normalize`` and SAM2's ``DirectResize`` + ``preprocess_image`` do)."""
    h, w = (size, size) if isinstance(size, int) else size
    out = []
    for im in images:
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
            raise ValueError(f"expected uint8 H x W x 3 images, got {im.dtype} {im.shape}")
        pil = Image.fromarray(im).resize((w, h), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0))
    x = torch.stack(out).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]


#: SAM2's ``preprocess_image`` builds its mean/std tensors in its default dtype, bfloat16, even for float32 images:
#: ``predict_forward`` normalises with these rounded constants (0.484375 for 0.485, ...), so the adapter does too.
SAM2_MEAN = tuple(torch.tensor(IMAGENET_MEAN, dtype=torch.bfloat16).float().tolist())
SAM2_STD = tuple(torch.tensor(IMAGENET_STD, dtype=torch.bfloat16).float().tolist())


def grounding_pixels(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """SAM2's input: the whole image squashed to ``size`` x ``size``, normalised as ``predict_forward`` does."""
    return resize_normalize(images, size, SAM2_MEAN, SAM2_STD)


def upsample_like_predict_forward(low_res: torch.Tensor, grounding_size: int,
                                  image_size: tuple[int, int]) -> torch.Tensor:
    """B x h x w decoder logits -> B x H x W at the image size, the two bilinear steps ``predict_forward`` takes
    (to SAM2's input size, then to the image), differentiable. float32, whatever came in."""
    x = low_res[:, None].float()
    x = F.interpolate(x, size=(grounding_size, grounding_size), mode="bilinear", align_corners=False)
    if tuple(image_size) != (grounding_size, grounding_size):
        x = F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)
    return x[:, 0]


def binarize_like_predict_forward(logits: torch.Tensor, image_size: tuple[int, int],
                                  grounding_size: int | None = None) -> torch.Tensor:
    """What ``predict_forward`` returns for these logits: the resize above (from the native grid) or none (logits
    already at the image size), then ``sigmoid() > 0.5``. Only for comparisons: policies hand out logits."""
    if tuple(logits.shape[-2:]) != tuple(image_size):
        if grounding_size is None:
            logits = F.interpolate(logits[:, None].float(), size=tuple(image_size), mode="bilinear",
                                   align_corners=False)[:, 0]
        else:
            logits = upsample_like_predict_forward(logits, grounding_size, image_size)
    return logits.float().sigmoid() > 0.5


@dataclass
class Sa2VAInputs:
    """What ``preprocess`` hands to ``forward``: both towers' inputs plus what the action grid needs.

    ``grounding``: B x 3 x S x S SAM2 images. ``vision``: the language side's pixel input, family-specific (InternVL:
    T x 3 x 448 x 448 tiles, ``tiles[i]`` of them per image; Qwen-VL: flattened patches with ``grid_thw``).
    ``image_sizes``: each image's (H, W), where the actions live.
    """

    grounding: torch.Tensor
    vision: torch.Tensor
    image_sizes: list[tuple[int, int]]
    tiles: list[int] = field(default_factory=list)
    grid_thw: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_sizes)

    def to(self, *args, **kwargs) -> "Sa2VAInputs":
        """Device moves apply to everything; a dtype only to the floating pixel tensors."""
        return Sa2VAInputs(self.grounding.to(*args, **kwargs), self.vision.to(*args, **kwargs), list(self.image_sizes),
                           list(self.tiles), None if self.grid_thw is None else self.grid_thw.to(
                               device=_device_of(args, kwargs) or self.grid_thw.device))

    @staticmethod
    def cat(items: Sequence["Sa2VAInputs"]) -> "Sa2VAInputs":
        items = list(items)
        grid = [i.grid_thw for i in items]
        return Sa2VAInputs(torch.cat([i.grounding for i in items]), torch.cat([i.vision for i in items]),
                           [s for i in items for s in i.image_sizes], [t for i in items for t in i.tiles],
                           None if any(g is None for g in grid) else torch.cat(grid))


@dataclass
class FrozenFeatures:
    """What the towers without a LoRA layer make of one batch of ``Sa2VAInputs``, computed once
    (``Sa2VABase.encode_frozen``) and handed back to ``forward(inputs, frozen=...)`` as often as the same images are
    seen again with the same frozen weights: in the learner's PPO epochs and in the adapter-disabled reference pass.

    ``image_tokens``: the InternVL vision side's output (``vision_model`` + ``mlp1``: tiles x tokens x D, image by
    image, ``tiles[i]`` rows for image i); None where that tower carries LoRA or the family has no separate one.
    ``grounding``: SAM2's backbone levels as ``forward_image`` leaves them (B x C x H x W each, the decoder's
    stride-4/8 projections applied); None where a LoRA layer sits in SAM2's image encoder or those projections.
    """

    image_tokens: torch.Tensor | None
    grounding: list[torch.Tensor] | None
    tiles: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        if self.grounding is not None:
            return int(self.grounding[0].shape[0])
        return len(self.tiles)

    def to(self, device) -> "FrozenFeatures":
        return FrozenFeatures(None if self.image_tokens is None else self.image_tokens.to(device),
                              None if self.grounding is None else [g.to(device) for g in self.grounding],
                              list(self.tiles))

    @staticmethod
    def cat(items: Sequence["FrozenFeatures"]) -> "FrozenFeatures":
        items = list(items)
        tokens = [i.image_tokens for i in items]
        grounding = [i.grounding for i in items]
        return FrozenFeatures(None if any(t is None for t in tokens) else torch.cat(tokens),
                              None if any(g is None for g in grounding)
                              else [torch.cat(level) for level in zip(*grounding)],
                              [t for i in items for t in i.tiles])

    def nbytes(self) -> int:
        tensors = ([self.image_tokens] if self.image_tokens is not None else []) + list(self.grounding or [])
        return sum(t.numel() * t.element_size() for t in tensors)


def has_lora(modules: Sequence[torch.nn.Module]) -> bool:
    """Whether a LoRA layer (any peft tuner layer) sits in these modules or one of their parameters is trainable:
    then their output depends on the adapter and cannot be computed once for the reference pass and every epoch."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for module in modules for m in module.modules()) or any(
        p.requires_grad for module in modules for p in module.parameters())


def checkpoint_layers(layers: Sequence[torch.nn.Module]) -> int:
    """Activation checkpointing of each layer (torch.utils.checkpoint, non-reentrant): only the layer's inputs are
    kept for backward and the layer is run again there. Why not transformers' ``gradient_checkpointing_enable``:
    every implementation of it (transformers' layers, InternLM2's and InternViT's remote code) acts only when the
    module is in training mode, and the PPO learner runs in eval mode so that dropout cannot make the ratio
    pi/pi_old compare two different networks. Without gradients (rollouts, old and reference passes) the layer runs
    as it is. Returns the number of layers wrapped (a layer wrapped before is left alone)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for layer in layers:
        if getattr(layer, "_rl_seg_checkpointed", False):
            continue
        original = layer.forward

        @functools.wraps(original)
        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        layer.forward = forward
        layer._rl_seg_checkpointed = True
        wrapped += 1
    return wrapped


def _device_of(args, kwargs):
    for a in list(args) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
    return None


class Sa2VABase(SegPolicy):
    """A loaded Sa2VA checkpoint (``self.model``, its own remote code) behind the ``SegPolicy`` API.

    Subclasses say which ``config.json`` architectures they load (``architectures``), how to tokenise and encode the
    language side (``preprocess_vision``, ``seg_hidden_states``) and which LoRA presets their language model has.
    """

    #: ``config.json`` ``architectures`` entries this class loads.
    architectures: ClassVar[tuple[str, ...]] = ()
    #: The LoRA preset ``policy.lora.targets=default`` resolves to.
    default_lora_preset: ClassVar[str] = "llm"
    load_options = SegPolicy.load_options | {"dtype", "action_resolution", "skip_repairs", "attn_implementation"}
    #: Every image is resized to the towers' inputs, so a batch may mix image sizes (only the action grid differs).
    mixed_size_batches: ClassVar[bool] = True

    def __init__(self, model: torch.nn.Module, source_dir: str | Path | None = None, answer: str = DEFAULT_ANSWER,
                 action_resolution: str = "image"):
        super().__init__()
        if action_resolution not in ACTION_RESOLUTIONS:
            raise ValueError(f"policy.action_resolution must be one of {ACTION_RESOLUTIONS}, got {action_resolution!r}")
        self.model = model
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.answer = answer
        self.action_resolution = action_resolution
        self.name_or_path = str(source_dir) if source_dir is not None else self.name
        sam = model.grounding_encoder.sam2_model
        self.grounding_size = int(sam.image_size)
        # SAM2: image embedding at image_size / backbone_stride; the mask decoder upsamples it 4x.
        side = 4 * (self.grounding_size // int(sam.backbone_stride))
        self.native_grid = (side, side)

    # --- what peft needs from a custom model ---------------------------------------------------------------
    def prepare_inputs_for_generation(self, *args, **kwargs):  # pragma: no cover - never generates
        raise NotImplementedError

    @classmethod
    def recognizes(cls, config: dict) -> bool:
        """By the class ``auto_map`` loads (a Qwen2.5-VL release's top-level ``architectures`` names transformers'
        own Qwen2.5-VL class, its wrapper only in ``auto_map`` and ``text_config``), else by ``architectures``."""
        auto_map = config.get("auto_map") or {}
        names = {str(auto_map[k]).rsplit(".", 1)[-1] for k in ("AutoModel", "AutoModelForCausalLM") if k in auto_map}
        return bool((names or set(config.get("architectures") or [])) & set(cls.architectures))

    # --- loading and saving ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, trust_remote_code: bool = False,
                        action_resolution: str = "image", skip_repairs: tuple[str, ...] = (),
                        attn_implementation: str | None = "sdpa", **options) -> "Sa2VABase":
        """Load a Hugging Face Sa2VA checkpoint folder with its own remote code (repaired for transformers 5 where
        needed, see ``compat``), refusing what cannot work before any weight is read. ``attn_implementation``
        ("sdpa", "eager"; None: what the checkpoint's code chooses) applies to the language model where it allows
        the choice (``use_attention``)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json, not a Hugging Face Sa2VA checkpoint")
        if not trust_remote_code:
            raise RemoteCodeError(f"{path} runs its own Python code (config.json auto_map); if you trust it, set "
                                  f"{REMOTE_CODE_FLAG}")
        try:
            raw = json.loads(config_file.read_text())
        except ValueError as exc:
            raise ValueError(f"{config_file}: not valid JSON: {exc}") from exc
        compat.check_versions(_llm_architecture(raw))
        compat.check_remote_code_imports(path)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model, _, _ = compat.load_remote_model(path, dtype=dtype, skip=tuple(skip_repairs))
        if skip_repairs:
            options["skip_repairs"] = tuple(skip_repairs)
        policy = cls.build(model, path, action_resolution=action_resolution, **options)
        if attn_implementation is not None:
            policy.use_attention(attn_implementation)
        if device is not None:
            policy.to(device)
        return policy.eval()

    @classmethod
    def build(cls, model: torch.nn.Module, path: Path, **options) -> "Sa2VABase":
        """The policy around a loaded model (subclasses load their tokenizer or processor here)."""
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> Path:
        """A Sa2VA checkpoint folder again (weights, config, tokenizer/processor, remote code), plus rl-seg's marker,
        so that both ``load_policy`` and ``AutoModel.from_pretrained(..., trust_remote_code=True)`` read it."""
        if any(".lora_A." in n or ".base_layer." in n for n, _ in self.model.named_parameters()):
            raise ValueError("this policy carries LoRA layers: merge them first (rl_seg.policy.lora.merge_adapter) "
                             "or save the adapter alone (PeftModel.save_pretrained)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with compat.attn_mask_utils_shim():
            self.model.save_pretrained(str(path), safe_serialization=True)
        if self.source_dir is not None and self.source_dir.resolve() != path.resolve():
            # The remote code and the text side (tokenizer, processor, chat template) travel as the checkpoint had
            # them: re-serialising them through transformers 5 would rewrite formats 4.x-era code reads.
            for src in self.source_dir.iterdir():
                if src.is_file() and (src.suffix == ".py" or any(src.match(p) for p in TEXT_SIDE_FILES)):
                    shutil.copy2(src, path / src.name)
        else:
            self.save_text_side(path)
        config_file = path / "config.json"
        config = json.loads(config_file.read_text())
        auto_map = getattr(self.model.config, "auto_map", None)
        if auto_map and "auto_map" not in config:
            config["auto_map"] = dict(auto_map)
            config_file.write_text(json.dumps(config, indent=2) + "\n")
        (path / "rl_seg_policy.json").write_text(json.dumps({"policy": self.name}) + "\n")
        return path

    def save_text_side(self, path: Path) -> None:
        raise NotImplementedError

    # --- towers: frozen-tower reuse, activation checkpointing, attention ------------------------------------
    def tower_modules(self) -> dict[str, list[torch.nn.Module]]:
        """The towers whose output ``encode_frozen`` can hand over, by name: here SAM2's image side (what
        ``forward_image`` runs: the Hiera image encoder, and the decoder's stride-4/8 projections of its levels)."""
        sam = self.model.grounding_encoder.sam2_model
        modules = [sam.image_encoder]
        if getattr(sam, "use_high_res_features_in_sam", False):
            modules += [sam.sam_mask_decoder.conv_s0, sam.sam_mask_decoder.conv_s1]
        return {"grounding": modules}

    def frozen_towers(self) -> tuple[str, ...]:
        """The towers no LoRA layer (and no trainable parameter) sits in, found from where the adapter's layers
        actually are: their outputs are the same with the adapter on, off, and after every optimizer step."""
        return tuple(name for name, modules in self.tower_modules().items() if not has_lora(modules))

    def encode_frozen(self, inputs: "Sa2VAInputs") -> FrozenFeatures | None:
        """The frozen towers' outputs for ``inputs`` (no gradient), for ``forward(inputs, frozen=...)``; None when
        no tower is frozen. Call it in the autocast context the forwards run in: the features are what the forward
        would compute there."""
        towers = self.frozen_towers()
        if not towers:
            return None
        with torch.no_grad():
            tokens = self.encode_vision(inputs) if "vision" in towers else None
            grounding = self.encode_grounding(inputs.grounding) if "grounding" in towers else None
        return FrozenFeatures(tokens, grounding, list(inputs.tiles))

    def encode_vision(self, inputs: "Sa2VAInputs") -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no separate vision tower")

    def encode_grounding(self, grounding_pixels: torch.Tensor) -> list[torch.Tensor]:
        """SAM2's backbone levels for B x 3 x S x S images (``forward_image``), in SAM2's precision region."""
        with self._sam_region(grounding_pixels.device):
            return list(self.model.grounding_encoder.sam2_model.forward_image(grounding_pixels)["backbone_fpn"])

    def layer_stacks(self) -> dict[str, torch.nn.ModuleList]:
        """The transformer layer stacks activation checkpointing applies to, by tower: ``llm`` always, the vision
        tower's where LoRA is (elsewhere no gradient flows through it, so nothing is kept for backward anyway)."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> list[str]:
        """Checkpoint every layer of the language model, and of the vision tower when LoRA sits in it; returns the
        stacks wrapped."""
        done = []
        for name, layers in self.layer_stacks().items():
            if name != "llm" and not has_lora([layers]):
                continue
            checkpoint_layers(layers)
            done.append(name)
        return done

    def llm_module(self) -> torch.nn.Module:
        """The language model (transformers' or the checkpoint's own causal-LM class)."""
        raise NotImplementedError

    def use_attention(self, implementation: str) -> str:
        """Switch the language model to ``implementation`` ("sdpa", "eager") where it allows the choice (transformers'
        own Qwen2/Qwen2.5/Qwen3/Llama and Qwen-VL classes do; InternLM2's remote code has eager or flash-attn only,
        and keeps what it has). Returns the implementation in use."""
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"policy.attn_implementation must be 'sdpa', 'eager' or null, got {implementation!r}")
        lm = self.llm_module()
        current = getattr(lm.config, "_attn_implementation", None)
        settable = getattr(type(lm), "_can_set_attn_implementation", None)
        if current != implementation and getattr(lm, "_supports_sdpa", False) and settable is not None \
                and settable():
            lm.set_attn_implementation(implementation)
            current = lm.config._attn_implementation
        log.debug("%s: language model attention %s", self.name_or_path, current)
        return current

    # --- sizes ----------------------------------------------------------------------------------------------
    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(image_size) if self.action_resolution == "image" else self.native_grid

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def upsample_logits(self, logits: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Native-grid logits at the image size, the way ``predict_forward`` resizes them."""
        return upsample_like_predict_forward(logits, self.grounding_size, tuple(image_size))

    # --- inputs -----------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> Sa2VAInputs:
        images = [np.asarray(im) for im in images]
        grounding = grounding_pixels(images, self.grounding_size)
        vision, tiles, grid = self.preprocess_vision(images)
        inputs = Sa2VAInputs(grounding, vision, [tuple(im.shape[:2]) for im in images], tiles, grid)
        return inputs.to(device=self.device, dtype=self.dtype) if self.dtype.is_floating_point else inputs

    def preprocess_vision(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        raise NotImplementedError

    def collate(self, batch: Sequence[Sa2VAInputs]) -> Sa2VAInputs:
        return Sa2VAInputs.cat(batch)

    # --- forward ----------------------------------------------------------------------------------------------
    def seg_hidden_states(self, inputs: Sa2VAInputs, prompts: Sequence[str],
                          frozen: FrozenFeatures | None = None) -> torch.Tensor:
        """The language model's last hidden state at [SEG], B x D (the vision side from ``frozen`` where given)."""
        raise NotImplementedError

    def _sam_region(self, device: torch.device):
        """SAM2 mixes float32 (point coordinates, positional encodings) with the weights' dtype and relies on the
        autocast region Sa2VA always runs it in; an enclosing autocast (evaluation on CUDA) is left alone."""
        if self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(device_type=device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def decode_masks(self, grounding_pixels: torch.Tensor, language_embd: torch.Tensor,
                     grounding_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """SAM2's heads prompted by ``language_embd`` (B x N x C): low-resolution logits B x h x w (float32), the
        steps of Sa2VA's ``add_language_embd`` -> ``_forward_sam_heads`` for one initial frame. The image side is
        ``grounding_features`` when given (``encode_grounding``), else computed from ``grounding_pixels``."""
        with self._sam_region(grounding_pixels.device):
            if grounding_features is None:
                grounding_features = list(
                    self.model.grounding_encoder.sam2_model.forward_image(grounding_pixels)["backbone_fpn"])
            return self._sam_heads(grounding_features, language_embd)

    def _sam_heads(self, backbone_fpn: list[torch.Tensor], language_embd: torch.Tensor) -> torch.Tensor:
        sam = self.model.grounding_encoder.sam2_model
        # _prepare_backbone_features' flattening of the levels the decoder reads (their positions are not used)
        levels = backbone_fpn[-sam.num_feature_levels:]
        vision_feats = [x.flatten(2).permute(2, 0, 1) for x in levels]
        feat_sizes = [(x.shape[-2], x.shape[-1]) for x in levels]
        b, c = levels[-1].shape[0], int(sam.hidden_dim)
        h, w = feat_sizes[-1]
        pix = (vision_feats[-1] + sam.no_mem_embed).permute(1, 2, 0).reshape(b, c, h, w)
        high_res = [x.permute(1, 2, 0).reshape(b, x.size(2), *s) for x, s in zip(vision_feats[:-1], feat_sizes[:-1])]
        coords = torch.zeros(b, 1, 2, device=pix.device)
        labels = -torch.ones(b, 1, dtype=torch.int32, device=pix.device)
        sparse, dense = sam.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        sparse = torch.cat([sparse.to(language_embd.dtype), language_embd], dim=1)
        multimask = sam._use_multimask(is_init_cond_frame=True, point_inputs=None)
        low, ious, _, _ = sam.sam_mask_decoder(
            image_embeddings=pix, image_pe=sam.sam_prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(pix.dtype), multimask_output=multimask, repeat_image=False,
            high_res_features=high_res)
        if low.shape[1] > 1:  # multimask: the mask with the highest predicted IoU, as SAM2 picks it
            low = low[torch.arange(b, device=low.device), ious.argmax(dim=-1)]
        else:
            low = low[:, 0]
        return low.float()

    def to_action_grid(self, low_res: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The decoder's grid, or each image's own size (``action_resolution``). Images of different sizes in one
        batch (native sizes): each is upsampled to its own size and the batch padded to the largest, top-left
        aligned; callers read image i as ``logits[i, :H_i, :W_i]`` (``mixed_size_batches``)."""
        if self.action_resolution == "native":
            return low_res
        sizes = [tuple(s) for s in image_sizes]
        if len(set(sizes)) == 1:
            return upsample_like_predict_forward(low_res, self.grounding_size, sizes[0])
        out = low_res.new_zeros((len(sizes), max(h for h, _ in sizes), max(w for _, w in sizes)), dtype=torch.float32)
        for size in set(sizes):
            rows = [i for i, s in enumerate(sizes) if s == size]
            out[rows, :size[0], :size[1]] = upsample_like_predict_forward(low_res[rows], self.grounding_size, size)
        return out

    def forward(self, inputs: Sa2VAInputs, prompts: Sequence[str] | None = None,
                frozen: FrozenFeatures | None = None) -> PolicyOutput:
        """Logits (and the [SEG] state) for ``inputs``; ``frozen``: ``encode_frozen(inputs)`` from earlier, whose
        towers are then not run again (the result is the same, bit for bit)."""
        from ..base import DEFAULT_PROMPT

        if not isinstance(inputs, Sa2VAInputs):
            raise TypeError(f"{type(self).__name__} takes what its preprocess() returns, got {type(inputs).__name__}")
        prompts = list(prompts) if prompts is not None else [DEFAULT_PROMPT] * len(inputs)
        if len(prompts) != len(inputs):
            raise ValueError(f"{len(prompts)} prompts for {len(inputs)} images")
        if frozen is not None and len(frozen) != len(inputs):
            raise ValueError(f"frozen features of {len(frozen)} images for {len(inputs)} images")
        seg_hidden = self.seg_hidden_states(inputs, prompts, frozen)
        language_embd = self.model.text_hidden_fcs(seg_hidden)[:, None]
        low = self.decode_masks(inputs.grounding, language_embd, frozen.grounding if frozen is not None else None)
        return PolicyOutput(logits=self.to_action_grid(low, inputs.image_sizes), seg_hidden=seg_hidden)


def _llm_architecture(config: dict) -> str | None:
    """The transformers class the checkpoint's language side needs (for the version check)."""
    text_type = str((config.get("text_config") or {}).get("model_type") or "")
    if text_type.startswith("qwen3_vl"):
        return "Qwen3VLForConditionalGeneration"
    if text_type.startswith("qwen2_5_vl"):
        return "Qwen2_5_VLForConditionalGeneration"
    archs = (config.get("llm_config") or {}).get("architectures") or []
    return archs[0] if archs else None
