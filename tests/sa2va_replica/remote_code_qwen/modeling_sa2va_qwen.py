"""Replica of the Sa2VA-Qwen releases' ``modeling_sa2va_qwen.py`` (``Sa2VAChatModelQwen``), written here, not copied.

Same module/attribute names, checkpoint keys, call flow and numerics as the public code (bytedance/Sa2VA,
``projects/sa2va/hf/models_qwen2_5_vl`` and ``models_qwen3vl``), quirks included:

- ``self.model`` is transformers' own ``Qwen2_5_VLForConditionalGeneration`` (Qwen3-VL release:
  ``Qwen3VLForConditionalGeneration``; ``build_qwen.py`` writes that file by swapping the class names), built from
  the Sa2VA config itself. Keys: ``model.model.visual.*``, ``model.model.language_model.*``, ``model.lm_head.weight``,
  ``grounding_encoder.sam2_model.*``, ``text_hidden_fcs.{0,2}.*``.
- ``__init__`` never calls ``post_init()``; there is no ``forward`` (calling the model raises nn.Module's
  NotImplementedError); ``torch_dtype`` is a plain attribute fixed to bfloat16 and the model is never cast to it.
- ``predict_forward`` needs the checkpoint's processor: the chat template comes from
  ``processor.apply_chat_template``, images go through ``qwen_vl_utils.process_vision_info`` (its own default
  resize to multiples of 28) and then the processor with ``min_pixels=512*28*28`` / ``max_pixels=2048*28*28``
  (28 also for Qwen3-VL, whose patches are 16 px). The grounding image is a 1024 x 1024 ``DirectResize`` (PIL's
  default resample, through torchvision's ``to_pil_image(..., mode="RGB")``), cast to bfloat16 before SAM2's
  normalisation and never moved to the model's device.
- generation: ``self.model.generate(max_new_tokens=2048, do_sample=False, output_hidden_states=True,
  return_dict_in_generate=True)``; the ``[SEG]`` embedding is the last layer's hidden state at every position of
  ``sequences[0][:-1]`` that holds ``[SEG]`` (prompt included), i.e. the state computed when ``[SEG]`` was the input.
  It goes through ``text_hidden_fcs`` and SAM2's ``language_embd_inference``; the logits are resized bilinearly to
  the image size and returned binarized (``sigmoid() > 0.5``).

Documented deviations (replica only, both read from config.json and absent from released checkpoints):

- ``SAM2(size=getattr(config, "replica_sam2_size", "hiera_l"))``: upstream hard-codes ``SAM2()`` (Hiera-L); the
  replica's SAM2 takes a size, "tiny" for the CPU tests (absent = upstream's).
- ``config.replica_forced_answer``: random weights never say ``[SEG]``, so when set, ``predict_forward`` hands
  ``generate`` a logits processor that forces this answer followed by the end-of-turn token; everything else
  (hidden states, KV cache, decoding) is generate's own path.
"""

# upstream's imports in upstream's order, so that a missing or broken package (torchvision, qwen_vl_utils) or a
# transformers without these classes fails here as it fails there
import torch
from torch import nn
from transformers import (  # noqa: F401  (upstream imports all four)
    AutoModel,
    GenerationConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_utils import PreTrainedModel

from .configuration_sa2va_chat import Sa2VAChatConfigQwen
from .sam2 import SAM2

import numpy as np
from torchvision.transforms.functional import to_pil_image

import torch.nn.functional as F

from qwen_vl_utils import process_vision_info


class DirectResize:
    """Square resize that ignores the aspect ratio (the grounding branch's input)."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        pil = to_pil_image(image, mode="RGB")
        return np.array(pil.resize((self.target_length, self.target_length)))


class ReplicaForcedAnswer(LogitsProcessor):
    """Replica only: makes greedy decoding emit ``token_ids`` one per step, then leaves the logits alone."""

    def __init__(self, token_ids):
        self.token_ids = list(token_ids)
        self.prompt_length = None

    def __call__(self, input_ids, scores):
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        if step >= len(self.token_ids):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_ids[step]] = 0.0
        return forced


class Sa2VAChatModelQwen(PreTrainedModel):
    config_class = Sa2VAChatConfigQwen
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLDecoderLayer", "SAM2"]
    _supports_flash_attn_2 = True
    supports_gradient_checkpointing = True

    def __init__(self, config: Sa2VAChatConfigQwen, model=None, use_flash_attn=True):
        super().__init__(config)
        self.extra_image_processor = DirectResize(target_length=1024)
        self.min_pixels = 512 * 28 * 28
        self.max_pixels = 2048 * 28 * 28
        self.torch_dtype = torch.bfloat16
        self.model = model if model is not None else Qwen2_5_VLForConditionalGeneration(config)

        llm_width = config.text_config.hidden_size
        self.grounding_encoder = SAM2(size=getattr(config, "replica_sam2_size", "hiera_l"))
        prompt_width = self.grounding_encoder.hidden_dim
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(llm_width, llm_width), nn.ReLU(inplace=True),
            nn.Linear(llm_width, prompt_width), nn.Dropout(0.0),
        )

    @property
    def lm_head(self):
        return self.model.lm_head

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def _replica_generate_kwargs(self):
        answer = getattr(self.config, "replica_forced_answer", None)
        if not answer:
            return {}
        eos = self.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        ids = self.processor.tokenizer.encode(answer, add_special_tokens=False)
        if eos is not None:
            ids.append(eos)
        return {"logits_processor": LogitsProcessorList([ReplicaForcedAnswer(ids)])}

    def _chat_inputs(self, messages, with_vision):
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not with_vision:
            inputs = self.processor(text=[prompt], images=None, videos=None, padding=True, return_tensors="pt")
            return inputs.to(self.device)
        image_inputs, video_inputs = process_vision_info(messages)
        inputs = self.processor(text=[prompt], images=image_inputs, videos=video_inputs, padding=True,
                                return_tensors="pt", min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return inputs.to(self.device)

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None):
        assert processor is not None
        self.processor = processor
        self.seg_token_idx = self.processor.tokenizer.convert_tokens_to_ids("[SEG]")
        text = text.replace("<image>", "")
        text_only = image is None and video is None and "<image>" not in past_text

        if text_only:
            messages = [{"role": "user", "content": [{"type": "text", "text": past_text + text}]}]
            mm_inputs = self._chat_inputs(messages, with_vision=False)
            ret_masks = []
        elif video is not None:
            grounding_frames = []
            content = []
            ori_image_size = video[0].size
            for frame_idx, frame in enumerate(video):
                resized = self.extra_image_processor.apply_image(np.array(frame))
                grounding_frames.append(torch.from_numpy(resized).permute(2, 0, 1).contiguous())
                if frame_idx < 5:
                    content.append({"type": "image", "image": frame})
            content.append({"type": "text", "text": text})
            messages = [{"role": "user", "content": content}]
            mm_inputs = self._chat_inputs(messages, with_vision=True)
            g_pixel_values = torch.stack([self.grounding_encoder.preprocess_image(frame)
                                          for frame in grounding_frames]).to(self.torch_dtype)
            num_frames = min(5, len(video))
            ret_masks = []
        else:
            ori_image_size = image.size
            resized = self.extra_image_processor.apply_image(np.array(image))
            grounding = torch.from_numpy(resized).permute(2, 0, 1).contiguous().to(self.torch_dtype)
            g_pixel_values = torch.stack([self.grounding_encoder.preprocess_image(grounding)]).to(self.torch_dtype)
            messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": text}]}]
            mm_inputs = self._chat_inputs(messages, with_vision=True)
            num_frames = 1
            ret_masks = []

        generate_output = self.model.generate(**mm_inputs, max_new_tokens=2048, do_sample=False,
                                              output_hidden_states=True, return_dict_in_generate=True,
                                              **self._replica_generate_kwargs())
        new_tokens = [out[len(prompt):] for prompt, out in zip(mm_inputs.input_ids, generate_output.sequences)]
        predict = self.processor.batch_decode(new_tokens, skip_special_tokens=False)[0].strip()
        if text_only:
            return {"prediction": predict, "prediction_masks": ret_masks}

        # one entry per generate step: the step's last-layer states for the tokens fed in at that step
        last_hidden_states = torch.cat([step[-1][0] for step in generate_output.hidden_states], dim=0)
        seg_hidden_states = get_seg_hidden_states(last_hidden_states, generate_output.sequences[0][:-1],
                                                  seg_id=self.seg_token_idx)
        for prompt_embedding in self.text_hidden_fcs(seg_hidden_states):
            prompt_embedding = prompt_embedding.unsqueeze(0)
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred_masks = self.grounding_encoder.language_embd_inference(sam_states, [prompt_embedding] * num_frames)
            w, h = ori_image_size
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)
            masks = masks[:, 0].sigmoid() > 0.5
            ret_masks.append(masks.cpu().numpy())
        return {"prediction": predict, "prediction_masks": ret_masks}


def get_seg_hidden_states(hidden_states, output_ids, seg_id):
    """Rows of ``hidden_states`` (aligned to the end of ``output_ids``) whose token is ``seg_id``."""
    is_seg = output_ids == seg_id
    if len(is_seg) == 0:
        return hidden_states[0:0]
    return hidden_states[-len(is_seg):][is_seg]
