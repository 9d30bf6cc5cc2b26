"""The typed config: YAML + key=value overrides, clear errors, help for every field, the shipped presets."""

import dataclasses
import typing
from pathlib import Path

import pytest

from rl_seg.config import ConfigError, describe, from_dict, load_config, save_config, to_dict
from rl_seg.ppo.config import TrainConfig
from rl_seg.sft import SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "rl_seg" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.grad_accum_steps >= 1


def test_sa2va_26b_preset_holds_the_original_plan():
    cfg = load_config(TrainConfig, CONFIGS / "sa2va-26b.yaml")
    assert cfg.ppo.lr == 5e-5 and cfg.ppo.warmup_steps == 100 and cfg.ppo.max_grad_norm == 1.0
    assert cfg.learner.micro_batch_images == 4 and cfg.grad_accum_steps == 8 and cfg.ppo.epochs == 3


def test_overrides_merge_over_the_file_and_parse_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("iterations: 7\nppo: {lr: 0.01, epochs: 3}\n")
    cfg = load_config(TrainConfig, f, ["ppo.lr=5e-3", "data.datasets=[a,b]", "reward.weights={dice: 1}",
                                       "data.image_size=null", "learner.micro_batch_images=1", "resume=true"])
    assert cfg.iterations == 7 and cfg.ppo.epochs == 3
    assert cfg.ppo.lr == 0.005  # YAML 1.1 reads 5e-3 as a string: accepted as a number
    assert cfg.data.datasets == ["a", "b"] and cfg.reward.weights == {"dice": 1.0}
    assert cfg.data.image_size is None and cfg.resume is True


@pytest.mark.parametrize("override, message", [
    ("ppo.lrr=1", r"unknown config key\(s\) \['ppo.lrr'\]"),
    ("iterations=many", r"^iterations: expected an integer \(got 'many'\)$"),
    ("resume=maybe", r"^resume: expected true or false \(got 'maybe'\)$"),
    ("ppo.advantage=magic", r"^ppo.advantage: not one of \[.*'pixel'.*\] \(got 'magic'\)$"),
    ("learner.zero_stage=3", r"^learner.zero_stage: not one of \[0, 1, 2\] \(got 3\)$"),
    ("data.images_per_iteration=3", r"^data.images_per_iteration: must be a positive multiple of learner.num_workers"),
    ("novalue", "not of the form key=value"),
])
def test_bad_overrides_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: [1\n")
    with pytest.raises(ConfigError, match=f"{bad}.*not valid YAML"):
        load_config(TrainConfig, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(TrainConfig, bad)


def test_round_trip_through_the_saved_config(tmp_path):
    cfg = load_config(TrainConfig, None, ["name=x", "policy.lora.r=32"])
    saved = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(TrainConfig, saved)
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("cls", [TrainConfig, SFTConfig])
def test_every_field_has_help(cls):
    seen = []

    def walk(c, prefix=""):
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            seen.append(prefix + f.name)
            assert f.metadata.get("help"), f"{prefix}{f.name} has no help string"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")

    walk(cls)
    if cls is TrainConfig:
        assert "ppo.loss.clip" in seen and "policy.lora.r" in seen
    text = describe(cls)
    assert "iterations" in text or "steps" in text
