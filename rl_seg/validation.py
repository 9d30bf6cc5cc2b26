"""The one check a training config passes before Ray starts and before any file is written.

``rl-seg train``, ``rl-seg tune`` (its base config and every value its search space can draw) and the status
service's ``POST /runs`` all call :func:`validate_train_config`. Bounds on counts, rates and sizes live next to
the config fields (their metadata, enforced as a config is built: ``rl_seg.config``); this module adds what needs
the file system or the registries: the run name and folder, the policy and adapter folders (and their remote
code), the data roots and splits, the reward. Every problem is one line, ``field: problem (got value)``.

A resumed run keeps its saved config (:func:`resume_changes`): only what does not change what the run learns
may differ, and what differs is listed.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

from .config import ConfigError, bound_problems, load_config, to_dict
from .ppo.config import TrainConfig
from .run_files import NAME_PATTERN

__all__ = ["validate_train_config", "resume_changes", "resume_config", "validate_search_space", "RESUME_MAY_CHANGE",
           "SAVED_CONFIG"]

SAVED_CONFIG = "config.yaml"
#: What a resumed run may change: how long it runs, how it logs, where it runs - not what it learns.
RESUME_MAY_CHANGE = ("iterations", "stop_after_iterations", "progress", "ray_address", "ray_num_cpus")
#: Fields that locate the run rather than describe it.
_LOCATION = ("name", "run_dir", "resume")


def validate_train_config(cfg: TrainConfig, *, check_files: bool = True) -> None:
    """Raise ConfigError listing every problem of ``cfg``; ``check_files=False`` skips what needs this machine's
    file system (a config checked here and run elsewhere)."""
    problems = bound_problems(cfg) + _name_problems(cfg) + _reward_problems(cfg)
    if check_files:
        problems += _run_dir_problems(cfg) + _policy_problems(cfg) + _data_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))


def _name_problems(cfg: TrainConfig) -> list[str]:
    if not re.match(NAME_PATTERN, cfg.name or ""):
        return [f"name: must be one folder name (letters, digits, '_', '-', '.'; not starting with '.') "
                f"(got {cfg.name!r})"]
    return []


def _run_dir_problems(cfg: TrainConfig) -> list[str]:
    existing = Path(cfg.run_path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"run_dir: {existing} is not a folder (got {str(cfg.run_dir)!r})"]
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        return [f"run_dir: {existing} {why} (got {str(cfg.run_dir)!r})"]
    return []


def _policy_problems(cfg: TrainConfig) -> list[str]:
    from .policy import _builtin  # noqa: F401 - registers the built-in policies
    from .policy.base import POLICIES, remote_code

    problems = []
    name = cfg.policy.name
    if name not in POLICIES:
        path = Path(name)
        if not path.is_dir():
            problems.append(f"policy.name: neither a registered policy ({sorted(POLICIES)}) nor a folder "
                            f"(got {name!r})")
        elif not ((path / "rl_seg_policy.json").is_file() or (path / "config.json").is_file()):
            problems.append(f"policy.name: {path} is not a policy checkpoint (no rl_seg_policy.json or config.json) "
                            f"(got {name!r})")
        elif (auto_map := remote_code(path)) and not cfg.policy.trust_remote_code:
            problems.append(f"policy.trust_remote_code: {path} holds remote code (config.json auto_map: "
                            f"{sorted(auto_map)}) that would run in the driver, rollout actors and learners; set "
                            f"policy.trust_remote_code=true if you trust it (got false)")
    if not problems and cfg.data.image_size is None and cfg.learner.micro_batch_images > 1:
        problems += _mixed_size_problems(cfg)
    adapter = cfg.policy.init_adapter
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        problems.append(f"policy.init_adapter: not a PEFT adapter folder (no adapter_config.json) (got {adapter!r})")
    return problems


def _mixed_size_problems(cfg: TrainConfig) -> list[str]:
    from .policy.base import policy_class

    try:
        cls = policy_class(cfg.policy.name)
    except (ValueError, OSError):
        return []  # named by the checks above or when the policy loads
    if cls.mixed_size_batches:
        return []
    return [f"learner.micro_batch_images: the {cls.name!r} policy takes one image size per batch, and data.image_size: "
            f"null keeps each image's own size; use 1, or set data.image_size (got {cfg.learner.micro_batch_images})"]


def _data_problems(cfg: TrainConfig) -> list[str]:
    from .data import ALL_SPLIT, DataError, list_splits

    problems = []
    for i, name in enumerate(cfg.data.datasets):
        try:
            splits = list_splits(name)
        except DataError as exc:
            problems.append(f"data.datasets[{i}]: {exc} (got {name!r})")
            continue
        if splits == [ALL_SPLIT]:
            continue  # an unsplit folder is every split
        for key in ("train_split", "val_split"):
            split = getattr(cfg.data, key)
            if split not in splits and not (split == "train_all" and "train" in splits):
                problems.append(f"data.{key}: dataset {name!r} has no split {split!r} (available: "
                                f"{', '.join(splits) or 'none'}) (got {split!r})")
    return problems


def _reward_problems(cfg: TrainConfig) -> list[str]:
    from rewards.composite import COMPONENTS, PRESETS

    weights = cfg.reward.weights
    if not weights:
        if cfg.reward.preset not in PRESETS:
            return [f"reward.preset: not one of {sorted(PRESETS)} (got {cfg.reward.preset!r})"]
        return []
    problems = [f"reward.weights.{k}: unknown reward component; known: {sorted(COMPONENTS)} (got {v!r})"
                for k, v in weights.items() if k not in COMPONENTS]
    problems += [f"reward.weights.{k}: must be a finite number (got {v!r})" for k, v in weights.items()
                 if not math.isfinite(v)]
    if not problems and not any(weights.values()):
        problems.append(f"reward.weights: at least one weight must be non-zero (got {weights!r})")
    return problems


# --- resume ------------------------------------------------------------------------------------------------

def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k not in ("weights",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_changes(cfg: TrainConfig) -> dict[str, list]:
    """For a resumed run: ``{field: [saved, now]}`` of what differs from its saved config (only fields in
    RESUME_MAY_CHANGE may); ConfigError naming every other difference. Empty when nothing was saved yet."""
    saved_path = cfg.run_path / SAVED_CONFIG
    if not cfg.resume or not saved_path.is_file():
        return {}
    saved = _flat(to_dict(load_config(TrainConfig, saved_path)))
    now = _flat(to_dict(cfg))
    changed = {k: [saved.get(k), now.get(k)] for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k) and k not in _LOCATION}
    refused = [f"{k}: a resumed run keeps its saved value {old!r} ({saved_path}); on resume only "
               f"{', '.join(RESUME_MAY_CHANGE)} may change (got {new!r})"
               for k, (old, new) in changed.items() if k not in RESUME_MAY_CHANGE]
    if refused:
        raise ConfigError("\n".join(refused))
    return changed


def resume_config(path: Path | None, overrides: Sequence[str]) -> TrainConfig:
    """The config of ``rl-seg train --resume``: the run (located by ``name`` and ``run_dir`` from the file and the
    overrides) continues with its saved config, the command line's overrides laid over it; the file's other
    values do not count. Without a saved config, the file and overrides as given."""
    located = load_config(TrainConfig, path, [*overrides, "resume=true"])
    saved = located.run_path / SAVED_CONFIG
    if not saved.is_file():
        return located
    return load_config(TrainConfig, saved, [*overrides, f"name={located.name}", f"run_dir={located.run_dir}",
                                            "resume=true"])


# --- sweeps --------------------------------------------------------------------------------------------------

def validate_search_space(train_config: str | Path | None, overrides: Sequence[str], space: dict) -> TrainConfig:
    """The sweep's base train config, validated, after every value its space can draw was tried on it (each end
    of each range, each choice). A value is refused when it fails both alone and beside the other keys' upper
    values (a trial draws them together: a reward weight of 0 is fine beside a non-zero one); ConfigError naming
    ``space.<key>`` and the value."""
    base = load_config(TrainConfig, train_config, overrides)
    validate_train_config(base)
    candidates = {}
    for key, spec in space.items():
        if spec.get("type") in ("choice", "grid"):
            candidates[key] = [(f"values[{i}]", v) for i, v in enumerate(spec.get("values") or [])]
        else:
            candidates[key] = [("low", spec.get("low")), ("high", spec.get("high"))]
    upper = {key: values[-1][1] for key, values in candidates.items() if values}

    def check(drawn: dict) -> list[str]:
        try:
            cfg = load_config(TrainConfig, train_config,
                              [*overrides, *(f"{k}={json.dumps(v)}" for k, v in drawn.items())])
            validate_train_config(cfg, check_files=False)
        except ConfigError as exc:
            return str(exc).splitlines()
        return []

    problems = []
    for key, values in candidates.items():
        for where, value in values:
            alone = check({key: value})
            if alone and check({**upper, key: value}):
                problems += [f"space.{key}.{where}: {line}" for line in alone]
    if problems:
        raise ConfigError("\n".join(problems))
    return base
