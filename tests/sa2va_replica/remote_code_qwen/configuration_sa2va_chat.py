"""Replica of the Sa2VA-Qwen releases' ``configuration_sa2va_chat.py`` (written here, not copied).

Facts it follows (bytedance/Sa2VA, ``projects/sa2va/hf/models_qwen2_5_vl`` and ``models_qwen3vl``): the config
class is transformers' own Qwen-VL config with ``model_type = "sa2va_chat"`` and one extra field, ``template``,
which ``to_dict`` writes out. This file is the Qwen2.5-VL flavour; ``build_qwen.py`` writes the Qwen3-VL release's
file from it by swapping the transformers config class, which is the only way the two upstream files differ.

Replica-only fields (``replica_forced_answer``, ``replica_sam2_size``) need no code here: like any unknown key they
ride through ``PretrainedConfig``'s ``**kwargs`` as attributes, exactly as they would with the upstream class.
"""

import copy  # noqa: F401  (upstream's import surface, kept so an import failure surfaces as upstream's does)

import transformers  # noqa: F401
from transformers import Qwen2Config  # noqa: F401
from transformers.configuration_utils import PretrainedConfig  # noqa: F401
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)


class Sa2VAChatConfigQwen(Qwen2_5_VLConfig):
    model_type = "sa2va_chat"

    def __init__(self, template=None, **kwargs):
        super().__init__(**kwargs)
        self.template = template

    def to_dict(self):
        out = super().to_dict()
        out["template"] = self.template
        return out
