"""GPU memory plan for PPO fine-tuning of LoRA adapters on Sa2VA-1B/4B/8B/26B and the InternVL3-based 8B/14B with
DeepSpeed (issues 7 and 18).

Computes, per GPU, what the learner (frozen base, LoRA + value-head model states per ZeRO stage, activations of
the mask path) and a colocated rollout actor hold, and checks the original plan's hardware against it:
(1) 4 x A100-80GB, (2) 2 x A100-80GB with ZeRO-2; colocated (a rollout actor on every learner GPU),
disaggregated (rollouts on a GPU of their own) and hybrid (the learner ranks sample: one copy per GPU). Nothing
here needs a GPU or model weights (tests/test_memory_plan_on_cpu.py ties the arithmetic to transformers, peft,
DeepSpeed and rl-seg).

    python benchmarks/memory_plan.py [--lora-rank 16] [--micro-batch 4] [--samples-per-image 8] [--tiles 1]
                                     [--grad-checkpointing | --no-grad-checkpointing] [--out-dir DIR]

Writes DIR/memory_plan.md (the tables, also printed) and DIR/memory_plan.json (every number, in bytes).
Units in the tables: GiB (2**30 bytes); "A100-80GB" is taken as 80 GiB (nvidia-smi reports 81920 MiB).

The arithmetic and the public shapes live in ``rl_seg/plan.py`` (which ``rl-seg plan`` applies to a train config);
this script tabulates them for the public shapes on the original plan's hardware, and cross-checks DeepSpeed's
estimators.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl_seg.plan import *  # noqa: E402,F401,F403 - the arithmetic, re-exported for the tests that read it here



# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed's own estimators (cross-check)
# ----------------------------------------------------------------------------------------------------------------


def deepspeed_crosscheck(model: Sa2VAShape, st: Settings, ranks: int) -> dict:
    """DeepSpeed 0.19's estimators next to this script's model states (bytes per rank).

    ``estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes, cpu_offload,
    additional_buffer_factor)`` -> (cpu, gpu) and ``estimate_zero3_model_states_mem_needs(total_params,
    largest_layer_params, num_gpus_per_node, num_nodes, cpu_offload, cpu_offload_params, zero_init,
    additional_buffer_factor)`` -> (cpu, gpu, largest_layer_memory) are what the printing ``*_all_cold`` variants
    tabulate. Both assume every parameter is trained. Applied to the trainable (LoRA + value head) count, ZeRO-2
    must agree exactly on the GPU; its CPU figure carries a 1.5 buffer factor and max(4 N, 16) B/param. ZeRO-3
    applied to the total count charges 16 B/param of optimizer state to the frozen base too, and counts 18 B per
    trained parameter where its ZeRO-2 estimator (and this script, at every stage) counts 2 + 18 = 20: this
    script's stage-3 states plus the frozen bf16 partition plus DeepSpeed's 4 B x largest layer differ from it by
    exactly 16 x frozen / N - 2 x trainable / N (and by 0 with optimizer offload, where both count 2 B/param)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    trainable = trainable_params(model, st.lora_rank, st.lora_targets)["total"]
    frozen = base_params(model)["total"]
    largest = largest_module_params(model)
    out = {"model": model.name, "ranks": ranks, "trainable_params": trainable, "frozen_params": frozen,
           "largest_layer_params": largest}
    for offload in (False, True):
        tag = "offload" if offload else "no_offload"
        ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=ranks,
                                                                cpu_offload=offload)
        gpu, cpu = state_totals(state_bytes(trainable, 2, ranks, offload))
        out[f"zero2_{tag}"] = {"deepspeed_gpu": ds_gpu, "deepspeed_cpu_node": ds_cpu, "script_gpu": gpu,
                               "script_cpu_node": cpu * ranks}
        ds3_cpu, ds3_gpu, ds3_largest = estimate_zero3_model_states_mem_needs(
            trainable + frozen, largest, num_gpus_per_node=ranks, cpu_offload=offload, cpu_offload_params=False,
            zero_init=True)
        gpu3, cpu3 = state_totals(state_bytes(trainable, 3, ranks, offload))
        script3 = gpu3 + frozen * BF16 / ranks + ds3_largest
        out[f"zero3_total_{tag}"] = {
            "deepspeed_gpu": ds3_gpu, "deepspeed_cpu_node": ds3_cpu, "script_gpu": script3,
            "script_cpu_node": cpu3 * ranks,
            "deepspeed_minus_script": ds3_gpu - script3,
            "expected_difference": 0.0 if offload else (16 * frozen - 2 * trainable) / ranks}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _g(x: float) -> str:
    return f"{x / GiB:.1f}"


def _g3(x: float) -> str:
    return f"{x / GiB:.3f}"


def sanity_rows() -> list[dict]:
    rows = []
    for m in MODELS.values():
        parts = base_params(m)
        rows.append({
            "model": m.name, "llm": m.llm.name, "llm_params_as_released": llm_params_as_released(m.llm),
            "llm_nominal_b": m.llm.nominal_b, "vit": m.vit.name, "vit_params": parts["vision"],
            "vit_nominal_b": m.vit.nominal_b, "total_params": parts["total"], "parts": parts,
            "internvl_plus_sam2_nominal_b": m.internvl_nominal_b + m.sam2_params / 1e9, "approximate": list(m.approx),
        })
    return rows


def build_report(st: Settings) -> dict:
    rows, verdict = [], []
    for plan in PLANS:
        for layout in LAYOUTS:
            for m in MODELS.values():
                for stage, offload in plan.stages:
                    rows.append(evaluate(m, st, plan, layout, stage, offload))
    for plan in PLANS:
        stage = 2  # the original plan's setting (rl_seg/configs/sa2va-26b.yaml) and plan 2's
        for m in MODELS.values():
            entry = {"plan": plan.name, "model": m.name, "zero_stage": stage}
            for layout in LAYOUTS:
                for ckpt in (False, True):
                    s = Settings(**{**asdict(st), "grad_checkpointing": ckpt})
                    entry[f"{layout}_max_micro_batch_{'ckpt' if ckpt else 'no_ckpt'}"] = max_micro_batch(
                        m, s, plan, layout, stage, False)
            if plan.gpus >= 4:
                s = Settings(**{**asdict(st), "grad_checkpointing": True})
                entry["colocated_zero3_max_micro_batch_ckpt"] = max_micro_batch(m, s, plan, "colocated", 3, False)
            verdict.append(entry)
    cross = [deepspeed_crosscheck(m, st, ranks) for m in MODELS.values() for ranks in (2, 4)]
    return {"settings": asdict(st), "sequence_length": seq_len(st.tiles, st.text_tokens),
            "param_counts": sanity_rows(), "rows": rows, "verdict": verdict, "deepspeed_crosscheck": cross,
            "units": "bytes; tables in GiB", "reference_policy_bytes": 0}


def render_markdown(rep: dict) -> str:
    st = Settings(**rep["settings"])
    out = ["# Memory plan: PPO + LoRA + DeepSpeed on Sa2VA (issue 7)", "",
           f"Generated by `python benchmarks/memory_plan.py` with: LoRA r={st.lora_rank} on {st.lora_targets} "
           f"(rl-seg's `llm` preset is attention only: `--lora-targets attn`), dropout {st.lora_dropout}, "
           f"micro-batch {st.micro_batch} images, K={st.samples_per_image} masks per image, {st.tiles} tile(s) "
           f"-> {rep['sequence_length']} LLM tokens per image, gradient checkpointing "
           f"{'on' if st.grad_checkpointing else 'off'}, {st.attention} attention, "
           f"{st.images_per_iteration} images per iteration. GiB; A100-80GB = {st.gpu_gib:.0f} GiB.", "",
           "## Parameter counts (computed from the public shapes)", "",
           "| model | LLM | LLM computed (as released) | LLM nominal | ViT computed | ViT nominal | Sa2VA total "
           "computed | InternVL2.5 + SAM2-L nominal | approximate |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["param_counts"]:
        out.append(f"| {r['model']} | {r['llm']} | {r['llm_params_as_released'] / 1e9:.3f}B | {r['llm_nominal_b']}B "
                   f"| {r['vit_params'] / 1e9:.3f}B | {r['vit_nominal_b']}B | {r['total_params'] / 1e9:.2f}B | "
                   f"{r['internvl_plus_sam2_nominal_b']:.2f}B | {'; '.join(r['approximate'])} |")
    out += ["", "Trainable per model (LoRA + value head, params): " + ", ".join(
        f"{m.name} {trainable_params(m, st.lora_rank, st.lora_targets)['lora'] / 1e6:.1f}M + "
        f"{value_head_params(m.llm.hidden) / 1e6:.1f}M" for m in MODELS.values()), ""]
    out += ["Columns per GPU: frozen weights of the learner (bf16; 1/N under ZeRO-3 plus the gathered set), LoRA + "
            "value-head model states (bf16 mixed precision, 18 B/param split by ZeRO stage; offload moves the fp32 "
            "parts to CPU), activations (saved + largest transient + the rank's per-iteration PPO buffers), the "
            "colocated rollout actor's bf16 copy and inference activations, then "
            f"{st.cuda_context_gib:.0f} GiB CUDA context per process + {st.reserve:.0%} allocator reserve. "
            "The KL reference is the same model with the adapter disabled: 0 GiB. CPU = offloaded optimizer "
            "states on the node.", ""]
    for plan in PLANS:
        for layout in LAYOUTS:
            rows = [r for r in rep["rows"] if r["plan"] == plan.name and r["layout"] == layout]
            ranks = rows[0]["learner_ranks"]
            desc = {"colocated": f"{ranks} learner ranks, one rollout actor on each learner GPU",
                    "hybrid": f"{ranks} learner ranks that also sample, one model copy per GPU"}.get(
                layout, f"{ranks} learner rank(s) + {plan.rollout_gpus_when_disaggregated} rollout GPU")
            out += [f"## {plan.name} - {layout} ({desc})", "",
                    "| model | ZeRO | offload | weights | LoRA+opt | activations | rollout copy | ctx+reserve | "
                    "total | headroom | fits | CPU GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                out.append(f"| {r['model']} | {r['zero_stage']} | {'cpu' if r['offload'] else 'none'} | "
                           f"{_g(r['weights'])} | {_g(r['lora_optimizer'])} | {_g(r['activations'])} | "
                           f"{_g(r['rollout_copy'])} | {_g(r['context_and_reserve'])} | {_g(r['total'])} | "
                           f"{_g(r['headroom'])} | {'yes' if r['fits'] else 'no'} | {_g(r['cpu_offload_node'])} |")
            if layout == "disaggregated":
                seen = {}
                for r in rows:
                    seen.setdefault(r["model"], r)
                out += ["", "Rollout GPU (one actor: bf16 copy + one image's forward + context + reserve): " + ", ".join(
                    f"{k} {_g(v['rollout_gpu_total_per_actor'])} GiB ({v['rollout_actors_per_rollout_gpu']} "
                    f"actor(s) fit)" for k, v in seen.items())]
            out.append("")
    out += ["## DeepSpeed estimator cross-check (bytes per rank, GiB)", "",
            "| model | N | ZeRO-2 GPU DeepSpeed / script (trainable) | ZeRO-2+offload CPU node DeepSpeed / script | "
            "ZeRO-3 GPU on total params DeepSpeed / script | difference = (16 B x frozen - 2 B x trainable) / N |",
            "|---|---|---|---|---|---|"]
    for c in rep["deepspeed_crosscheck"]:
        z2, z2o, z3 = c["zero2_no_offload"], c["zero2_offload"], c["zero3_total_no_offload"]
        out.append(f"| {c['model']} | {c['ranks']} | {_g(z2['deepspeed_gpu'])} / {_g(z2['script_gpu'])} | "
                   f"{_g(z2o['deepspeed_cpu_node'])} / {_g(z2o['script_cpu_node'])} | {_g(z3['deepspeed_gpu'])} / "
                   f"{_g(z3['script_gpu'])} | {_g(z3['deepspeed_minus_script'])} = "
                   f"{_g(z3['expected_difference'])} |")
    out += ["", "ZeRO-2 agrees exactly on the GPU; DeepSpeed's CPU figure adds its 1.5 buffer factor. DeepSpeed's "
            "ZeRO-3 estimator assumes every parameter is trained (16 B/param of optimizer state on the frozen base) "
            "and counts 18 B per trained parameter where its ZeRO-2 estimator counts 20: the difference is exactly "
            "that.", "", "## Verdict", ""]
    out += render_verdict(rep)
    out += ["", "## Notes", "",
            "- rl-seg's learner accepts ZeRO 0-2 only (`learner.zero_stage`); ZeRO-3 rows show what partitioning the "
            "frozen base would buy, but the Sa2VA adapter reads SAM2 parameters outside module forwards "
            "(`no_mem_embed`, `get_dense_pe`), which ZeRO-3 would have to gather explicitly.",
            "- CPU offload moves only LoRA/value-head optimizer states (well under 2 GiB per GPU here): it cannot "
            "make a size fit; the bf16 base (replicated at ZeRO 0-2, and again in every colocated rollout actor) "
            "dominates.",
            "- Base dtype: `load_policy` passes no dtype; transformers 5 then loads the checkpoint's own (bf16). Under "
            "transformers 4.x the same call loads float32 and doubles every weights column.",
            "- CPU RAM at load: each learner and rollout process materializes a bf16 copy before moving it to the "
            "GPU; all at once that is " + ", ".join(
                f"{m.name} {_g(base_params(m)['total'] * BF16 * 8)} GiB" for m in MODELS.values())
            + " for 4 learners + 4 rollout actors (JSON: `cpu_load_peak_node`).",
            "- Korthikanti et al. (2022) eq. 1 per LLM layer at this micro-batch vs the count used here (GiB): "
            + ", ".join(f"{m.name} {korthikanti_layer_bytes(rep['sequence_length'], st.micro_batch, m.llm.hidden, m.llm.heads) / GiB:.3f}"
                        f" vs {_g3(llm_activation_bytes(m.llm, rep['sequence_length'], st.micro_batch, st.lora_rank, st.lora_targets, False, st.attention, st.lora_dropout)['per_layer'])}"
                        for m in MODELS.values()) + " (eager fp32 softmax, fp32 RMSNorm inputs, SwiGLU and the LoRA "
            "input copies make it larger; frozen Linears saving nothing makes it smaller).",
            "- The PPO learner runs with dropout off (eval mode, as TRL does for PPO), so LoRA dropout saves no "
            "masks; `--lora-dropout` counts them for a learner that keeps it.", ""]
    return "\n".join(out)


def render_verdict(rep: dict) -> list[str]:
    lines = []
    st = Settings(**rep["settings"])
    for plan in PLANS:
        entries = [v for v in rep["verdict"] if v["plan"] == plan.name]
        at = {layout: [r["model"] for r in rep["rows"] if r["plan"] == plan.name and r["layout"] == layout
                       and r["zero_stage"] == 2 and not r["offload"] and r["fits"]] for layout in LAYOUTS}
        lines.append(f"**{plan.name}**: at micro-batch {st.micro_batch} with ZeRO-2 (checkpointing "
                     f"{'on' if st.grad_checkpointing else 'off'}) fit colocated: {', '.join(at['colocated']) or 'none'}; "
                     f"disaggregated: {', '.join(at['disaggregated']) or 'none'}. Largest micro-batch that fits "
                     "(ZeRO-2, no offload; checkpointing off / on):")
        for v in entries:
            def mb(layout: str) -> str:
                a, b = v[f"{layout}_max_micro_batch_no_ckpt"], v[f"{layout}_max_micro_batch_ckpt"]
                fmt = lambda x: "does not fit" if x == 0 else (">=64" if x >= 64 else str(x))  # noqa: E731
                return f"{fmt(a)} / {fmt(b)}"
            extra = ""
            if "colocated_zero3_max_micro_batch_ckpt" in v and v["colocated_max_micro_batch_ckpt"] == 0:
                z3 = v["colocated_zero3_max_micro_batch_ckpt"]
                extra = (f"; colocated with ZeRO-3 + checkpointing: {'does not fit' if z3 == 0 else f'micro-batch <= {z3}'}"
                         " (not supported by rl-seg's learner today)")
            lines.append(f"- {v['model']}: colocated {mb('colocated')}; disaggregated {mb('disaggregated')}{extra}")
        lines.append("")
    return lines


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Settings()
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-targets", choices=LORA_TARGETS, default=d.lora_targets,
                   help="attn = rl-seg's 'llm' preset; attn+mlp adds the MLP projections (default)")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="images per learner micro-batch")
    p.add_argument("--samples-per-image", type=int, default=d.samples_per_image, help="K masks per image")
    p.add_argument("--tiles", type=int, default=d.tiles, help="448 px InternVL tiles per image (rl-seg: 1)")
    p.add_argument("--text-tokens", type=int, default=d.text_tokens)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=d.grad_checkpointing,
                   help="per-layer activation checkpointing of the LLM (rl-seg's learner does not enable it)")
    p.add_argument("--attention", choices=ATTENTION, default=d.attention,
                   help="eager: Sa2VA's remote code without the flash-attn package (rl-seg's environment)")
    p.add_argument("--images-per-iteration", type=int, default=d.images_per_iteration)
    p.add_argument("--reserve", type=float, default=d.reserve, help="allocator/fragmentation reserve (fraction)")
    p.add_argument("--cuda-context-gib", type=float, default=d.cuda_context_gib)
    p.add_argument("--gpu-gib", type=float, default=d.gpu_gib)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args(argv)
    for name in ("lora_rank", "micro_batch", "samples_per_image", "tiles"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    st = Settings(lora_rank=a.lora_rank, lora_targets=a.lora_targets, lora_dropout=a.lora_dropout,
                  micro_batch=a.micro_batch, samples_per_image=a.samples_per_image, tiles=a.tiles,
                  text_tokens=a.text_tokens, grad_checkpointing=a.grad_checkpointing, attention=a.attention,
                  images_per_iteration=a.images_per_iteration, reserve=a.reserve,
                  cuda_context_gib=a.cuda_context_gib, gpu_gib=a.gpu_gib)
    return st, a.out_dir


def main(argv: list[str] | None = None) -> dict:
    st, out_dir = parse_args(argv)
    rep = build_report(st)
    md = render_markdown(rep)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory_plan.md").write_text(md)
    (out_dir / "memory_plan.json").write_text(json.dumps(rep, indent=1, default=float) + "\n")
    print(md)
    return rep


if __name__ == "__main__":
    main(sys.argv[1:])
