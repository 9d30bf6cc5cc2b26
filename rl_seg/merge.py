"""Folding a LoRA adapter into its base policy (`rl-seg merge`): a plain checkpoint that needs no peft.

The base comes from the adapter itself: peft writes ``base_model_name_or_path`` into ``adapter_config.json`` from
the wrapped policy's ``name_or_path`` (which ``load_policy`` and ``from_pretrained`` set: ``default`` for the
shipped model, the folder for a checkpoint). ``policy=`` overrides it, e.g. for an adapter attached to a freshly
built model, whose config has no base recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MergeError", "adapter_base", "merge_adapter_dir"]

BASE_FIELD = "base_model_name_or_path"


class MergeError(ValueError):
    """An adapter folder or base policy that cannot be merged; the message names the file (and field)."""


def adapter_base(adapter_dir: str | Path) -> str:
    """The base policy recorded in an adapter folder's ``adapter_config.json``."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise MergeError(f"{config} does not exist: {adapter_dir} is not a PEFT adapter folder")
    try:
        values = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MergeError(f"{config} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise MergeError(f"{config} does not hold a JSON object")
    base = values.get(BASE_FIELD)
    if not base or not isinstance(base, str):
        raise MergeError(f"{config}: field {BASE_FIELD!r} is missing or empty ({base!r}), so the base policy is "
                         "unknown; name it with --policy (a registered name such as 'default' or a checkpoint folder)")
    return base


def merge_adapter_dir(adapter_dir: str | Path, out_dir: str | Path, policy: str | Path | None = None,
                      trust_remote_code: bool = False) -> Path:
    """Load the base policy, apply the adapter in ``adapter_dir``, merge it and ``save_pretrained(out_dir)``.

    ``policy`` (a registered name or a checkpoint folder) overrides the adapter's ``base_model_name_or_path``.
    The result loads with ``load_policy(out_dir)`` and computes what base + adapter computed. A base with remote
    code loads only with ``trust_remote_code``.
    """
    from .policy import load_policy
    from .policy.base import RemoteCodeError
    from .policy.default_model import DEFAULT_CHECKPOINT
    from .policy.lora import load_adapter, merge_adapter

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise MergeError(f"{config} does not exist: {adapter_dir} is not a PEFT adapter folder")
    base = str(policy) if policy is not None else adapter_base(adapter_dir)
    source = "--policy" if policy is not None else f"{config} field {BASE_FIELD!r}"

    protected = {adapter_dir.resolve(), DEFAULT_CHECKPOINT.resolve()}
    if Path(base).is_dir():
        protected.add(Path(base).resolve())
    if out_dir.resolve() in protected:
        raise MergeError(f"refusing to write the merged policy into {out_dir}: it is the adapter or the base "
                         "checkpoint; choose another --out")

    try:
        model = load_policy(base, trust_remote_code=trust_remote_code)
    except RemoteCodeError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise MergeError(f"base policy {base!r} (from {source}) cannot be loaded: {exc}") from exc
    try:
        peft_model = load_adapter(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = str(exc).splitlines()
        detail = "\n".join(lines[:4]) + (f"\n\t... ({len(lines) - 4} more lines)" if len(lines) > 4 else "")
        raise MergeError(f"adapter {adapter_dir} does not fit base policy {base!r} (from {source}): {detail}") from exc
    merged = merge_adapter(peft_model)
    merged.eval()
    return merged.save_pretrained(out_dir)
