"""Shipped LoRA adapters: ``rl_seg/assets/adapters/<name>/``, usable by name (``rl-seg eval --adapter <name>``).

Each folder is a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) of a shipped policy, with
its model card: ``README.md`` (how it was trained: the exact command, data and iterations, and its test
metrics) and ``eval.json`` (the same numbers, machine-readable), both written by ``benchmarks/adapter_card.py``,
and ``train_config.yaml``, the run's full config (``rl-seg train --config`` on it repeats the run).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ADAPTERS_DIR", "shipped_adapters", "resolve_adapter", "CARD_JSON"]

ADAPTERS_DIR = Path(__file__).resolve().parent / "assets" / "adapters"
CARD_JSON = "eval.json"


def shipped_adapters() -> list[str]:
    """Names of the adapters that ship with rl-seg."""
    if not ADAPTERS_DIR.is_dir():
        return []
    return sorted(p.name for p in ADAPTERS_DIR.iterdir() if (p / "adapter_config.json").is_file())


def resolve_adapter(name_or_path: str | Path) -> Path:
    """An adapter folder, or the name of a shipped adapter; a clear error naming both places otherwise."""
    path = Path(name_or_path)
    if (path / "adapter_config.json").is_file():
        return path
    shipped = ADAPTERS_DIR / str(name_or_path)
    if path.name == str(name_or_path) and (shipped / "adapter_config.json").is_file():
        return shipped
    names = ", ".join(shipped_adapters()) or "none yet"
    raise FileNotFoundError(f"adapter {str(name_or_path)!r}: neither a PEFT adapter folder (no "
                            f"{path / 'adapter_config.json'}) nor a shipped adapter (shipped: {names})")
