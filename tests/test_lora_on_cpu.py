"""LoRA on the default policy: where the adapters go, what trains, the disabled-adapter reference, PEFT's on-disk
format, and `rl-seg merge`."""

import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from rl_seg.cli import main
from rl_seg.data import load_dataset
from rl_seg.merge import MergeError, adapter_base, merge_adapter_dir
from rl_seg.policy import load_policy
from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel, standardize
from rl_seg.policy.lora import LoraSettings, attach_lora, load_adapter, lora_module_names, trainable_parameters
from rl_seg.sft import mask_loss

LLM_LAYERS = 2
PROJ = ("k_proj", "o_proj", "q_proj", "v_proj")
LLM_TARGETS = sorted(f"base_model.model.language_model.model.layers.{i}.self_attn.{p}"
                     for i in range(LLM_LAYERS) for p in PROJ)
DECODER_TARGETS = sorted(["base_model.model.grounding_decoder.blocks.0.mlp.0",
                          "base_model.model.grounding_decoder.blocks.0.mlp.2",
                          "base_model.model.grounding_decoder.hyper.0", "base_model.model.grounding_decoder.hyper.2"])
SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0)


def tiny_config():
    """The tiny model with two language-model layers, so that the layer-index part of the targets is exercised."""
    return DefaultModelConfig.from_dict({**asdict(DefaultModelConfig.tiny()), "llm_layers": LLM_LAYERS})


@pytest.fixture
def base_dir(tmp_path):
    """A tiny policy saved to a folder: loading it sets name_or_path, which peft records as the adapter's base."""
    torch.manual_seed(0)
    return DefaultSegModel(tiny_config()).save_pretrained(tmp_path / "base")


@pytest.fixture(scope="module")
def batch():
    sample = load_dataset("drive-sample", "test")[0]
    images = [np.ascontiguousarray(sample.image[200:264, 200:264]),
              np.ascontiguousarray(sample.image[300:364, 250:314])]
    masks = [sample.mask[200:264, 200:264], sample.mask[300:364, 250:314]]
    x = standardize(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float())  # what preprocess does
    return x, torch.from_numpy(np.stack(masks)).float()


def logits_of(model, x):
    with torch.no_grad():
        return model(x).logits


def train_step(model, x, y, lr=1e-2):
    """One AdamW step on Sa2VA's mask loss; returns the optimizer (its params are the trainable ones)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = mask_loss(model(x).logits, y, 2.0, 0.5)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    return opt


# -------------------------------------------------------------------------------------------------- placement


def test_llm_preset_targets_exactly_the_language_model_attention(base_dir):
    model = attach_lora(load_policy(base_dir), SETTINGS)
    assert isinstance(model, PeftModel)
    names = lora_module_names(model)
    assert names == LLM_TARGETS
    layers = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert layers == set(LLM_TARGETS)
    for n in names:
        assert not re.search(r"vision_model|grounding_decoder|mlp1|text_hidden_fcs|mlp\.(gate|up|down)_proj", n)
    # the regex is a full-path one: it would not also match a bare q_proj anywhere else
    preset = DefaultSegModel.lora_targets["llm"]
    assert not re.fullmatch(preset, "vision_model.q_proj") and not re.fullmatch(preset, "self_attn.q_proj")


def test_only_lora_parameters_are_trainable(base_dir):
    model = attach_lora(load_policy(base_dir), SETTINGS)
    trainable = trainable_parameters(model)
    assert len(trainable) == 2 * len(LLM_TARGETS)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("vision_model" in n for n in frozen) and any("grounding_decoder" in n for n in frozen)
    assert not any("lora_" in n for n in frozen)
    n_lora = sum(p.numel() for p in trainable.values())
    # r * (in + out) per adapted Linear
    cfg = tiny_config()
    head_dim = cfg.llm_hidden // cfg.llm_heads
    kv = cfg.llm_kv_heads * head_dim
    per_layer = SETTINGS.r * (2 * (cfg.llm_hidden + cfg.llm_hidden) + 2 * (cfg.llm_hidden + kv))  # q, o; k, v
    assert n_lora == LLM_LAYERS * per_layer


def test_llm_plus_decoder_preset_adds_decoder_modules(base_dir):
    model = attach_lora(load_policy(base_dir), LoraSettings(r=4, dropout=0.0, targets="llm+decoder"))
    names = lora_module_names(model)
    assert names == sorted(LLM_TARGETS + DECODER_TARGETS)
    assert not any("vision_model" in n for n in names)


def test_pixels_preset_adapts_the_upsampling_convolutions(base_dir, batch):
    x, y = batch
    model = attach_lora(load_policy(base_dir), LoraSettings(r=4, dropout=0.0, targets="llm+decoder+pixels"))
    names = lora_module_names(model)
    decoder = "base_model.model.grounding_decoder"
    levels = len(DefaultModelConfig.tiny().enc_channels) - 1
    convs = [f"{decoder}.ups.{i}.{j}" for i in range(levels) for j in (0, 3)]
    films = [f"{decoder}.films.{i}" for i in range(levels)]
    assert names == sorted(LLM_TARGETS + DECODER_TARGETS + convs + films)
    everything = lora_module_names(attach_lora(load_policy(base_dir), LoraSettings(r=4, dropout=0.0, targets="all")))
    stages = len(DefaultModelConfig.tiny().enc_channels)
    encoder = [f"base_model.model.vision_model.stages.{i}.{j}" for i in range(stages) for j in (0, 3)]
    rest = ["base_model.model.mlp1.1", "base_model.model.mlp1.3", "base_model.model.text_hidden_fcs.0",
            "base_model.model.text_hidden_fcs.2", f"{decoder}.input_proj"]
    assert everything == sorted(names + encoder + rest)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n].base_layer, torch.nn.Conv2d) for n in convs)
    # LoRA B starts at zero: the adapted model starts as the base; a step on the conv adapters alone changes
    # the logits pixel by pixel, not by one factor per image as the read-out and FiLM adapters can
    base = logits_of(load_policy(base_dir).eval(), x)
    assert (logits_of(model.eval(), x) - base).abs().max() < 1e-5  # (attention kernels differ by grad mode)
    for n, p in model.named_parameters():
        p.requires_grad_(".ups." in n and "lora_" in n)
    train_step(model, x, y, lr=5e-2)
    changed = logits_of(model, x) - base
    assert changed.abs().max() > 1e-3
    assert (changed / base)[0].std() > 1e-3


def test_custom_full_path_regex(base_dir):
    regex = r"language_model\.model\.layers\.1\.self_attn\.q_proj"
    model = attach_lora(load_policy(base_dir), LoraSettings(r=2, dropout=0.0, targets=regex))
    assert lora_module_names(model) == ["base_model.model.language_model.model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("targets, message", [
    (r"language_model\.(q_proj", "neither a preset of DefaultSegModel .* nor a valid regex"),
    (r"q_proj", "match no Linear or Conv2d layer"),  # full-path matching: a bare name matches nothing
    (r"nothing\.here", "match no Linear or Conv2d layer"),
    (r"vision_model\.stages\.0\.1", "match no Linear or Conv2d layer"),  # a GroupNorm
])
def test_bad_targets_are_clear_value_errors(base_dir, targets, message):
    with pytest.raises(ValueError, match=message):
        attach_lora(load_policy(base_dir), LoraSettings(targets=targets))


# ------------------------------------------------------------------------------------------------- training


def test_lora_gradients_step_and_disabled_adapter_reference(base_dir, batch):
    x, y = batch
    # Frozen like the base inside a PeftModel: nn.MultiheadAttention picks its kernel by grad mode and
    # requires_grad, so a base with trainable weights differs from it by float32 rounding (~1e-6) only.
    base = load_policy(base_dir).eval().requires_grad_(False)
    base_logits = logits_of(base, x)
    trainable_base_logits = logits_of(load_policy(base_dir).eval(), x)
    assert (trainable_base_logits - base_logits).abs().max() < 1e-5
    model = attach_lora(load_policy(base_dir), SETTINGS).eval()
    # lora_B starts at zero: a fresh adapter computes exactly the base policy
    assert torch.equal(logits_of(model, x), base_logits)

    model.train()
    loss = mask_loss(model(x).logits, y, 2.0, 0.5)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
    assert all(g.abs().sum() == 0 for n, g in grads.items() if ".lora_A." in n)  # B = 0 blocks A's gradient
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    opt.zero_grad()
    loss = mask_loss(model(x).logits, y, 2.0, 0.5)
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_A." in n)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)

    model.eval()
    adapted = logits_of(model, x)
    assert (adapted - base_logits).abs().max() > 1e-4  # the adapter now changes the logits
    with model.disable_adapter():
        reference = logits_of(model, x)
    assert torch.equal(reference, base_logits)  # the KL reference is the base policy, exactly
    assert torch.equal(logits_of(model, x), adapted)  # and the adapter is back afterwards


# ------------------------------------------------------------------------------------------------- on disk


def test_adapter_saves_in_peft_format_and_loads_with_peft(base_dir, batch, tmp_path):
    x, y = batch
    model = attach_lora(load_policy(base_dir), SETTINGS)
    train_step(model, x, y)
    expected = logits_of(model, x)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == DefaultSegModel.lora_targets["llm"]
    assert config["base_model_name_or_path"] == str(base_dir) == adapter_base(out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert len(weights) == 2 * len(LLM_TARGETS) and all("lora_" in k for k in weights)

    fresh = PeftModel.from_pretrained(load_policy(base_dir), str(out)).eval()
    assert torch.equal(logits_of(fresh, x), expected)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference
    again = load_adapter(load_policy(base_dir), out, trainable=True).eval()
    assert torch.equal(logits_of(again, x), expected)
    assert sorted(trainable_parameters(again)) == sorted(trainable_parameters(model))


def test_load_adapter_without_config_is_clear(tmp_path, base_dir):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(load_policy(base_dir), tmp_path)


# ------------------------------------------------------------------------------------------------- merging


def make_adapter(base_dir, batch, out, targets="llm", base=None):
    x, y = batch
    model = attach_lora(base if base is not None else load_policy(base_dir),
                        LoraSettings(r=4, alpha=8, dropout=0.0, targets=targets))
    train_step(model, x, y, lr=5e-2)
    model.save_pretrained(out)
    return logits_of(model, x)


@pytest.mark.parametrize("targets", ["llm", "llm+decoder", "llm+decoder+pixels", "all"])
def test_merge_cli_end_to_end(base_dir, batch, tmp_path, capsys, targets):
    x, _ = batch
    base_weights = load_file(str(base_dir / "model.safetensors"))
    expected = make_adapter(base_dir, batch, tmp_path / "adapter", targets)
    assert (expected - logits_of(load_policy(base_dir).eval(), x)).abs().max() > 1e-3

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    merged = load_policy(out).eval()
    assert isinstance(merged, DefaultSegModel)
    assert (logits_of(merged, x) - expected).abs().max() < 1e-5
    # a plain checkpoint: the base's keys, no LoRA leftovers; the base folder untouched
    merged_weights = load_file(str(out / "model.safetensors"))
    assert merged_weights.keys() == base_weights.keys()
    changed = [k for k in base_weights if not torch.equal(base_weights[k], merged_weights[k])]
    targeted = set(LoraSettings(targets=targets).target_modules(load_policy(base_dir)))
    assert {k.removesuffix(".weight") for k in changed} == targeted  # each targeted weight, nothing else
    unchanged = load_file(str(base_dir / "model.safetensors"))
    assert all(torch.equal(v, unchanged[k]) for k, v in base_weights.items())


def test_merge_function_and_policy_override(base_dir, batch, tmp_path):
    x, _ = batch
    # an adapter attached to a model built in memory records no base: --policy names it
    torch.manual_seed(0)
    in_memory = DefaultSegModel(tiny_config())
    expected = make_adapter(base_dir, batch, tmp_path / "adapter", base=in_memory)
    config = tmp_path / "adapter" / "adapter_config.json"
    assert json.loads(config.read_text())["base_model_name_or_path"] is None

    with pytest.raises(MergeError, match=r"adapter_config\.json: field 'base_model_name_or_path' is missing"):
        merge_adapter_dir(tmp_path / "adapter", tmp_path / "m1")
    path = merge_adapter_dir(tmp_path / "adapter", tmp_path / "m1", policy=base_dir)  # same weights as in_memory
    assert path == tmp_path / "m1"
    assert (logits_of(load_policy(path).eval(), x) - expected).abs().max() < 1e-5


def test_merge_errors_name_the_file_and_field(base_dir, batch, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    make_adapter(base_dir, batch, adapter)
    config = adapter / "adapter_config.json"
    values = json.loads(config.read_text())

    def run(*extra):
        code = main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), *extra])
        return code, capsys.readouterr().err

    config.write_text(json.dumps({k: v for k, v in values.items() if k != "base_model_name_or_path"}))
    code, err = run()
    assert code == 2 and str(config) in err and "base_model_name_or_path" in err and "--policy" in err

    config.write_text(json.dumps({**values, "base_model_name_or_path": str(tmp_path / "gone")}))
    code, err = run()
    assert code == 2 and str(config) in err and "base_model_name_or_path" in err and str(tmp_path / "gone") in err

    config.write_text(json.dumps(values))
    code, err = run("--policy", "default")  # the shipped model is wider than the tiny base: shapes do not fit
    assert code == 2 and "does not fit base policy 'default'" in err and "size mismatch" in err

    code, err = run("--policy", str(base_dir))
    assert code == 0
    code = main(["merge", "--adapter", str(adapter), "--out", str(base_dir)])
    assert code == 2 and "refusing to write" in capsys.readouterr().err

    code = main(["merge", "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert code == 2 and str(tmp_path / "nowhere" / "adapter_config.json") in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

    config.write_text("{broken")
    code, err = run()
    assert code == 2 and str(config) in err and "not valid JSON" in err


def test_eval_with_adapter_equals_eval_of_the_merged_policy(base_dir, batch, tmp_path):
    make_adapter(base_dir, batch, tmp_path / "adapter", "llm+decoder")
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    reports = {}
    for name, extra in {"adapted": ["--policy", str(base_dir), "--adapter", str(tmp_path / "adapter")],
                        "merged": ["--policy", str(tmp_path / "merged")],
                        "base": ["--policy", str(base_dir)]}.items():
        out = tmp_path / f"{name}.json"
        assert main(["eval", *extra, "--data", "drive-sample", "--split", "test", "--out", str(out), "-q"]) == 0
        reports[name] = json.loads(out.read_text())
    assert reports["adapted"]["adapter"] == str(tmp_path / "adapter")
    for key, value in reports["adapted"]["mean"].items():
        assert reports["merged"]["mean"][key] == pytest.approx(value, abs=1e-4), key  # a pixel may flip at 0.5
    assert max(abs(reports["base"]["mean"][k] - v) for k, v in reports["adapted"]["mean"].items()) > 1e-3
