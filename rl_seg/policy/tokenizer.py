"""The default model's tokenizer, built in code (no download), and its Sa2VA-style conversation.

A word-level vocabulary is enough: the model only ever reads segmentation requests and answers "Sure, [SEG].".
Special tokens follow Sa2VA / InternVL: the image stands in the text as ``<img>`` + N x ``<IMG_CONTEXT>`` +
``</img>``, each context slot replaced by one image token embedding, and the chat turns use Qwen2's
``<|im_start|>`` / ``<|im_end|>``.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["IMG_CONTEXT", "SPECIAL_TOKENS", "build_tokenizer", "conversation"]

IMG_START, IMG_END, IMG_CONTEXT, SEG = "<img>", "</img>", "<IMG_CONTEXT>", "[SEG]"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT, SEG]

# Words of the requests users send (lower-cased by the normalizer); anything else maps to <unk>.
WORDS = """
user assistant system please segment the a an all of in this image picture photo blood vessel vessels vessel's
retinal retina fundus coronary artery arteries arterial angiogram angiography x-ray xray thin thick small large
main branch branches tree mask masks find show outline highlight mark sure it is are and or , . ? ! : ;
""".split()


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[2:]})
    return tokenizer


def conversation(prompt: str, num_image_tokens: int) -> str:
    """One teacher-forced exchange: the user's request with the image, and the answer that holds [SEG]."""
    image = IMG_START + IMG_CONTEXT * num_image_tokens + IMG_END
    return (f"<|im_start|>user\n{image}\n{prompt}<|im_end|>\n"
            f"<|im_start|>assistant\nSure, {SEG}.<|im_end|>")
