"""Replica of InternLM2's slow tokenizer (``tokenization_internlm2.py``, shipped with Sa2VA-8B/26B and named by
their tokenizer_config.json ``auto_map``), written for rl-seg's tests: a sentencepiece BPE model
(``tokenizer.model``) wrapped as a transformers ``PreTrainedTokenizer`` with the public class's behaviour: a BOS
token prepended (``add_bos_token``), special tokens kept out of sentencepiece when decoding, no prefix space
added or removed."""

import os
from shutil import copyfile
from typing import Any, Dict, List, Optional, Tuple

import sentencepiece as spm
from transformers.tokenization_utils import PreTrainedTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "./tokenizer.model"}
PRETRAINED_VOCAB_FILES_MAP = {}


class InternLM2Tokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    pretrained_vocab_files_map = PRETRAINED_VOCAB_FILES_MAP
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 sp_model_kwargs: Optional[Dict[str, Any]] = None, add_bos_token=True, add_eos_token=False,
                 decode_with_prefix_space=False, clean_up_tokenization_spaces=False, **kwargs):
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space
        # the sentencepiece model must exist before the base class registers the added tokens
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        self._no_prefix_space_tokens = None
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def no_prefix_space_tokens(self):
        """Ids of the pieces that do not start a word (no leading '▁')."""
        if self._no_prefix_space_tokens is None:
            pieces = self.convert_ids_to_tokens(list(range(self.vocab_size)))
            self._no_prefix_space_tokens = {i for i, piece in enumerate(pieces) if not piece.startswith("▁")}
        return self._no_prefix_space_tokens

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.sp_model.eos_id()

    def get_vocab(self):
        vocab = {self.convert_ids_to_tokens(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.IdToPiece(index)

    def _maybe_add_prefix_space(self, tokens, decoded):
        if tokens and tokens[0] not in self.no_prefix_space_tokens:
            return " " + decoded
        return decoded

    def convert_tokens_to_string(self, tokens):
        """Runs of ordinary pieces are decoded by sentencepiece; special tokens are inserted verbatim (a space
        before the first of a run). The first character of the result is dropped."""
        out, pending, prev_special = "", [], False
        for token in tokens:
            if token in self.all_special_tokens:
                if not prev_special:
                    out += " "
                out += self.sp_model.decode(pending) + token
                prev_special, pending = True, []
            else:
                pending.append(token)
                prev_special = False
        out += self.sp_model.decode(pending)
        out = self._maybe_add_prefix_space(tokens=tokens, decoded=self.clean_up_tokenization(out))
        return out[1:]

    def save_vocabulary(self, save_directory, filename_prefix: Optional[str] = None) -> Tuple[str]:
        if not os.path.isdir(save_directory):
            logger.error(f"Vocabulary path ({save_directory}) should be a directory")
            return
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                              + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.abspath(self.vocab_file) != os.path.abspath(target) and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, target)
        elif not os.path.isfile(self.vocab_file):
            with open(target, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (target,)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        output = ([self.bos_token_id] if self.add_bos_token else []) + token_ids_0
        if token_ids_1 is not None:
            output = output + token_ids_1
        if self.add_eos_token:
            output = output + [self.eos_token_id]
        return output

    def get_special_tokens_mask(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None,
                                already_has_special_tokens: bool = False) -> List[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0=token_ids_0, token_ids_1=token_ids_1,
                                                   already_has_special_tokens=True)
        # as upstream: framed by 1s whatever add_bos_token/add_eos_token say
        if token_ids_1 is None:
            return [1] + [0] * len(token_ids_0) + [1]
        return [1] + [0] * len(token_ids_0) + [1, 1] + [0] * len(token_ids_1) + [1]

    def create_token_type_ids_from_sequences(self, token_ids_0: List[int],
                                             token_ids_1: Optional[List[int]] = None) -> List[int]:
        n = len(token_ids_0) + 1 if token_ids_1 is None else len(token_ids_0) + len(token_ids_1) + 2
        return [0] * n
