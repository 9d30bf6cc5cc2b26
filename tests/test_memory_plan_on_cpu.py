"""benchmarks/memory_plan.py: its arithmetic against public sizes, real transformers/peft modules, the tensors
autograd really saves, rl-seg's PPO loss and DeepSpeed's own estimators."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("memory_plan", REPO / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


mp = _load()


def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# --- parameter counts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(mp.MODELS))
def test_llm_param_count_within_5_percent_of_nominal(name):
    llm = mp.MODELS[name].llm
    computed = mp.llm_params_as_released(llm) / 1e9
    assert computed == pytest.approx(llm.nominal_b, rel=0.05), (name, computed, llm.nominal_b)


def test_nominal_sizes_are_the_public_ones():
    assert [mp.MODELS[n].llm.nominal_b for n in mp.MODELS] == [0.49, 3.09, 7.7, 19.9, 7.62, 14.7]


@pytest.mark.parametrize("name", list(mp.MODELS))
def test_sa2va_total_matches_internvl_card_plus_sam2(name):
    m = mp.MODELS[name]
    total = mp.base_params(m)["total"] / 1e9
    assert total == pytest.approx(m.internvl_nominal_b + m.sam2_params / 1e9, rel=0.02)


def test_internvit_300m_count():
    assert mp.vit_params(mp.INTERNVIT_300M) / 1e6 == pytest.approx(304, rel=0.01)


def test_param_formula_matches_a_real_qwen2_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    shape = mp.LLMShape("tiny", layers=2, hidden=64, intermediate=176, heads=4, kv_heads=2, vocab=300,
                        fused_qkv=False, qkv_bias=True, tied_in_release=False, nominal_b=0.0)
    assert mp.llm_params(shape, untied_head=True) == sum(p.numel() for p in model.parameters())


# --- LoRA counts against peft -----------------------------------------------------------------------------------

_QWEN_TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
                 "attn+mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.mark.parametrize("targets", list(_QWEN_TARGETS))
@pytest.mark.parametrize("r", [4, 16])
def test_lora_count_matches_peft_on_tiny_qwen2(targets, r):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=200)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=r, target_modules=_QWEN_TARGETS[targets],
                                                               bias="none"))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = mp.LLMShape("tiny", layers=2, hidden=96, intermediate=256, heads=6, kv_heads=2, vocab=200,
                        fused_qkv=False, qkv_bias=True, tied_in_release=True, nominal_b=0.0)
    assert mp.lora_params(shape, r, targets) == real


class _InternLM2Layer(torch.nn.Module):
    """InternLM2's module layout (fused wqkv): enough for peft to wrap the same Linears."""

    def __init__(self, h, i, heads, kv_heads):
        super().__init__()
        d = h // heads
        self.attention = torch.nn.Module()
        self.attention.wqkv = torch.nn.Linear(h, (heads + 2 * kv_heads) * d, bias=False)
        self.attention.wo = torch.nn.Linear(heads * d, h, bias=False)
        self.feed_forward = torch.nn.Module()
        self.feed_forward.w1 = torch.nn.Linear(h, i, bias=False)
        self.feed_forward.w3 = torch.nn.Linear(h, i, bias=False)
        self.feed_forward.w2 = torch.nn.Linear(i, h, bias=False)


@pytest.mark.parametrize("targets,names", [("attn", ["wqkv", "wo"]), ("attn+mlp", ["wqkv", "wo", "w1", "w3", "w2"])])
def test_lora_count_matches_peft_on_fused_qkv_layout(targets, names):
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList(_InternLM2Layer(128, 320, 8, 2) for _ in range(3))
    model = get_peft_model(net, LoraConfig(r=8, target_modules=names, bias="none"))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = mp.LLMShape("tiny", layers=3, hidden=128, intermediate=320, heads=8, kv_heads=2, vocab=10,
                        fused_qkv=True, qkv_bias=False, tied_in_release=False, nominal_b=0.0)
    assert mp.lora_params(shape, 8, targets) == real


# --- ZeRO partitioning and offload -------------------------------------------------------------------------------

P = 10_000_000


def test_stage0_ignores_rank_count_and_holds_20_bytes_per_param():
    one, four = mp.state_bytes(P, 0, 1), mp.state_bytes(P, 0, 4)
    assert one == four
    assert mp.state_totals(one) == (20 * P, 0)


@pytest.mark.parametrize("stage,partitioned", [
    (1, {"grad32", "master32", "adam_m", "adam_v"}),
    (2, {"grad16", "grad32", "master32", "adam_m", "adam_v"}),
    (3, set(mp.STATE_COMPONENTS)),
])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_partitioned_components_shrink_as_one_over_n(stage, partitioned, n):
    one, many = mp.state_bytes(P, stage, 1), mp.state_bytes(P, stage, n)
    for c in mp.STATE_COMPONENTS:
        expected = one[c]["gpu"] / n if c in partitioned else one[c]["gpu"]
        assert many[c]["gpu"] == pytest.approx(expected, rel=1e-12), (stage, c)
    optimizer = sum(many[c]["gpu"] for c in ("master32", "adam_m", "adam_v"))
    assert optimizer == pytest.approx(12 * P / n, rel=1e-12)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_moves_optimizer_bytes_to_cpu_exactly(stage):
    on_gpu, off = mp.state_bytes(P, stage, 4), mp.state_bytes(P, stage, 4, offload=True)
    for c in mp.OFFLOADED:
        assert off[c]["gpu"] == 0 and off[c]["cpu"] == on_gpu[c]["gpu"] > 0
    assert off["param16"] == on_gpu["param16"]
    # The 16-bit gradient partition disappears at stages 2-3 (buckets go straight to the CPU fp32 gradient).
    assert off["grad16"]["gpu"] == (0 if stage >= 2 else on_gpu["grad16"]["gpu"])
    gpu_on, _ = mp.state_totals(on_gpu)
    gpu_off, cpu_off = mp.state_totals(off)
    dropped = on_gpu["grad16"]["gpu"] if stage >= 2 else 0
    assert gpu_on - gpu_off == pytest.approx(cpu_off + dropped, rel=1e-12)


def test_no_offload_at_stage0():
    with pytest.raises(ValueError):
        mp.state_bytes(P, 0, 4, offload=True)


def test_frozen_base_replicated_below_stage3_partitioned_at_stage3():
    m = mp.MODELS["Sa2VA-8B"]
    full = mp.base_params(m)["total"] * 2
    for stage in (0, 1, 2):
        assert mp.frozen_weight_bytes(m, stage, 4) == {"resident": full, "gathered": 0.0}
    z3 = mp.frozen_weight_bytes(m, 3, 4)
    assert z3["resident"] == pytest.approx(full / 4) and 0 < z3["gathered"] < full / 4


# --- activations against autograd -----------------------------------------------------------------------------

@pytest.mark.parametrize("attention,impl", [("flash", "sdpa"), ("eager", "eager")])
@pytest.mark.parametrize("targets", list(_QWEN_TARGETS))
def test_llm_activation_count_matches_saved_tensors_of_real_qwen2_with_peft(attention, impl, targets):
    """A real Qwen2 stack with a real peft adapter (fp32 adapter, bf16 base, autocast as in rl-seg's learner):
    the formula's saved bytes are within 10% of what autograd keeps. CPU dropout differs from CUDA's (it keeps
    a float mask), so the adapter's dropout is 0 here."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    h, i, heads, kv, layers, r, s, b = 256, 704, 8, 2, 2, 8, 128, 2
    cfg = Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=100, attn_implementation=impl)
    base = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=r, target_modules=_QWEN_TARGETS[targets], lora_dropout=0.0))
    embeds = base.get_input_embeddings()(torch.randint(0, 100, (b, s))).detach()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base.model(inputs_embeds=embeds, use_cache=False)

    measured = _saved_bytes(run, list(model.parameters()))
    shape = mp.LLMShape("tiny", layers=layers, hidden=h, intermediate=i, heads=heads, kv_heads=kv, vocab=100,
                        fused_qkv=False, qkv_bias=True, tied_in_release=True, nominal_b=0.0)
    modelled = mp.llm_activation_bytes(shape, s, b, r, targets, grad_checkpointing=False, attention=attention)
    assert modelled["saved"] == pytest.approx(measured, rel=0.10), (modelled["saved"], measured)


def test_checkpointing_keeps_only_layer_inputs():
    m = mp.MODELS["Sa2VA-26B"].llm
    off = mp.llm_activation_bytes(m, 320, 4, 16, "attn", grad_checkpointing=False)
    on = mp.llm_activation_bytes(m, 320, 4, 16, "attn", grad_checkpointing=True)
    assert on["saved"] == pytest.approx(m.layers * 2 * 320 * 4 * m.hidden + (4 * m.hidden + 4) * 320 * 4)
    assert on["saved"] + on["working"] < off["saved"] / 5


def test_ppo_loss_bound_covers_rl_seg_ppo_loss():
    """The per-sampled-pixel constant must cover what rl_seg.ppo.core.ppo_loss (with the KL term) saves."""
    from rl_seg.policy import MaskDistribution
    from rl_seg.ppo.core import PPOLossConfig, ppo_loss

    k, hw = 8, 64
    logits = torch.randn(1, hw, hw, requires_grad=True)
    actions = torch.rand(k, hw, hw) < 0.5
    valid = torch.ones(k, hw, hw, dtype=torch.bool)
    old, adv, ref = torch.randn(k, hw, hw), torch.randn(k, hw, hw), torch.randn(hw, hw)

    def run():
        new = MaskDistribution(logits[0].float().expand(k, -1, -1), 1.0, valid)
        ref_dist = MaskDistribution(ref.expand(k, -1, -1), 1.0, valid)
        loss, _ = ppo_loss(new, actions, old, adv, PPOLossConfig(kl_coef=0.1, entropy_coef=0.01), ref_dist)
        return loss

    per_pixel = _saved_bytes(run, [logits]) / (k * hw * hw)
    assert 0.7 * mp.PPO_LOSS_BYTES_PER_SAMPLED_PIXEL <= per_pixel <= mp.PPO_LOSS_BYTES_PER_SAMPLED_PIXEL


def test_sequence_length_and_reference_policy():
    assert mp.seq_len(tiles=1, text_tokens=64) == 320
    assert mp.seq_len(tiles=6, text_tokens=64) == 6 * 256 + 64
    rep_settings = mp.Settings(micro_batch=1)
    assert mp.rollout_bytes(mp.MODELS["Sa2VA-1B"], rep_settings)["weights"] > mp.base_params(
        mp.MODELS["Sa2VA-1B"])["total"] * 2  # the rollout copy: the whole bf16 base plus its fp32 adapter


# --- DeepSpeed cross-check ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(mp.MODELS))
@pytest.mark.parametrize("ranks", [2, 4])
def test_deepspeed_estimators_agree_with_script(name, ranks):
    c = mp.deepspeed_crosscheck(mp.MODELS[name], mp.Settings(), ranks)
    for tag in ("no_offload", "offload"):
        z2 = c[f"zero2_{tag}"]
        # Same parameters, same bytes on the GPU: exact up to DeepSpeed's int().
        assert z2["script_gpu"] == pytest.approx(z2["deepspeed_gpu"], abs=1.0)
    z2o = c["zero2_offload"]
    # DeepSpeed's CPU figure is max(4 N, 16) B/param with a 1.5 buffer factor; for N <= 4 that is 1.5 x 16 B.
    assert z2o["deepspeed_cpu_node"] == pytest.approx(1.5 * z2o["script_cpu_node"], rel=1e-6)
    for tag in ("no_offload", "offload"):
        z3 = c[f"zero3_total_{tag}"]
        # ZeRO-3 applied to all params charges the frozen base 16 B/param of optimizer state it never has, and
        # counts 18 B per trained param (its ZeRO-2 estimator: 20); with optimizer offload both say 2 B/param.
        c3 = mp.trainable_params(mp.MODELS[name], 16, "attn+mlp")["total"]
        f3 = mp.base_params(mp.MODELS[name])["total"]
        expected = 0.0 if tag == "offload" else (16 * f3 - 2 * c3) / ranks
        assert z3["expected_difference"] == pytest.approx(expected)
        assert z3["deepspeed_minus_script"] == pytest.approx(expected, abs=16.0)


# --- the report -----------------------------------------------------------------------------------------------

def test_report_totals_grow_with_micro_batch_and_rollout_copy_costs_a_base():
    m, plan = mp.MODELS["Sa2VA-8B"], mp.PLANS[0]
    small = mp.evaluate(m, mp.Settings(micro_batch=1), plan, "colocated", 2, False)
    large = mp.evaluate(m, mp.Settings(micro_batch=8), plan, "colocated", 2, False)
    assert large["activations"] > small["activations"] and large["total"] > small["total"]
    dis = mp.evaluate(m, mp.Settings(micro_batch=1), plan, "disaggregated", 2, False)
    assert small["rollout_copy"] >= mp.base_params(m)["total"] * 2 and dis["rollout_copy"] == 0
    expected = sum([small["weights"] + small["lora_optimizer"] + small["activations"], small["rollout_copy"]])
    assert small["total"] == pytest.approx(expected * 1.10 + 2 * 2.0 * mp.GiB)


def test_main_writes_markdown_and_json(tmp_path, capsys):
    rep = mp.main(["--out-dir", str(tmp_path), "--micro-batch", "2", "--lora-rank", "32"])
    md = (tmp_path / "memory_plan.md").read_text()
    data = json.loads((tmp_path / "memory_plan.json").read_text())
    assert "## Verdict" in md and "plan 2: 2 x A100-80GB, ZeRO-2" in md
    assert data["settings"]["lora_rank"] == 32 and data["settings"]["micro_batch"] == 2
    assert len(data["rows"]) == len(rep["rows"]) == len(mp.MODELS) * len(mp.LAYOUTS) * (7 + 2)
    rows = {(r["plan"], r["layout"], r["model"], r["zero_stage"], r["offload"]): r for r in data["rows"]}
    # The conclusions the plan rests on: 1B fits colocated under ZeRO-2; 26B colocated does not (two bf16 bases).
    assert rows[("plan 1: 4 x A100-80GB", "colocated", "Sa2VA-1B", 2, False)]["fits"] is True
    assert rows[("plan 1: 4 x A100-80GB", "colocated", "Sa2VA-26B", 2, False)]["fits"] is False
    # hybrid holds one copy per GPU: 26B fits where colocated does not, and needs less than colocated everywhere
    assert rows[("plan 1: 4 x A100-80GB", "hybrid", "Sa2VA-26B", 2, False)]["fits"] is True
    for (plan, layout, model, stage, offload), r in rows.items():
        if layout == "hybrid":
            assert r["total"] < rows[(plan, "colocated", model, stage, offload)]["total"]
    assert "Sa2VA-26B" in capsys.readouterr().out
