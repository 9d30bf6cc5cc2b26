"""Chat templates the replica's ``predict_forward`` formats prompts with.

The strings are the public xtuner/Sa2VA ``PROMPT_TEMPLATE`` formats for the two LLM families (facts about the
prompt format, which any Sa2VA-compatible model must reproduce token for token).
"""

PROMPT_TEMPLATE = {
    "qwen_chat": {
        "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
        "SUFFIX_AS_EOS": True,
        "SEP": "\n",
        "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"],
    },
    "internlm2_chat": {
        "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
        "SUFFIX_AS_EOS": True,
        "SEP": "\n",
        "STOP_WORDS": ["<|im_end|>"],
    },
}
