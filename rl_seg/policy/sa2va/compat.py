"""Loading a Sa2VA checkpoint's own remote code under the transformers this project runs.

A Sa2VA checkpoint is a Hugging Face folder whose ``config.json`` ``auto_map`` points at Python files beside it
(``modeling_sa2va_chat.py``, ``sam2.py``, ...). That code was written for transformers 4.x (upstream pins 4.57).
Measured with the public remote code (bytedance/Sa2VA ``projects/sa2va/hf``, unmodified): it loads as it is under
transformers 4.56-4.57, and under transformers 5 it breaks in five known ways. rl-seg keeps transformers 5 (the rest
of the stack - peft, DeepSpeed, Ray Train, the default model - is tested on it, and users' environments have it) and
repairs each break here, in memory, at load time. The checkpoint folder and its files are never edited. Each repair
is applied only when the installed transformers needs it, and each has a test that reproduces the break on the
replica in ``tests/sa2va_replica`` first (five breaks the public code shows at load, one found in its tokenizer):

1. ``attn_mask_utils_shim``: ``modeling_sa2va_chat`` imports ``modeling_phi3`` unconditionally, which imports
   ``transformers.modeling_attn_mask_utils`` (removed in 5.0). A stand-in module exists while the remote code is
   imported; its one function raises if a Phi-3 language model (no Sa2VA release has one) ever calls it.
2. ``post_init_on_construction``: ``Sa2VAChatModel`` (and ``Sa2VAChatModelQwen``) never call ``post_init()``, which
   transformers 5 needs (``all_tied_weights_keys``); the class is made to call it at the end of ``__init__``.
3. ``legacy_rope_scaling``: InternLM2's ``_init_rope`` reads ``config.rope_scaling['type']``; transformers 5 turns
   ``rope_scaling=None`` into ``{'rope_type': 'default', ...}``. The InternLM2 config is given the 4.x view of it.
4. ``tied_weights_as_dict``: InternLM2's ``_tied_weights_keys`` is a list; transformers 5 wants ``{target: source}``.
5. ``non_persistent_buffers``: transformers 5 builds the model on the meta device and leaves non-persistent buffers
   that remote code computes in ``__init__`` (InternLM2's rotary ``inv_freq``/``cos_cached``/``sin_cached``)
   uninitialised: the logits become NaN with no error. They are recomputed by building the module tree once more
   with parameters on the meta device (no memory) and real buffers, and copied in.
6. ``slow_sentencepiece_tokenizer``: InternLM2 checkpoints (Sa2VA-8B/26B) ship a sentencepiece tokenizer
   (``tokenization_internlm2.InternLM2Tokenizer``) with a "fast" twin. Under 4.x both encode alike; transformers 5's
   ``AutoTokenizer`` returns the fast one even with ``use_fast=False``, converted by 5.x's own rules, and it encodes
   the prompt into other ids (measured: 4 of 4 test strings differ; "Please segment the blood vessels." -> 12 tokens
   instead of 8), so the [SEG] state would not be the one the checkpoint learnt. The slow class is loaded directly.

Beyond these, loading fails with a message naming the installed versions and the fix (:func:`check_versions`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

__all__ = ["SUPPORTED_TRANSFORMERS", "REPAIRS", "check_versions", "check_remote_code_imports",
           "load_remote_model", "load_tokenizer", "needs_repair", "UnsupportedEnvironment", "quiet_remote_code",
           "attn_mask_utils_shim"]

log = logging.getLogger(__name__)

#: transformers lines Sa2VA remote code is known to load under with rl-seg: (lowest, highest tested, how).
SUPPORTED_TRANSFORMERS = {
    "4": ("4.56.0", "4.57.6", "upstream's own line: the remote code loads as it is"),
    "5": ("5.0.0", "5.24.0", "rl-seg repairs the five known breaks at load time"),
}
#: The Qwen2.5-VL / Qwen3-VL releases import transformers classes that appeared in these versions.
MIN_TRANSFORMERS_FOR = {"Qwen2_5_VLForConditionalGeneration": "4.49.0", "Qwen3VLForConditionalGeneration": "4.57.0",
                        "Qwen3ForCausalLM": "4.56.0"}
#: What the public remote code imports beyond rl-seg's own dependencies (``pip install -e '.[sa2va]'``).
REMOTE_CODE_IMPORTS = ("timm", "einops", "torchvision", "qwen_vl_utils", "sentencepiece")


class UnsupportedEnvironment(RuntimeError):
    """A Sa2VA checkpoint's remote code cannot run in this environment (transformers version, a package missing or
    broken); the message says why and what to do."""


def _version(v: str):
    from packaging.version import Version

    return Version(v)


def transformers_major() -> int:
    import transformers

    return _version(transformers.__version__).major


def needs_repair() -> bool:
    """Whether the installed transformers is a line whose breaks the repairs below exist for."""
    return transformers_major() >= 5


def check_versions(llm_architecture: str | None = None) -> None:
    """Refuse a transformers version the remote code is not known to load under, naming versions and the fix."""
    import transformers

    installed = _version(transformers.__version__)
    fix = (f"install a tested transformers: pip install -c constraints.txt 'transformers=={SUPPORTED_TRANSFORMERS['5'][1]}'"
           f" (or upstream's line: 'transformers=={SUPPORTED_TRANSFORMERS['4'][1]}')")
    line = SUPPORTED_TRANSFORMERS.get(str(installed.major))
    if line is None or not (_version(line[0]) <= installed <= _version(line[1])):
        tested = "; ".join(f"{lo} - {hi} ({how})" for lo, hi, how in SUPPORTED_TRANSFORMERS.values())
        raise UnsupportedEnvironment(f"transformers {installed} is not a version Sa2VA remote code is tested with under rl-seg "
                              f"(tested: {tested}): {fix}")
    needed = MIN_TRANSFORMERS_FOR.get(llm_architecture or "")
    if needed and installed < _version(needed):
        raise UnsupportedEnvironment(f"this checkpoint's {llm_architecture} needs transformers >= {needed}, installed "
                              f"{installed}: {fix}")


def _entry_modules(path: Path) -> set[str]:
    """The remote-code modules ``auto_map`` points at (config.json and tokenizer_config.json)."""
    entries = set()
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        try:
            auto_map = json.loads((path / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError):
            continue
        for ref in auto_map.values():
            for r in (ref if isinstance(ref, (list, tuple)) else [ref]):
                if isinstance(r, str) and "." in r:
                    entries.add(r.split("--")[-1].rsplit(".", 1)[0])
    return entries


def _required_imports(path: Path) -> dict[str, str]:
    """Top-level packages the remote code needs, with the file that imports each: module-level imports of the
    auto_map modules and of the sibling modules they import, followed; imports inside ``try`` (upstream's optional
    flash_attn, apex) are not requirements."""
    import ast

    needed: dict[str, str] = {}
    todo, seen = sorted(_entry_modules(path)), set()
    while todo:
        module = todo.pop()
        src = path / f"{module}.py"
        if module in seen or not src.is_file():
            continue
        seen.add(module)
        try:
            tree = ast.parse(src.read_text())
        except (SyntaxError, UnicodeDecodeError) as exc:
            raise UnsupportedEnvironment(f"{src}: not readable Python ({exc})") from exc
        for node in tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    needed.setdefault(alias.name.split(".")[0], src.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                needed.setdefault(node.module.split(".")[0], src.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                todo.extend([node.module] if node.module else [a.name for a in node.names])
    return needed


def check_remote_code_imports(path: Path) -> None:
    """Fail before loading, naming the package, the file and the fix, when the checkpoint's remote code needs a
    package that is missing or does not import here.

    The case that matters most: PyPI's torchvision wheels are CUDA builds; with a CPU build of torch, ``import
    torchvision`` raises "operator torchvision::nms does not exist" deep inside the remote code (timm imports it).
    """
    import importlib.util

    problems = []
    for name, src in sorted(_required_imports(Path(path)).items()):
        if name in sys.stdlib_module_names:
            continue
        if importlib.util.find_spec(name) is None:
            problems.append(f"{name} (imported by {src}) is not installed")
            continue
        if name not in REMOTE_CODE_IMPORTS:
            continue  # installed; importing it here would only cost time (torch, transformers, numpy, ...)
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the environment's, reported below
            detail = f"{name} (imported by {src}) fails to import: {type(exc).__name__}: {exc}"
            if "does not exist" in str(exc):
                detail += (f" - torch {torch.__version__} and torchvision do not match (PyPI's torchvision is a "
                           f"CUDA build; with a CPU torch install torchvision from https://download.pytorch.org/whl/cpu)")
            problems.append(detail)
    if problems:
        raise UnsupportedEnvironment(f"{path}: the checkpoint's remote code cannot run here: " + "; ".join(problems)
                              + ". Install what Sa2VA's remote code needs with: make sa2va "
                              "(pip install -c constraints.txt -e '.[sa2va]')")


# --- the repairs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Repair:
    name: str
    why: str


REPAIRS = (
    Repair("attn_mask_utils_shim", "modeling_phi3 imports transformers.modeling_attn_mask_utils (gone in 5.0)"),
    Repair("post_init_on_construction", "Sa2VAChatModel never calls post_init(); transformers 5 needs it"),
    Repair("legacy_rope_scaling", "InternLM2 reads rope_scaling['type']; transformers 5 rewrites rope_scaling"),
    Repair("tied_weights_as_dict", "InternLM2's _tied_weights_keys is a list; transformers 5 wants a dict"),
    Repair("non_persistent_buffers", "transformers 5 leaves buffers computed in remote __init__ uninitialised"),
    Repair("slow_sentencepiece_tokenizer", "transformers 5 swaps InternLM2's sentencepiece tokenizer for a fast one "
                                           "that encodes differently"),
)


def _phi3_mask_stand_in(*args, **kwargs):
    raise UnsupportedEnvironment("a Phi-3 language model called transformers.modeling_attn_mask_utils, which transformers 5 "
                          "removed; Phi-3 based checkpoints need transformers 4.57 (no Sa2VA release is one)")


@contextlib.contextmanager
def attn_mask_utils_shim() -> Iterator[None]:
    """Repair 1, for as long as remote code is being imported; gone afterwards, so that nothing else mistakes it
    for the real module."""
    name = "transformers.modeling_attn_mask_utils"
    try:
        importlib.import_module(name)
        yield
        return
    except ModuleNotFoundError:
        pass
    shim = types.ModuleType(name, "rl-seg stand-in for a module transformers 5 removed (Sa2VA's phi3 import)")
    shim._prepare_4d_causal_attention_mask = _phi3_mask_stand_in
    shim._prepare_4d_causal_attention_mask_for_sdpa = _phi3_mask_stand_in
    shim.AttentionMaskConverter = None
    sys.modules[name] = shim
    try:
        yield
    finally:
        if sys.modules.get(name) is shim:
            del sys.modules[name]


def post_init_on_construction(cls: type) -> None:
    """Repair 2: ``cls.__init__`` ends with ``post_init()`` when the original did not call it."""
    if getattr(cls.__init__, "_rl_seg_post_init", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is cls and not hasattr(self, "all_tied_weights_keys"):
            self.post_init()

    __init__._rl_seg_post_init = True
    __init__.__wrapped__ = original
    cls.__init__ = __init__


def tied_weights_as_dict(module_classes: list[type]) -> None:
    """Repair 4: a list of tied parameter names becomes ``{name: input embedding weight}``, which is what the list
    meant in 4.x (output embeddings tied to input embeddings when the config ties them)."""
    for cls in module_classes:
        keys = cls.__dict__.get("_tied_weights_keys")
        if not isinstance(keys, (list, tuple)):
            continue
        embedding = _input_embedding_key(cls)
        cls._tied_weights_keys = {k: embedding for k in keys}


def _input_embedding_key(cls: type) -> str:
    """The input embedding's parameter name, read from the class's own ``get_input_embeddings`` (InternLM2:
    ``return self.model.tok_embeddings``) without building a model."""
    import inspect
    import re

    try:
        found = re.search(r"return\s+self\.([\w.]+)", inspect.getsource(cls.get_input_embeddings))
    except (OSError, TypeError, AttributeError):
        found = None
    return f"{found.group(1)}.weight" if found else "model.tok_embeddings.weight"


class _LegacyRopeView:
    """Mixin for a config whose remote code reads ``rope_scaling`` in the 4.x format (``None`` or ``{'type', 'factor'}``)
    while transformers 5 stores ``rope_parameters``."""

    @property
    def rope_scaling(self):  # noqa: D401 - the 4.x attribute
        params = getattr(self, "rope_parameters", None) or {}
        kind = params.get("type") or params.get("rope_type")
        if kind in (None, "default"):
            return None
        return {"type": kind, "factor": float(params.get("factor", 1.0))}

    @rope_scaling.setter
    def rope_scaling(self, value):
        type(self)._rl_seg_base_rope_scaling.fset(self, value)


def legacy_rope_scaling(llm_config) -> None:
    """Repair 3: give an InternLM2 config the 4.x ``rope_scaling`` view (class swap on this one instance)."""
    cls = type(llm_config)
    if isinstance(llm_config, _LegacyRopeView) or "rope_scaling" not in dir(cls):
        return
    prop = getattr(cls, "rope_scaling", None)
    if not isinstance(prop, property):  # a plain attribute: 4.x semantics already
        return
    view = type(cls.__name__, (_LegacyRopeView, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                       "_rl_seg_base_rope_scaling": prop})
    llm_config.__class__ = view


def restore_non_persistent_buffers(model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> list[str]:
    """Repair 5: copy every non-persistent buffer from a skeleton (parameters on the meta device, buffers real) into
    ``model``, keeping each loaded buffer's device and dtype. Returns the names copied."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        skeleton = build()
    fixed = []
    reference = dict(_non_persistent_buffers(skeleton))
    for name, buf in _non_persistent_buffers(model):
        ref = reference.get(name)
        if ref is None or ref.shape != buf.shape or ref.is_meta:
            continue
        with torch.no_grad():
            buf.copy_(ref.to(device=buf.device, dtype=buf.dtype))
        fixed.append(name)
    del skeleton
    return fixed


def _non_persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, sub in module.named_modules():
        for name in getattr(sub, "_non_persistent_buffers_set", ()):
            buf = sub._buffers.get(name)
            if buf is not None:
                yield (f"{prefix}.{name}" if prefix else name), buf


# --- loading --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_remote_code() -> Iterator[None]:
    """Upstream's remote code prints while it is imported and built ("FlashAttention is not installed.", its
    configs echo themselves) and makes transformers warn about its classes: into the log, not onto the console."""
    from transformers.utils import logging as hf_logging

    buffer = io.StringIO()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # remote modules log under "transformers_modules.<folder>...", outside transformers' own logger tree
    remote = logging.getLogger("transformers_modules")
    remote_level = remote.level
    remote.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        hf_logging.set_verbosity(level)
        remote.setLevel(remote_level)
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("remote code: %s", line)


def _remote_classes(model_cls: type) -> list[type]:
    """Every class defined in the checkpoint's dynamic modules (the package ``model_cls`` was imported from)."""
    package = model_cls.__module__.rsplit(".", 1)[0]
    out = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == package or name.startswith(package + ".")):
            continue
        out.extend(v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == name)
    return out


def load_remote_model(path: str | Path, dtype: torch.dtype | None = None, skip: tuple[str, ...] = (),
                      **load_kwargs):
    """``AutoModel.from_pretrained(path, trust_remote_code=True)`` with the repairs above where needed (``skip``
    names repairs to leave out: the tests show each one is needed).

    Returns ``(model, config, applied)``: ``applied`` names the repairs that changed something.
    """
    from transformers import AutoConfig, PreTrainedModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    path = Path(path)
    applied: list[str] = []
    unknown = set(skip) - {r.name for r in REPAIRS}
    if unknown:
        raise ValueError(f"unknown repairs {sorted(unknown)}; known: {[r.name for r in REPAIRS]}")
    repairing = needs_repair()

    def wanted(name: str) -> bool:
        return repairing and name not in skip

    shim = attn_mask_utils_shim() if wanted("attn_mask_utils_shim") else contextlib.nullcontext()
    with quiet_remote_code(), shim:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
        auto_map = getattr(config, "auto_map", None) or {}
        reference = auto_map.get("AutoModel") or auto_map.get("AutoModelForCausalLM")
        if not reference:
            raise UnsupportedEnvironment(f"{path / 'config.json'}: auto_map names no AutoModel class")
        model_cls = get_class_from_dynamic_module(reference, str(path))
        if wanted("post_init_on_construction") and "post_init" not in _init_source(model_cls):
            post_init_on_construction(model_cls)
            applied.append("post_init_on_construction")
        if wanted("tied_weights_as_dict"):
            listed = [c for c in _remote_classes(model_cls) if issubclass(c, PreTrainedModel)
                      and isinstance(c.__dict__.get("_tied_weights_keys"), (list, tuple))]
            if listed:
                tied_weights_as_dict(listed)
                applied.append("tied_weights_as_dict")
        llm_config = getattr(config, "llm_config", None)
        if wanted("legacy_rope_scaling") and llm_config is not None and \
                type(llm_config).__module__.startswith("transformers_modules"):
            legacy_rope_scaling(llm_config)
            applied.append("legacy_rope_scaling")
        stand_in = sys.modules.get("transformers.modeling_attn_mask_utils")
        if getattr(stand_in, "_prepare_4d_causal_attention_mask", None) is _phi3_mask_stand_in:
            applied.append("attn_mask_utils_shim")
        kwargs = dict(load_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = model_cls.from_pretrained(str(path), config=config, **kwargs)
        if wanted("non_persistent_buffers"):
            def build():
                previous = torch.get_default_dtype()
                torch.set_default_dtype(dtype if dtype is not None and dtype.is_floating_point else previous)
                try:
                    return model_cls(config)
                finally:
                    torch.set_default_dtype(previous)

            if restore_non_persistent_buffers(model, build):
                applied.append("non_persistent_buffers")
    if applied:
        log.info("%s: loaded with transformers-5 repairs %s", path, ", ".join(applied))
    return model, config, applied


def load_tokenizer(path: str | Path, skip: tuple[str, ...] = ()):
    """The checkpoint's tokenizer as its own code builds it under 4.x (repair 6 under transformers 5)."""
    from transformers import AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    path = Path(path)
    with quiet_remote_code(), attn_mask_utils_shim():
        slow = _remote_slow_tokenizer(path)
        if slow and needs_repair() and "slow_sentencepiece_tokenizer" not in skip:
            tokenizer = get_class_from_dynamic_module(slow, str(path)).from_pretrained(str(path))
            log.info("%s: tokenizer %s loaded directly (transformers 5 would convert it)", path, slow)
            return tokenizer
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


def _remote_slow_tokenizer(path: Path) -> str | None:
    """``tokenizer_config.json``'s remote slow tokenizer class (``auto_map.AutoTokenizer[0]``), if there is one."""
    try:
        auto_map = json.loads((path / "tokenizer_config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError):
        return None
    entry = auto_map.get("AutoTokenizer")
    slow = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    return slow if isinstance(slow, str) and "." in slow else None


def _init_source(cls: type) -> str:
    import inspect

    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    try:
        return inspect.getsource(init)
    except (OSError, TypeError):
        return ""
