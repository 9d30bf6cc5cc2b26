"""Replica of Sa2VA's ``Sa2VAChatModel`` (``modeling_sa2va_chat.py`` of the InternVL-based releases: Sa2VA-1B/4B and
the InternVL3-based 2B/8B/14B on Qwen2, Sa2VA-8B/26B on InternLM2), written for rl-seg's tests. Same module tree,
parameter names and shapes as the public code (so checkpoints load either way), same call flow and arithmetic, and
the same behaviour under the transformers version installed -- rl-seg must cope with what users' checkpoints do:

- Imports: torchvision (transforms), timm (through modeling_intern_vit), einops, peft, and ``modeling_phi3``
  unconditionally, which needs ``transformers.modeling_attn_mask_utils``: on transformers 5 importing this module
  fails with ModuleNotFoundError, whatever the LLM. flash-attn is optional (try/except; a message is printed).
- ``Sa2VAChatModel.__init__`` never calls ``post_init()``: transformers 5's ``from_pretrained`` then fails with
  AttributeError ``all_tied_weights_keys``.
- ``_llm_forward`` (the training path, ``forward``) increments ``self._count``, which nothing initialises:
  AttributeError unless the caller sets it.
- ``img_context_token_id`` and ``seg_token_idx`` stay None until ``preparing_for_generation``, which also hard-codes
  the inference preprocessing (448 px tiles of patch 14, 1-12 tiles plus a thumbnail, ``DirectResize(1024)`` for
  SAM2) and sets ``torch_dtype`` (bfloat16 by default) WITHOUT casting the model (the public code's
  ``self.to(torch_dtype)`` is commented out): an fp32 model given the default gets bf16 pixels, which fp32
  convolutions reject; callers pass ``torch_dtype=torch.float32`` first for an fp32 model.
- ``predict_forward`` moves token ids with ``.cuda()`` (CPU tests patch ``torch.Tensor.cuda``), generates greedily
  with ``output_hidden_states``, takes the last layer's state at each generated ``[SEG]`` (``get_seg_hidden_states``),
  maps it through ``text_hidden_fcs`` to SAM2's prompt width, decodes a mask with SAM2's
  ``language_embd_inference`` (1024 x 1024 logits), resizes bilinearly to the image and thresholds
  ``sigmoid() > 0.5``.
- ``dynamic_preprocess`` / ``find_closest_aspect_ratio`` tile as the public code, ties included.

Replica-only liberties, both needed because a replica has random weights and must run on CPU in tests:

- ``SAM2(size=getattr(config, "replica_sam2_size", "hiera_l"))``: the public code hard-codes SAM2 Hiera-L; a
  config field can ask for a tiny SAM2 of the same structure (absent = upstream's Hiera-L).
- ``config.replica_forced_answer`` (absent/None = upstream): random weights never emit ``[SEG]``, so ``generate``
  adds a logits processor that forces this answer (then the template's suffix). Everything else in
  ``predict_forward`` is upstream's path: the forced tokens go through the real LLM, and the ``[SEG]`` hidden
  state is the LLM's own.
"""

import warnings
from types import MethodType
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision.transforms as T
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import CrossEntropyLoss
from torchvision.transforms.functional import InterpolationMode, resize, to_pil_image  # noqa: F401
from transformers import (AutoModel, GenerationConfig, LlamaForCausalLM, LlamaTokenizer,  # noqa: F401
                          LogitsProcessor, LogitsProcessorList, Qwen2ForCausalLM, StoppingCriteria,
                          StoppingCriteriaList)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, logging  # noqa: F401

from .configuration_sa2va_chat import Sa2VAChatConfig
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM
from .modeling_phi3 import Phi3ForCausalLM
from .sam2 import SAM2
from .templates import PROMPT_TEMPLATE

try:
    from .flash_attention import FlashAttention  # noqa: F401
    has_flash_attn = True
except Exception:  # the public code catches everything here too
    print("FlashAttention is not installed.")
    has_flash_attn = False

logger = logging.get_logger(__name__)

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"


def version_cmp(v1, v2, op="eq"):
    import operator

    from packaging import version
    return getattr(operator, op)(version.parse(v1), version.parse(v2))


class StopWordStoppingCriteria(StoppingCriteria):
    """Stop once the decoded text (line breaks removed) ends with ``stop_word``."""

    def __init__(self, tokenizer, stop_word):
        self.tokenizer = tokenizer
        self.stop_word = stop_word
        self.length = len(self.stop_word)

    def __call__(self, input_ids, *args, **kwargs) -> bool:
        text = self.tokenizer.decode(input_ids[0]).replace("\r", "").replace("\n", "")
        return text[-self.length:] == self.stop_word


def get_stop_criteria(tokenizer, stop_words=[]):
    return StoppingCriteriaList([StopWordStoppingCriteria(tokenizer, word) for word in stop_words])


class ReplicaForcedAnswer(LogitsProcessor):
    """Replica only: forces ``token_ids`` as the first generated tokens (greedy decoding of random weights never
    says ``[SEG]``); afterwards the scores are left alone. Steps count from the first call."""

    def __init__(self, token_ids):
        self.token_ids = list(token_ids)
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        if step < len(self.token_ids):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.token_ids[step]] = 0.0
            return forced
        return scores


class DirectResize:
    """Square resize that ignores the aspect ratio (PIL's default filter), for SAM2's input."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 in, target x target x C uint8 out."""
        return np.array(to_pil_image(image, mode="RGB").resize((self.target_length, self.target_length)))


def _splice_visual_prompts(vit_embeds, vp_overall_mask, prompt_masks, image_flags, C):
    """The visual-prompt token stream: every tile's embeddings, and after each prompted tile the embeddings under
    each of its region masks (in region order)."""
    pieces = []
    vp_overall_mask = vp_overall_mask.to(vit_embeds.device).bool()
    prompt_masks = [m.to(vit_embeds.device).bool() for m in prompt_masks]
    vp_overall_mask = vp_overall_mask[image_flags == 1]
    prompted_tiles = vit_embeds[vp_overall_mask]  # (n_prompted, hw, C)
    k = 0
    for i in range(len(vit_embeds)):
        pieces.append(vit_embeds[i].reshape(-1, C))
        if vp_overall_mask[i]:
            tile = prompted_tiles[k].reshape(-1, C)
            regions = prompt_masks[k]
            n_obj = len(regions)
            pieces.append(tile.unsqueeze(0).repeat(n_obj, 1, 1)[regions.reshape(n_obj, -1)])
            k += 1
    return torch.cat(pieces, dim=0)


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["InternVisionModel", "LlamaDecoderLayer", "InternLM2DecoderLayer", "Phi3DecoderLayer",
                         "Qwen2DecoderLayer", "SAM2"]
    _supports_flash_attn_2 = True
    supports_gradient_checkpointing = True

    def __init__(self, config: Sa2VAChatConfig, vision_model=None, language_model=None, use_flash_attn=True):
        super().__init__(config)
        assert version_cmp(transformers.__version__, "4.37.0", "ge")
        image_size = config.force_image_size or config.vision_config.image_size
        patch_size = config.vision_config.patch_size
        self.patch_size = patch_size
        self.select_layer = config.select_layer
        self.template = config.template.replace("-", "_")
        self.num_image_token = int((image_size // patch_size) ** 2 * (config.downsample_ratio ** 2))
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.llm_arch_name = config.llm_config.architectures[0]

        use_flash_attn = use_flash_attn if has_flash_attn else False
        config.vision_config.use_flash_attn = bool(use_flash_attn)
        config.llm_config._attn_implementation = "flash_attention_2" if use_flash_attn else "eager"
        logger.info(f"num_image_token: {self.num_image_token}")
        logger.info(f"ps_version: {self.ps_version}")

        self.vision_model = vision_model if vision_model is not None else InternVisionModel(config.vision_config)
        self.language_model = language_model if language_model is not None else self._build_llm(config.llm_config)

        vit_hidden_size = config.vision_config.hidden_size
        llm_hidden_size = config.llm_config.hidden_size
        shuffled = vit_hidden_size * int(1 / self.downsample_ratio) ** 2  # channels after pixel shuffle
        self.mlp1 = nn.Sequential(nn.LayerNorm(shuffled), nn.Linear(shuffled, llm_hidden_size), nn.GELU(),
                                  nn.Linear(llm_hidden_size, llm_hidden_size))

        self.img_context_token_id = None
        self.conv_template = PROMPT_TEMPLATE[self.template]
        self.template = self.conv_template
        if hasattr(config, "system_message"):
            self.system_message = config.system_message
        self.num_samples = 0

        if config.use_backbone_lora:
            self.wrap_backbone_lora(r=config.use_backbone_lora, lora_alpha=2 * config.use_backbone_lora)
        if config.use_llm_lora:
            self.wrap_llm_lora(r=config.use_llm_lora, lora_alpha=2 * config.use_llm_lora)

        # The replica's one structural liberty: the SAM2 size (absent from the config = upstream's Hiera-L).
        self.grounding_encoder = SAM2(size=getattr(config, "replica_sam2_size", "hiera_l"))
        out_dim = self.grounding_encoder.hidden_dim
        self.text_hidden_fcs = nn.Sequential(nn.Linear(llm_hidden_size, llm_hidden_size), nn.ReLU(inplace=True),
                                             nn.Linear(llm_hidden_size, out_dim), nn.Dropout(0.0))
        self.init_prediction_config = False

    @staticmethod
    def _build_llm(llm_config):
        arch = llm_config.architectures[0]
        if arch == "LlamaForCausalLM":
            return LlamaForCausalLM(llm_config)
        if arch == "InternLM2ForCausalLM":
            return InternLM2ForCausalLM(llm_config)
        if arch == "Phi3ForCausalLM":
            return Phi3ForCausalLM(llm_config)
        if arch == "Qwen2ForCausalLM":
            return Qwen2ForCausalLM(llm_config)
        if arch == "Qwen3ForCausalLM":
            assert transformers.__version__ >= "4.56.0", "Please upgrade transformers to >=4.56.0 for Qwen3 support."
            from transformers import Qwen3ForCausalLM
            return Qwen3ForCausalLM(llm_config)
        raise NotImplementedError(f"{arch} is not implemented.")

    # ------------------------------------------------------------------------------------------------------ LoRA
    def wrap_backbone_lora(self, r=128, lora_alpha=256, lora_dropout=0.05):
        config = LoraConfig(r=r, target_modules=["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
                            lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self.vision_model = get_peft_model(self.vision_model, config)
        self.vision_model.print_trainable_parameters()

    def wrap_llm_lora(self, r=128, lora_alpha=256, lora_dropout=0.05):
        """LoRA on the LLM's attention AND MLP projections (names per architecture)."""
        if self.llm_arch_name == "InternLM2ForCausalLM":
            targets = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
        elif self.llm_arch_name == "Phi3ForCausalLM":
            targets = ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"]
        elif self.llm_arch_name in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
            targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"]
        else:
            # as upstream: raising the NotImplemented constant is itself a TypeError
            raise NotImplemented  # noqa: F901
        config = LoraConfig(r=r, target_modules=targets, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            task_type="CAUSAL_LM")
        self.language_model = get_peft_model(self.language_model, config)
        self.language_model.enable_input_require_grads()
        self.language_model.print_trainable_parameters()

    # ---------------------------------------------------------------------------------------------------- vision
    def pixel_shuffle(self, x, scale_factor=0.5):
        """(N, W, H, C) -> (N, W*s, H*s, C/s^2) by folding neighbouring tokens into channels. ps_version 'v1'
        leaves the two spatial axes swapped (a transposed grid; it warns), 'v2' swaps them back."""
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.ps_version == "v1":
            warnings.warn("In ps_version 'v1', the height and width have not been swapped back, which results in a "
                          "transposed image.")
        else:
            x = x.permute(0, 2, 1, 3).contiguous()
        return x

    def extract_feature(self, pixel_values):
        """Image tokens per tile: ViT (last layer or ``select_layer``) without the class token, pixel shuffle by
        ``downsample_ratio``, then ``mlp1``."""
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=False,
                                           return_dict=True).last_hidden_state
        else:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=True,
                                           return_dict=True).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    @property
    def lm_head(self):
        return self.language_model.get_output_embeddings()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # ---------------------------------------------------------------------------------------------- training path
    def forward(self, data, data_samples=None, mode="loss"):
        pixel_values = data["pixel_values"]
        if type(pixel_values) is list or pixel_values.ndim == 5:
            if type(pixel_values) is list:
                pixel_values = [x.unsqueeze(0) if x.ndim == 3 else x for x in pixel_values]
            concat_images = torch.cat([image.to(self.vision_model.dtype) for image in pixel_values], dim=0)
        else:
            raise NotImplementedError()
        image_flags = (torch.sum(concat_images, dim=(1, 2, 3)) != 0).long()  # all-zero tiles are text-only
        return self._llm_forward(input_ids=data["input_ids"], position_ids=data["position_ids"],
                                 attention_mask=data["attention_mask"], image_flags=image_flags,
                                 pixel_values=concat_images, labels=data["labels"], use_cache=False,
                                 output_hidden_states=True, vp_overall_mask=data.get("vp_overall_mask"),
                                 prompt_masks=data.get("prompt_masks"))

    @staticmethod
    def _fill_image_slots(input_embeds, selected, embeds, C, what):
        """Write ``embeds`` into the selected rows; on a count mismatch warn and repeat/truncate, as upstream."""
        try:
            input_embeds[selected] = embeds.reshape(-1, C)
        except Exception as e:
            embeds = embeds.reshape(-1, C)
            print(f"warning: {e}, input_embeds[selected].shape={input_embeds[selected].shape}, "
                  f"{what}.shape={embeds.shape}")
            n_token = selected.sum()
            if n_token > len(embeds):
                print(f"Wrong !!! {n_token} image tokens in text but only {len(embeds)} vit embeds !!!")
                embeds = torch.cat([embeds] * (n_token // len(embeds) + 1), dim=0)
            input_embeds[selected] = embeds[:n_token]

    def _llm_forward(self, pixel_values: torch.FloatTensor, input_ids: torch.LongTensor = None,
                     attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.LongTensor] = None,
                     image_flags: Optional[torch.LongTensor] = None,
                     past_key_values: Optional[List[torch.FloatTensor]] = None,
                     labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                     output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                     return_dict: Optional[bool] = None, vp_overall_mask=None,
                     prompt_masks=None) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        image_flags = image_flags.squeeze(-1)
        input_embeds = self.language_model.get_input_embeddings()(input_ids).clone()
        vit_embeds = self.extract_feature(pixel_values).to(input_embeds.dtype)
        vit_embeds = vit_embeds[image_flags == 1]
        B, N, C = input_embeds.shape
        input_embeds = input_embeds.reshape(B * N, C)

        self._count += 1  # never initialised (upstream): AttributeError unless the caller sets it

        selected = input_ids.reshape(B * N) == self.img_context_token_id
        if vp_overall_mask is not None and prompt_masks is not None:
            vp_embeds = _splice_visual_prompts(vit_embeds, vp_overall_mask, prompt_masks, image_flags, C)
            self._fill_image_slots(input_embeds, selected, vp_embeds, C, "vp_embeds")
        else:
            self._fill_image_slots(input_embeds, selected, vit_embeds, C, "vit_embeds")
        input_embeds = input_embeds.reshape(B, N, C)

        outputs = self.language_model(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=past_key_values,
                                      use_cache=use_cache, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=return_dict)
        logits = outputs.logits
        loss = None
        if labels is not None:  # next-token prediction
            shift_logits = logits[..., :-1, :].contiguous().view(-1, self.language_model.config.vocab_size)
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
            loss = CrossEntropyLoss()(shift_logits, shift_labels)
        if not return_dict:
            output = (logits,) + outputs[1:]
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    # --------------------------------------------------------------------------------------------- inference path
    def _replica_answer_steering(self, generate_kwargs):
        """Replica only (see the module docstring): force ``config.replica_forced_answer`` + the template's
        suffix as the first generated tokens."""
        answer = getattr(self.config, "replica_forced_answer", None)
        if not answer or getattr(self, "tokenizer", None) is None:
            return
        ids = self.tokenizer.encode(answer + self.template.get("SUFFIX", ""), add_special_tokens=False)
        processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        processors.append(ReplicaForcedAnswer(ids))
        generate_kwargs["logits_processor"] = processors

    @torch.no_grad()
    def generate(self, pixel_values: Optional[torch.FloatTensor] = None, input_ids: Optional[torch.FloatTensor] = None,
                 attention_mask: Optional[torch.LongTensor] = None,
                 visual_features: Optional[torch.FloatTensor] = None,
                 generation_config: Optional[GenerationConfig] = None, output_hidden_states: Optional[bool] = None,
                 return_dict: Optional[bool] = None, prompt_masks=None, vp_overall_mask=None,
                 **generate_kwargs) -> torch.LongTensor:
        device = self.device
        assert self.img_context_token_id is not None
        if pixel_values is not None:
            if visual_features is not None:
                vit_embeds = visual_features
            else:
                if type(pixel_values) is list or pixel_values.ndim == 5:
                    if type(pixel_values) is list:
                        pixel_values = [x.unsqueeze(0) if x.ndim == 3 else x for x in pixel_values]
                    pixel_values = torch.cat([image.to(self.vision_model.dtype) for image in pixel_values], dim=0)
                vit_embeds = self.extract_feature(pixel_values.to(device))
            image_flags = (torch.sum(pixel_values, dim=(1, 2, 3)) != 0).long()
            vit_embeds = vit_embeds[image_flags == 1]
            input_embeds = self.language_model.get_input_embeddings()(input_ids.to(device))
            B, N, C = input_embeds.shape
            input_embeds = input_embeds.reshape(B * N, C)
            selected = input_ids.reshape(B * N) == self.img_context_token_id
            assert selected.sum() != 0
            if vp_overall_mask is not None and prompt_masks is not None:
                vp_embeds = _splice_visual_prompts(vit_embeds, vp_overall_mask, prompt_masks, image_flags,
                                                   C).reshape(-1, C)
                if len(input_embeds[selected]) != len(vp_embeds):
                    print(f"Shape mismatch, selected is {len(input_embeds[selected])}, vp embeds is "
                          f"{len(vp_embeds)} !!!")
                    n = min(len(input_embeds[selected]), len(vp_embeds))
                    # writes into a copy (advanced indexing), so nothing changes: upstream's behaviour
                    input_embeds[selected][:n] = vp_embeds[:n].to(input_embeds.device)
                else:
                    input_embeds[selected] = vp_embeds.to(input_embeds.device)
            else:
                input_embeds[selected] = vit_embeds.reshape(-1, C).to(input_embeds.device)
            input_embeds = input_embeds.reshape(B, N, C)
        else:
            input_embeds = self.language_model.get_input_embeddings()(input_ids)

        self._replica_answer_steering(generate_kwargs)
        return self.language_model.generate(inputs_embeds=input_embeds, attention_mask=attention_mask.to(device),
                                            generation_config=generation_config,
                                            output_hidden_states=output_hidden_states, use_cache=True,
                                            **generate_kwargs)

    def preparing_for_generation(self, tokenizer, max_new_tokens=2048, torch_dtype=torch.bfloat16):
        """Stop words, greedy generation config, token ids and the hard-coded inference preprocessing. Sets
        ``torch_dtype`` for the inputs but does not cast the model (as upstream)."""
        if not hasattr(self, "tokenizer"):
            self.tokenizer = tokenizer
        self.bot_name = "BOT"
        self.stop_criteria = get_stop_criteria(tokenizer=self.tokenizer,
                                               stop_words=list(self.template.get("STOP_WORDS", [])))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad)
        self.gen_config.transformers_version = "4.42.3"
        self.init_prediction_config = True
        self.torch_dtype = torch_dtype
        self.extra_image_processor = DirectResize(target_length=1024)
        self.min_dynamic_patch = 1
        self.max_dynamic_patch = 12
        self.downsample_ratio = 0.5
        self.image_size = 448
        self.use_thumbnail = True
        self.patch_size = 14
        self.patch_token = int((self.image_size // self.patch_size) ** 2 * (self.downsample_ratio ** 2))
        self.IMAGENET_MEAN = (0.485, 0.456, 0.406)
        self.IMAGENET_STD = (0.229, 0.224, 0.225)
        self.IMG_CONTEXT_TOKEN = IMG_CONTEXT_TOKEN
        self.IMG_START_TOKEN = "<img>"
        self.IMG_END_TOKEN = "</img>"
        self.transformer = T.Compose([
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((self.image_size, self.image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=self.IMAGENET_MEAN, std=self.IMAGENET_STD),
        ])
        self.VP_START_TOKEN = "<vp>"
        self.VP_END_TOKEN = "</vp>"
        if self.config.llm_config.architectures[0] == "Phi3ForCausalLM":
            self.language_model.prepare_inputs_for_generation = MethodType(prepare_inputs_for_generation_phi3,
                                                                           self.language_model)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        self.seg_token_idx = tokenizer.convert_tokens_to_ids("[SEG]")

    def _chat_ids(self, text, past_text):
        input_text = past_text + self.template["INSTRUCTION"].format(input=text, round=1, bot_name=self.bot_name)
        ids = torch.tensor(self.tokenizer.encode(input_text)).cuda().unsqueeze(0)
        return ids, torch.ones_like(ids, dtype=torch.bool)

    def _grounding_pixels(self, frame):
        """SAM2's input for one PIL frame: DirectResize to 1024, CHW uint8, then SAM2's own normalisation."""
        g_image = torch.from_numpy(self.extra_image_processor.apply_image(np.array(frame)))
        return g_image.permute(2, 0, 1).contiguous()

    def _region_prompt_text(self, mask_prompts, device):
        """Masks resized to the token grid (nearest) and the text naming each region's tokens."""
        side = int(self.image_size // self.patch_size * self.downsample_ratio)
        mask_prompts = [torch.Tensor(item).to(device) for item in mask_prompts]
        mask_prompts = [F.interpolate(item.unsqueeze(0), size=(side, side), mode="nearest").squeeze(0)
                        for item in mask_prompts]
        regions = mask_prompts[0]
        text = "\nThere are {} part regions in the picture: ".format(len(regions))
        for i, region in enumerate(regions):
            n_pixels = region.bool().to(torch.int64).sum()
            text += f"region{i + 1}" + self.VP_START_TOKEN + self.IMG_CONTEXT_TOKEN * n_pixels + self.VP_END_TOKEN
            text += ".\n" if i == len(regions) - 1 else ", "
        return mask_prompts, text

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None):
        if not self.init_prediction_config:
            assert tokenizer
            self.preparing_for_generation(tokenizer=tokenizer)

        text_only = image is None and video is None and "<image>" not in past_text
        if text_only:
            ids, attention_mask = self._chat_ids(text.replace("<image>", ""), past_text)
            mm_inputs = {"pixel_values": None, "input_ids": ids, "attention_mask": attention_mask,
                         "position_ids": None, "past_key_values": None, "labels": None, "prompt_masks": None,
                         "vp_overall_mask": None}
            ret_masks = []
        else:
            input_dict = {}
            if video is not None:
                pixel_values, extra_pixel_values = [], []
                ori_image_size = video[0].size
                for frame_idx, frame_image in enumerate(video):
                    extra_pixel_values.append(self._grounding_pixels(frame_image))
                    if frame_idx < 5:  # the LLM sees the first five frames only
                        pixel_values.append(self.transformer(frame_image))
                pixel_values = torch.stack(pixel_values, dim=0).to(self.torch_dtype)
                g_pixel_values = torch.stack([self.grounding_encoder.preprocess_image(pixel)
                                              for pixel in extra_pixel_values]).to(self.torch_dtype)
                num_image_tokens = self.patch_token
                num_frames = len(pixel_values)
                input_dict["vp_overall_mask"] = None
            else:
                ori_image_size = image.size
                g_pixel_values = self._grounding_pixels(image).to(self.torch_dtype)
                g_pixel_values = torch.stack([self.grounding_encoder.preprocess_image(pixel)
                                              for pixel in [g_pixel_values]]).to(self.torch_dtype)
                images = dynamic_preprocess(image, self.min_dynamic_patch, self.max_dynamic_patch, self.image_size,
                                            self.use_thumbnail)
                if mask_prompts is not None:  # the prompts refer to the last tile (the thumbnail)
                    input_dict["vp_overall_mask"] = torch.Tensor([False] * (len(images) - 1) + [True])
                else:
                    input_dict["vp_overall_mask"] = None
                pixel_values = torch.stack([self.transformer(tile) for tile in images]).to(self.torch_dtype)
                num_image_tokens = pixel_values.shape[0] * self.patch_token
                num_frames = 1
            input_dict["g_pixel_values"] = g_pixel_values
            input_dict["pixel_values"] = pixel_values

            if mask_prompts is not None:
                mask_prompts, vp_token_str = self._region_prompt_text(mask_prompts, pixel_values.device)
            else:
                vp_token_str = ""
            image_token_str = f"{self.IMG_START_TOKEN}{self.IMG_CONTEXT_TOKEN * num_image_tokens}{self.IMG_END_TOKEN}"
            image_token_str = ((image_token_str + "\n") * num_frames).strip()
            ret_masks = []
            if "<image>" in text or mask_prompts is not None:
                assert past_text is None or len(past_text) == 0
            ids, attention_mask = self._chat_ids(text.replace("<image>", image_token_str + vp_token_str), past_text)
            mm_inputs = {"pixel_values": input_dict["pixel_values"], "input_ids": ids,
                         "attention_mask": attention_mask, "position_ids": None, "past_key_values": None,
                         "labels": None, "prompt_masks": mask_prompts,
                         "vp_overall_mask": input_dict["vp_overall_mask"]}

        generate_output = self.generate(**mm_inputs, generation_config=self.gen_config, streamer=None,
                                        bos_token_id=self.tokenizer.bos_token_id,
                                        stopping_criteria=self.stop_criteria, output_hidden_states=True,
                                        return_dict_in_generate=True)
        predict = self.tokenizer.decode(generate_output.sequences[0], skip_special_tokens=False).strip()
        if text_only:
            return {"prediction": predict, "prediction_masks": ret_masks}

        # the last layer's state of every position the generation saw (prompt, then one per generated token)
        last_hidden_states = torch.cat([step[-1][0] for step in generate_output.hidden_states], dim=0)
        seg_hidden_states = get_seg_hidden_states(last_hidden_states, generate_output.sequences[0][:-1],
                                                  seg_id=self.seg_token_idx)
        for seg_hidden_states in self.text_hidden_fcs(seg_hidden_states):
            seg_hidden_states = seg_hidden_states.unsqueeze(0)
            sam_states = self.grounding_encoder.get_sam2_embeddings(input_dict["g_pixel_values"])
            pred_masks = self.grounding_encoder.language_embd_inference(sam_states,
                                                                        [seg_hidden_states] * num_frames)
            w, h = ori_image_size
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            ret_masks.append((masks.sigmoid() > 0.5).cpu().numpy())
        return {"prediction": predict, "prediction_masks": ret_masks}


def get_seg_hidden_states(hidden_states, output_ids, seg_id):
    """States of the generated positions whose input token was ``seg_id`` (the last ``len(output_ids)`` rows)."""
    seg_mask = output_ids == seg_id
    n_out = len(seg_mask)
    if n_out == 0:
        return hidden_states[0:0]
    return hidden_states[-n_out:][seg_mask]


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    """The (cols, rows) grid closest in aspect ratio; on a tie the later candidate wins when the image has more than
    half the grid's pixels."""
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    """Resize to the closest (cols x rows) grid of ``image_size`` tiles (min_num..max_num tiles), crop row-major,
    and append a whole-image thumbnail when there is more than one tile."""
    orig_width, orig_height = image.size
    # A set sorted by tile count, as upstream: equal counts keep the set's iteration order, which decides ties in
    # find_closest_aspect_ratio. Built by the same comprehension so that order is the same.
    target_ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    cols, rows = find_closest_aspect_ratio(orig_width / orig_height, target_ratios, orig_width, orig_height,
                                           image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [resized.crop(((k % cols) * image_size, (k // cols) * image_size, (k % cols + 1) * image_size,
                           (k // cols + 1) * image_size)) for k in range(cols * rows)]
    assert len(tiles) == cols * rows
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def prepare_inputs_for_generation_phi3(self, input_ids, past_key_values=None, attention_mask=None,
                                       inputs_embeds=None, **kwargs):
    """Bound onto a Phi-3 LLM by ``preparing_for_generation``: inputs_embeds on the first step only, ids not yet
    in the cache afterwards, positions from the attention mask."""
    from transformers.cache_utils import Cache

    if past_key_values is not None:
        if isinstance(past_key_values, Cache):
            cache_length = past_key_values.get_seq_length()
            past_length = past_key_values.seen_tokens
            max_cache_length = past_key_values.get_max_length()
        else:
            cache_length = past_length = past_key_values[0][0].shape[2]
            max_cache_length = None
        if attention_mask is not None and attention_mask.shape[1] > input_ids.shape[1]:
            input_ids = input_ids[:, -(attention_mask.shape[1] - past_length):]
        elif past_length < input_ids.shape[1]:
            input_ids = input_ids[:, past_length:]
        if (max_cache_length is not None and attention_mask is not None
                and cache_length + input_ids.shape[1] > max_cache_length):
            attention_mask = attention_mask[:, -max_cache_length:]
    position_ids = kwargs.get("position_ids", None)
    if attention_mask is not None and position_ids is None:
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        if past_key_values:
            position_ids = position_ids[:, -input_ids.shape[1]:]
    if inputs_embeds is not None and (past_key_values is None or len(past_key_values) == 0):
        model_inputs = {"inputs_embeds": inputs_embeds}
    else:
        model_inputs = {"input_ids": input_ids}
    model_inputs.update({"position_ids": position_ids, "past_key_values": past_key_values,
                         "use_cache": kwargs.get("use_cache"), "attention_mask": attention_mask})
    return model_inputs
