"""Chat formats (xtuner's ``PROMPT_TEMPLATE`` entries) Sa2VA's ``predict_forward`` formats prompts with, keyed as in
the public ``templates.py``: ``config.template`` names one (``qwen_chat`` for the Qwen2-based releases,
``internlm2_chat`` for Sa2VA-8B/26B). The strings are the prompt formats themselves (facts a compatible model must
reproduce token for token). Only the InternVL-family LLMs' formats are here; the public file also lists formats of
unrelated LLMs (baichuan, chatglm, deepseek, ...), which no Sa2VA release uses."""

_IM_TURNS = {
    "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
    "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    "SUFFIX": "<|im_end|>",
    "SUFFIX_AS_EOS": True,
    "SEP": "\n",
}

PROMPT_TEMPLATE = {
    "default": {"SYSTEM": "<|System|>:{system}\n", "INSTRUCTION": "<|User|>:{input}\n<|Bot|>:", "SEP": "\n"},
    "internlm_chat": {"SYSTEM": "<|System|>:{system}\n", "INSTRUCTION": "<|User|>:{input}<eoh>\n<|Bot|>:",
                      "SUFFIX": "<eoa>", "SUFFIX_AS_EOS": True, "SEP": "\n", "STOP_WORDS": ["<eoa>"]},
    "internlm2_chat": {**_IM_TURNS, "STOP_WORDS": ["<|im_end|>"]},
    "qwen_chat": {**_IM_TURNS, "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"]},
    "llama3_chat": {
        "SYSTEM": "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        "INSTRUCTION": "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "SUFFIX": "<|eot_id|>", "SUFFIX_AS_EOS": True, "STOP_WORDS": ["<|eot_id|>"]},
    "phi3_chat": {"SYSTEM": "<|system|>\n{system}<|end|>\n", "INSTRUCTION": "<|user|>\n{input}<|end|>\n<|assistant|>\n",
                  "SUFFIX": "<|end|>", "SUFFIX_AS_EOS": True, "SEP": "\n", "STOP_WORDS": ["<|end|>"]},
}
