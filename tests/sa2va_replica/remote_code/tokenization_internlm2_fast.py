"""Replica of InternLM2's fast tokenizer (``tokenization_internlm2_fast.py``), written for rl-seg's tests: the
slow tokenizer's sentencepiece BPE converted to a ``tokenizers`` BPE with byte fallback (InternLM2's converter:
<unk>/<s>/</s> first, pieces renamed by ``added_tokens_decoder``, '▁' for spaces, no pre-tokenizer), and a
post-processor that adds BOS (and EOS when asked)."""

import os
from shutil import copyfile
from typing import Any, Dict, Optional, Tuple

from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS, SentencePieceExtractor, SpmConverter
from transformers.tokenization_utils_fast import PreTrainedTokenizerFast
from transformers.utils import logging

from .tokenization_internlm2 import InternLM2Tokenizer

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "./tokenizer.model"}


class InternLM2Converter(SpmConverter):
    handle_byte_fallback = True

    def vocab(self, proto):
        return [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(p.piece, p.score) for p in proto.pieces[3:]]

    def unk_id(self, proto):
        return 0

    def decoder(self, replacement, add_prefix_space):
        return decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                  decoders.Strip(content=" ", left=1)])

    def tokenizer(self, proto):
        vocab_scores = self.vocab(proto)
        added = self.original_tokenizer.added_tokens_decoder
        vocab_scores = [(added[i].content, score) if i in added else (piece, score)
                        for i, (piece, score) in enumerate(vocab_scores)]
        model_type = proto.trainer_spec.model_type
        if model_type == 1:
            raise RuntimeError("InternLM2 is supposed to be a BPE model!")
        if model_type != 2:
            raise Exception("You're trying to run a `Unigram` model but you're file was trained with a different "
                            "algorithm")
        _, merges = SentencePieceExtractor(self.original_tokenizer.vocab_file).extract(vocab_scores)
        tokenizer = Tokenizer(BPE({piece: i for i, (piece, _) in enumerate(vocab_scores)}, merges,
                                  unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=True))
        tokenizer.add_special_tokens(list(added.values()))
        return tokenizer

    def normalizer(self, proto):
        steps = [normalizers.Prepend(prepend="▁")] if proto.normalizer_spec.add_dummy_prefix else []
        return normalizers.Sequence(steps + [normalizers.Replace(pattern=" ", content="▁")])

    def pre_tokenizer(self, replacement, add_prefix_space):
        return None


SLOW_TO_FAST_CONVERTERS["InternLM2Tokenizer"] = InternLM2Converter


class InternLM2TokenizerFast(PreTrainedTokenizerFast):
    vocab_files_names = VOCAB_FILES_NAMES
    slow_tokenizer_class = InternLM2Tokenizer
    padding_side = "left"
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 sp_model_kwargs: Optional[Dict[str, Any]] = None, add_bos_token=True, add_eos_token=False,
                 decode_with_prefix_space=False, clean_up_tokenization_spaces=False, **kwargs):
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, sp_model_kwargs=sp_model_kwargs, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, decode_with_prefix_space=decode_with_prefix_space,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        self.update_post_processor()
        self.vocab_file = vocab_file

    @property
    def can_save_slow_tokenizer(self) -> bool:
        return os.path.isfile(self.vocab_file) if self.vocab_file else False

    def update_post_processor(self):
        """BOS before (and EOS after, when asked) each sequence, through the fast tokenizer's post-processor."""
        bos, eos = self.bos_token, self.eos_token
        if bos is None and self.add_bos_token:
            raise ValueError("add_bos_token = True but bos_token = None")
        if eos is None and self.add_eos_token:
            raise ValueError("add_eos_token = True but eos_token = None")
        head = f"{bos}:0 " if self.add_bos_token else ""
        single = f"{head}$A:0" + (f" {eos}:0" if self.add_eos_token else "")
        pair = f"{single}" + (f" {bos}:1" if self.add_bos_token else "") + " $B:1" + (
            f" {eos}:1" if self.add_eos_token else "")
        special = ([(bos, self.bos_token_id)] if self.add_bos_token else []) + (
            [(eos, self.eos_token_id)] if self.add_eos_token else [])
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                       special_tokens=special)

    @property
    def add_eos_token(self):
        return self._add_eos_token

    @property
    def add_bos_token(self):
        return self._add_bos_token

    @add_eos_token.setter
    def add_eos_token(self, value):
        self._add_eos_token = value
        self.update_post_processor()

    @add_bos_token.setter
    def add_bos_token(self, value):
        self._add_bos_token = value
        self.update_post_processor()

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        if not self.can_save_slow_tokenizer:
            raise ValueError("Your fast tokenizer does not have the necessary information to save the vocabulary "
                             "for a slow tokenizer.")
        if not os.path.isdir(save_directory):
            logger.error(f"Vocabulary path ({save_directory}) should be a directory")
            return
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                              + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            copyfile(self.vocab_file, target)
        return (target,)
