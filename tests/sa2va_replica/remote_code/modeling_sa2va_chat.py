"""Replica of Sa2VA's Hugging Face ``Sa2VAChatModel`` (random weights, tiny sizes) for rl-seg's tests.

Same attribute names and call flow as the public remote code (``modeling_sa2va_chat.py`` of the Sa2VA model
repos and ``projects/llava_sam2/hf/models`` of the Sa2VA GitHub repo), written here, not copied:

- ``vision_model`` (InternViT) -> drop the class token -> pixel shuffle (``downsample_ratio`` 0.5) -> ``mlp1``
  (LayerNorm, Linear, GELU, Linear) gives ``num_image_token`` embeddings per 448 px tile (here: per 32 px tile).
- The prompt holds ``<img>`` + ``num_image_token`` x ``<IMG_CONTEXT>`` + ``</img>``; the embeddings at
  ``img_context_token_id`` positions are replaced by the image embeddings before ``language_model`` runs.
- ``img_context_token_id`` and ``seg_token_idx`` are None until ``preparing_for_generation`` reads them from the
  tokenizer; ``preparing_for_generation`` also casts the whole model to ``torch_dtype`` (bfloat16 by default).
- ``predict_forward``: greedy generation (no gradients) -> the last hidden state at every generated ``[SEG]`` ->
  ``text_hidden_fcs`` (Linear, ReLU, Linear, Dropout(0) to SAM2's prompt width) -> ``grounding_encoder`` with that
  embedding as the prompt -> mask logits at the grounding resolution -> bilinear resize to the image size ->
  ``sigmoid() > 0.5``. The returned masks are binary; the logits never leave the function.
- The training path (``forward`` / ``_llm_forward`` here, plus ``grounding_encoder.inject_language_embd``) runs the
  same modules with gradients and teacher-forced answers.

Replica-only simplifications: one image tile (no dynamic tiling), the vision tower and SAM2 are tiny, greedy
decoding recomputes the sequence instead of using a KV cache, and ``config.replica_forced_answer`` steers decoding
to the answer a trained Sa2VA gives (random weights never emit ``[SEG]``).
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_sa2va_chat import Sa2VAChatConfig
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM
from .sam2 import SAM2
from .templates import PROMPT_TEMPLATE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DirectResize:
    """Square resize ignoring aspect ratio (Sa2VA's grounding-side preprocessing)."""

    def __init__(self, target_length):
        self.target_length = target_length

    def apply_image(self, image):
        img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
        return np.array(img.resize((self.target_length, self.target_length), Image.BICUBIC))


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["InternVisionModel", "InternLM2DecoderLayer", "Qwen2DecoderLayer", "SAM2"]
    supports_gradient_checkpointing = True

    def __init__(self, config, vision_model=None, language_model=None, use_flash_attn=False):
        super().__init__(config)
        image_size = config.force_image_size or config.vision_config.image_size
        patch_size = config.vision_config.patch_size
        self.patch_size = patch_size
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((image_size // patch_size) ** 2 * (config.downsample_ratio ** 2))
        self.llm_arch_name = config.llm_config.architectures[0]
        config.llm_config._attn_implementation = "eager"  # the public code's choice without flash-attn

        self.vision_model = vision_model or InternVisionModel(config.vision_config)
        if language_model is not None:
            self.language_model = language_model
        elif self.llm_arch_name == "Qwen2ForCausalLM":
            self.language_model = Qwen2ForCausalLM(config.llm_config)
        elif self.llm_arch_name == "InternLM2ForCausalLM":
            self.language_model = InternLM2ForCausalLM(config.llm_config)
        else:
            raise NotImplementedError(f"{self.llm_arch_name} is not implemented")

        vit_hidden = config.vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        shuffled = vit_hidden * int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(shuffled), nn.Linear(shuffled, llm_hidden), nn.GELU(),
                                  nn.Linear(llm_hidden, llm_hidden))

        self.img_context_token_id = None
        self.seg_token_idx = None
        self.template = dict(PROMPT_TEMPLATE[config.template.replace("-", "_")])

        self.grounding_encoder = SAM2(**config.sam2_config)
        out_dim = self.grounding_encoder.hidden_dim
        self.text_hidden_fcs = nn.Sequential(nn.Linear(llm_hidden, llm_hidden), nn.ReLU(inplace=True),
                                             nn.Linear(llm_hidden, out_dim), nn.Dropout(0.0))
        self.init_prediction_config = False
        self.post_init()

    def _init_weights(self, module):
        pass  # PyTorch defaults (seeded by the builder); the LLM initialises itself

    # ------------------------------------------------------------------------------------------------ vision
    def pixel_shuffle(self, x, scale_factor=0.5):
        """Space-to-depth on a B x H x W x C grid: each (1/scale)^2 block becomes one token with more channels."""
        b, h, w, c = x.shape
        r = int(round(1 / scale_factor))
        x = x.reshape(b, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h // r, w // r, r * r * c)

    def extract_feature(self, pixel_values):
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=self.select_layer != -1,
                                return_dict=True)
        vit_embeds = out.last_hidden_state if self.select_layer == -1 else out.hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------------------------------------- training path
    def _splice(self, input_ids, vit_embeds):
        embeds = self.language_model.get_input_embeddings()(input_ids).clone()
        b, n, c = embeds.shape
        flat = embeds.reshape(b * n, c)
        selected = input_ids.reshape(b * n) == self.img_context_token_id
        flat[selected] = vit_embeds.reshape(-1, c).to(flat.dtype)
        return flat.reshape(b, n, c)

    def _llm_forward(self, pixel_values, input_ids, attention_mask=None, position_ids=None,
                     output_hidden_states=True, **_):
        input_embeds = self._splice(input_ids, self.extract_feature(pixel_values))
        out = self.language_model(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, output_hidden_states=output_hidden_states,
                                  use_cache=False, return_dict=True)
        return CausalLMOutputWithPast(logits=out.logits, hidden_states=out.hidden_states)

    def forward(self, data, data_samples=None, mode="loss"):
        return self._llm_forward(pixel_values=data["pixel_values"], input_ids=data["input_ids"],
                                 attention_mask=data.get("attention_mask"), position_ids=data.get("position_ids"))

    # -------------------------------------------------------------------------------------------- inference path
    def preparing_for_generation(self, tokenizer, max_new_tokens=32, torch_dtype=torch.bfloat16):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.torch_dtype = torch_dtype
        self.to(torch_dtype)
        self.extra_image_processor = DirectResize(self.grounding_encoder.sam2_model.image_size)
        self.image_size = self.config.force_image_size or self.config.vision_config.image_size
        self.IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
        self.IMG_START_TOKEN = "<img>"
        self.IMG_END_TOKEN = "</img>"
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(self.IMG_CONTEXT_TOKEN)
        self.seg_token_idx = tokenizer.convert_tokens_to_ids("[SEG]")
        self.init_prediction_config = True

    def _vision_transform(self, image):
        img = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        return (x - mean) / std

    @torch.no_grad()
    def _greedy(self, input_embeds, prompt_len):
        """Greedy decoding (what generate() with do_sample=False does), recomputing the sequence each step."""
        tok = self.tokenizer
        stop = {tok.convert_tokens_to_ids(w) for w in self.template.get("STOP_WORDS", [])}
        stop.discard(None)
        if tok.eos_token_id is not None:
            stop.add(tok.eos_token_id)
        forced = []
        if self.config.replica_forced_answer:
            forced = tok.encode(self.config.replica_forced_answer + self.template.get("SUFFIX", ""),
                                add_special_tokens=False)
        embed = self.language_model.get_input_embeddings()
        generated = []
        for step in range(self.max_new_tokens):
            logits = self.language_model(inputs_embeds=input_embeds, use_cache=False).logits[:, -1]
            token = forced[step] if step < len(forced) else int(logits.argmax(-1))
            generated.append(token)
            if token in stop:
                break
            input_embeds = torch.cat([input_embeds, embed(torch.tensor([[token]], device=input_embeds.device))],
                                     dim=1)
        # hidden states of every generated token taken as input (as generate()'s per-step hidden states)
        out = self.language_model(inputs_embeds=input_embeds, output_hidden_states=True, use_cache=False)
        last = out.hidden_states[-1][0, prompt_len:]
        return generated, last

    @torch.no_grad()
    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        **_):
        if not self.init_prediction_config:
            assert tokenizer is not None
            self.preparing_for_generation(tokenizer=tokenizer)
        if image is None:
            raise NotImplementedError("the replica answers about one image")
        width, height = image.size
        device = self.device
        g_image = self.extra_image_processor.apply_image(np.array(image.convert("RGB")))
        g_pixel = torch.from_numpy(g_image).permute(2, 0, 1).contiguous()
        g_pixel_values = self.grounding_encoder.preprocess_image(g_pixel.to(device), dtype=self.torch_dtype)[None]
        pixel_values = self._vision_transform(image)[None].to(device=device, dtype=self.torch_dtype)

        image_token_str = f"{self.IMG_START_TOKEN}{self.IMG_CONTEXT_TOKEN * self.num_image_token}" \
                          f"{self.IMG_END_TOKEN}"
        text = text.replace("<image>", image_token_str)
        input_text = past_text + self.template["INSTRUCTION"].format(input=text, round=1, bot_name="BOT")
        ids = torch.tensor(self.tokenizer.encode(input_text), device=device)[None]
        input_embeds = self._splice(ids, self.extract_feature(pixel_values))
        generated, last_hidden = self._greedy(input_embeds, ids.shape[1])
        prediction = self.tokenizer.decode(generated, skip_special_tokens=False).strip()

        inputs = torch.tensor(generated[:-1], device=device)  # tokens that were fed back in
        seg_hidden = last_hidden[:len(inputs)][inputs == self.seg_token_idx]
        ret_masks = []
        if len(seg_hidden):
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            for embedding in self.text_hidden_fcs(seg_hidden):
                pred_masks = self.grounding_encoder.language_embd_inference(sam_states, embedding[None, None])
                masks = F.interpolate(pred_masks, size=(height, width), mode="bilinear", align_corners=False)
                masks = masks[:, 0].sigmoid() > 0.5
                ret_masks.append(masks.cpu().numpy())
        return {"prediction": prediction, "prediction_masks": ret_masks}
