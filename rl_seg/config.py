"""Typed configs: dataclasses merged from a YAML file and ``key=value`` command-line overrides.

Every field carries a help string (``field(metadata={"help": ...})``), ``rl-seg <cmd> --help-config`` prints
them, and each run saves its resolved config beside its results. Nested dataclasses are addressed with dotted
keys (``lora.r=32``); values are parsed as YAML (``data=[drive,arcade]``, ``lr=3e-4``, ``resume=true``).

Bounds sit next to the fields they bound, in the same metadata: ``min`` / ``max`` (inclusive), ``gt`` / ``lt``
(exclusive), ``choices``. They are checked as a config is built, before its own cross-field checks
(``__post_init__``) run, so no count of zero reaches a division. Every refusal is one line per problem,
``field: problem (got value)``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

__all__ = ["ConfigError", "load_config", "merge_trees", "from_dict", "to_dict", "save_config", "describe",
           "field_problem", "bound_problems"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key and the value."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: fits none of {annotation} (got {value!r})")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {annotation.__name__} (got {value!r})")
        return _build(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list (got {value!r})")
        item = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (got {value!r})")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: not one of {list(args)} (got {value!r})")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false (got {value!r})")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer (got {value!r})")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number (got {value!r})")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string (got {value!r})")
        return str(value)
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path (got {value!r})")
        return Path(value)
    return value


def _build(cls, values: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; "
                          f"known at this level: {sorted(prefix + f for f in fields)}")
    types_ = _field_types(cls)
    kwargs = {name: _coerce(prefix + name, value, types_[name]) for name, value in values.items()}
    problems = [problem for name, value in kwargs.items()
                if (problem := field_problem(prefix + name, value, fields[name].metadata))]
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from exc
    return obj


def field_problem(key: str, value: Any, meta: typing.Mapping) -> str | None:
    """What is wrong with ``value`` under the bounds in a field's metadata, as ``key: problem (got value)``."""
    if value is None:
        return None
    if "choices" in meta and value not in meta["choices"]:
        return f"{key}: not one of {list(meta['choices'])} (got {value!r})"
    if isinstance(value, (list, tuple, dict)) and "min_items" in meta and len(value) < meta["min_items"]:
        return f"{key}: needs at least {meta['min_items']} item(s) (got {value!r})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return f"{key}: must be a finite number (got {value!r})"
    for bound, fails, words in (("min", lambda v, b: v < b, "must be >="), ("gt", lambda v, b: v <= b, "must be >"),
                                ("max", lambda v, b: v > b, "must be <="), ("lt", lambda v, b: v >= b, "must be <")):
        if bound in meta and fails(value, meta[bound]):
            return f"{key}: {words} {meta[bound]} (got {value!r})"
    return None


def bound_problems(obj, prefix: str = "") -> list[str]:
    """Every field of a built config (nested sections included) that breaks its bounds."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += bound_problems(value, f"{prefix}{f.name}.")
        elif (problem := field_problem(prefix + f.name, value, f.metadata)):
            problems.append(problem)
    return problems


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def merge_trees(base: dict, update: dict) -> dict:
    """``update`` laid over ``base``, section by section (a new mapping; the inputs are not changed): how a
    YAML file lies over the defaults' tree and a ``key=value`` override over the file."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- YAML file <- ``key=value`` overrides, validated against the dataclass ``cls``."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        update: dict = {}
        _set_dotted(update, key.strip(), value)
        tree = merge_trees(tree, update)
    return _build(cls, tree)


def from_dict(cls: type[T], values: dict) -> T:
    """A config from a plain mapping (as ``to_dict`` wrote it), validated like a file."""
    return _build(cls, values)


def to_dict(cfg) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def save_config(cfg, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def describe(cls, prefix: str = "") -> str:
    """Every field with its type, default and help, for ``--help-config``."""
    lines = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            lines.append(f"{prefix}{f.name}:  ({annotation.__name__}) {f.metadata.get('help', '')}")
            lines.append(describe(annotation, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        name = getattr(annotation, "__name__", str(annotation).replace("typing.", ""))
        lines.append(f"{prefix}{f.name} = {default!r}  [{name}]  {f.metadata.get('help', '')}")
    return "\n".join(lines)
