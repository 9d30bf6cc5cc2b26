"""GPU memory plan of PPO on LoRA adapters of Sa2VA checkpoints with DeepSpeed: per process and per GPU, before
anything starts (``rl-seg plan``, and ``rl-seg submit`` before it contacts Ray).

What each process holds: a learner rank (the frozen base, LoRA + value-head model states per ZeRO stage,
activations of the mask path for a micro-batch, its per-iteration buffers at the action grid, the frozen towers'
outputs when they are reused), a rollout actor (its own copy of the base, one image's forward and K sampled masks),
and with ``placement=hybrid`` a learner rank that also samples (one copy, plus what its sampling keeps). Nothing here
needs a GPU or model weights: the arithmetic is in small pure functions, tied to transformers, peft, DeepSpeed and
rl-seg by tests/test_memory_plan_on_cpu.py, and ``benchmarks/memory_plan.py`` tabulates it for the public shapes.
Units: GiB (2**30 bytes); a GPU named "A100-80GB" is taken as 80 GiB (nvidia-smi reports 81920 MiB).

Model shapes are public configs (Hugging Face model cards and config.json files); a checkpoint folder's own
config.json and safetensors headers replace them where ``rl-seg plan`` is given one:
  - InternViT-300M-448px-V2_5 (Sa2VA-1B/4B/8B, InternVL3-based): 24 layers, hidden 1024, MLP 4096, 16 heads, qkv bias.
  - InternViT-6B-448px-V2_5 (Sa2VA-26B): 45 layers, hidden 3200, MLP 12800, 25 heads, no qkv bias, RMSNorm and
    q/k norm. Computed 5.54B, which is what InternVL2.5-26B's 25.5B total implies; the "~5.9B" often quoted is the
    48-layer InternViT-6B (flagged approximate in the output).
  - Qwen2.5-0.5B / 3B / 7B / 14B-Instruct (Sa2VA-1B, -4B, InternVL3-8B, InternVL3-14B): 24 / 36 / 28 / 48 layers,
    hidden 896 / 2048 / 3584 / 5120, MLP 4864 / 11008 / 18944 / 13824, 14 / 16 / 28 / 40 heads, 2 / 2 / 4 / 8 KV
    heads, q/k/v bias.
  - InternLM2.5-7B-chat (Sa2VA-8B): 32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads, fused wqkv, no bias.
  - InternLM2.5-20B-chat (Sa2VA-26B): 48 layers, hidden 6144, MLP 16384, 48 heads, 8 KV heads, fused wqkv.
  - Vocabularies as in Sa2VA's tokenizers (special tokens added): 151674 (Qwen), 92553 (8B), 92544 (26B).
  - SAM2-Large (sam2_hiera_large, 224.4M parameters per the SAM2 README): taken as a nominal count, not computed.
  - InternVL2.5 checkpoints keep a separate lm_head even where the released Qwen2.5 ties it (InternVL2_5-1B/4B
    list 938M / 3.71B parameters, which only an untied head gives): the Sa2VA weights are counted untied.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GiB = 2 ** 30
BF16 = 2  # bytes

# ----------------------------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    qkv_bias: bool
    qk_norm: bool
    norm: str  # "layernorm" (weight + bias) or "rmsnorm" (weight)
    image: int = 448
    patch: int = 14
    nominal_b: float = 0.0
    approx_note: str = ""

    @property
    def tokens(self) -> int:
        """ViT tokens per tile: patches plus the class token."""
        return (self.image // self.patch) ** 2 + 1


@dataclass(frozen=True)
class LLMShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    fused_qkv: bool       # InternLM2 ``attention.wqkv`` / ``attention.wo`` vs Qwen2 ``self_attn.{q,k,v,o}_proj``
    qkv_bias: bool        # Qwen2 has biases on q/k/v only
    tied_in_release: bool  # the released LLM ties lm_head to the embedding (what its nominal size counts)
    nominal_b: float      # the released LLM's nominal size, billions

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Sa2VAShape:
    name: str
    vit: ViTShape
    llm: LLMShape
    sam2_params: int = 224_400_000   # SAM2-Large, SAM2 README (approximate: published to 0.1M)
    sam2_dim: int = 256              # SAM2 prompt/decoder width; text_hidden_fcs maps the LLM to it
    internvl_nominal_b: float = 0.0  # the InternVL2.5 model the Sa2VA is built on (model card), for a sanity check
    approx: tuple[str, ...] = ()
    #: the exact parameter count of a checkpoint folder (its safetensors headers), which then replaces the formula
    counted_params: int | None = None


INTERNVIT_300M = ViTShape("InternViT-300M-448px-V2_5", layers=24, hidden=1024, intermediate=4096, heads=16,
                          qkv_bias=True, qk_norm=False, norm="layernorm", nominal_b=0.30)
INTERNVIT_6B = ViTShape("InternViT-6B-448px-V2_5", layers=45, hidden=3200, intermediate=12800, heads=25,
                        qkv_bias=False, qk_norm=True, norm="rmsnorm", nominal_b=5.9,
                        approx_note="nominal ~5.9B is the 48-layer InternViT-6B; 45 layers give ~5.54B")
QWEN25_05B = LLMShape("Qwen2.5-0.5B-Instruct", layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2,
                      vocab=151674, fused_qkv=False, qkv_bias=True, tied_in_release=True, nominal_b=0.49)
QWEN25_3B = LLMShape("Qwen2.5-3B-Instruct", layers=36, hidden=2048, intermediate=11008, heads=16, kv_heads=2,
                     vocab=151674, fused_qkv=False, qkv_bias=True, tied_in_release=True, nominal_b=3.09)
INTERNLM25_7B = LLMShape("InternLM2.5-7B-chat", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                         vocab=92553, fused_qkv=True, qkv_bias=False, tied_in_release=False, nominal_b=7.7)
QWEN25_7B = LLMShape("Qwen2.5-7B-Instruct", layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4,
                     vocab=151674, fused_qkv=False, qkv_bias=True, tied_in_release=False, nominal_b=7.62)
QWEN25_14B = LLMShape("Qwen2.5-14B-Instruct", layers=48, hidden=5120, intermediate=13824, heads=40, kv_heads=8,
                      vocab=151674, fused_qkv=False, qkv_bias=True, tied_in_release=False, nominal_b=14.7)
INTERNLM25_20B = LLMShape("InternLM2.5-20B-chat", layers=48, hidden=6144, intermediate=16384, heads=48, kv_heads=8,
                          vocab=92544, fused_qkv=True, qkv_bias=False, tied_in_release=False, nominal_b=19.9)

MODELS: dict[str, Sa2VAShape] = {
    "Sa2VA-1B": Sa2VAShape("Sa2VA-1B", INTERNVIT_300M, QWEN25_05B, internvl_nominal_b=0.94,
                           approx=("SAM2-L count nominal", "lm_head untied as in InternVL2.5 (938M card size)")),
    "Sa2VA-4B": Sa2VAShape("Sa2VA-4B", INTERNVIT_300M, QWEN25_3B, internvl_nominal_b=3.71,
                           approx=("SAM2-L count nominal", "lm_head untied as in InternVL2.5 (3.71B card size)")),
    "Sa2VA-8B": Sa2VAShape("Sa2VA-8B", INTERNVIT_300M, INTERNLM25_7B, internvl_nominal_b=8.08,
                           approx=("SAM2-L count nominal",)),
    "Sa2VA-26B": Sa2VAShape("Sa2VA-26B", INTERNVIT_6B, INTERNLM25_20B, internvl_nominal_b=25.5,
                            approx=("SAM2-L count nominal", INTERNVIT_6B.approx_note)),
    "Sa2VA-InternVL3-8B": Sa2VAShape("Sa2VA-InternVL3-8B", INTERNVIT_300M, QWEN25_7B, internvl_nominal_b=7.94,
                                     approx=("SAM2-L count nominal",)),
    "Sa2VA-InternVL3-14B": Sa2VAShape("Sa2VA-InternVL3-14B", INTERNVIT_300M, QWEN25_14B, internvl_nominal_b=15.1,
                                      approx=("SAM2-L count nominal",)),
}

# ----------------------------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------------------------


def vit_params(v: ViTShape) -> int:
    h, i = v.hidden, v.intermediate
    norm = 2 * h if v.norm == "layernorm" else h
    per_layer = (h * 3 * h + (3 * h if v.qkv_bias else 0)   # qkv
                 + h * h + h                                 # proj
                 + h * i + i + i * h + h                     # fc1, fc2
                 + 2 * norm + 2 * h                          # norm1/2, layer scales ls1/ls2
                 + (2 * h if v.qk_norm else 0))              # q_norm, k_norm
    embeddings = 3 * v.patch * v.patch * h + h + h + v.tokens * h  # patch conv (+bias), class token, positions
    return v.layers * per_layer + embeddings


def llm_layer_params(m: LLMShape) -> int:
    h = m.hidden
    attn = h * m.q_dim + 2 * h * m.kv_dim + m.q_dim * h + ((m.q_dim + 2 * m.kv_dim) if m.qkv_bias else 0)
    mlp = 3 * h * m.intermediate  # SwiGLU: gate/up (w1/w3) and down (w2), no bias
    return attn + mlp + 2 * h     # two RMSNorms


def llm_params(m: LLMShape, untied_head: bool) -> int:
    """Embedding + decoder layers + final norm (+ a separate lm_head when ``untied_head``)."""
    embed = m.vocab * m.hidden
    return embed + m.layers * llm_layer_params(m) + m.hidden + (embed if untied_head else 0)


def llm_params_as_released(m: LLMShape) -> int:
    """What the released LLM's nominal size counts (a tied head is counted once)."""
    return llm_params(m, untied_head=not m.tied_in_release)


def projector_params(vit_hidden: int, llm_hidden: int) -> int:
    """InternVL ``mlp1``: LayerNorm(4 d_vit) -> Linear(4 d_vit, d) -> GELU -> Linear(d, d) (pixel shuffle x4)."""
    d_in = 4 * vit_hidden
    return 2 * d_in + d_in * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def text_hidden_fcs_params(llm_hidden: int, sam_dim: int) -> int:
    """Sa2VA's ``text_hidden_fcs``: Linear(d, d) -> ReLU -> Linear(d, 256), the [SEG] state into SAM2's prompt."""
    return llm_hidden * llm_hidden + llm_hidden + llm_hidden * sam_dim + sam_dim


def base_params(model: Sa2VAShape) -> dict[str, int]:
    parts = {
        "vision": vit_params(model.vit),
        "projector": projector_params(model.vit.hidden, model.llm.hidden),
        "llm": llm_params(model.llm, untied_head=True),
        "text_hidden_fcs": text_hidden_fcs_params(model.llm.hidden, model.sam2_dim),
        "sam2": model.sam2_params,
    }
    parts["total"] = sum(parts.values())
    return parts


def total_params(model: Sa2VAShape) -> int:
    """The checkpoint's own count where it was read, else the formula's."""
    return model.counted_params if model.counted_params is not None else base_params(model)["total"]


LORA_TARGETS = ("attn", "attn+mlp")


def lora_linears(m: LLMShape, targets: str) -> list[tuple[str, int, int]]:
    """(module, in_features, out_features) of the LoRA-wrapped Linears of one decoder layer.

    ``attn`` is rl-seg's ``llm`` preset (q/k/v/o, or wqkv/wo on InternLM2); ``attn+mlp`` adds the SwiGLU projections
    (gate/up/down, or w1/w3/w2). The fused wqkv gets one LoRA pair, not three: fewer parameters than q/k/v."""
    if targets not in LORA_TARGETS:
        raise ValueError(f"targets {targets!r}: one of {LORA_TARGETS}")
    h, i = m.hidden, m.intermediate
    if m.fused_qkv:
        mods = [("wqkv", h, m.q_dim + 2 * m.kv_dim), ("wo", m.q_dim, h)]
        mlp = [("w1", h, i), ("w3", h, i), ("w2", i, h)]
    else:
        mods = [("q_proj", h, m.q_dim), ("k_proj", h, m.kv_dim), ("v_proj", h, m.kv_dim), ("o_proj", m.q_dim, h)]
        mlp = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
    return mods + (mlp if targets == "attn+mlp" else [])


def lora_params(m: LLMShape, r: int, targets: str) -> int:
    """LoRA A (r x in) and B (out x r) per wrapped Linear, bias='none' as rl-seg configures peft."""
    return m.layers * sum(r * (fin + fout) for _, fin, fout in lora_linears(m, targets))


def value_head_params(hidden: int) -> int:
    """rl-seg's PPOModule value head, Linear(d, d) -> Tanh -> Linear(d, 1); always trainable (it is handed to the
    optimizer whatever the advantage estimator), so it has optimizer states like the adapter."""
    return hidden * hidden + hidden + hidden + 1


def trainable_params(model: Sa2VAShape, r: int, targets: str) -> dict[str, int]:
    lora = lora_params(model.llm, r, targets)
    value = value_head_params(model.llm.hidden)
    return {"lora": lora, "value_head": value, "total": lora + value}


def largest_module_params(model: Sa2VAShape) -> int:
    """The largest single module's own parameters (DeepSpeed's ``model_to_params`` measure; what ZeRO-3 gathers
    at once): the token embedding on every size here."""
    m = model.llm
    return max(m.vocab * m.hidden, m.hidden * m.intermediate, m.hidden * (m.q_dim + 2 * m.kv_dim),
               model.vit.hidden * model.vit.intermediate)


# ----------------------------------------------------------------------------------------------------------------
# Model states of the trainable parameters, per ZeRO stage (bytes per rank)
# ----------------------------------------------------------------------------------------------------------------
# bf16 mixed precision as DeepSpeed implements it (and as its estimator counts, stage_1_and_2.py:
# "18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit", plus 2 for 16-bit params):
# ZeRO's 16 bytes/param rule (Rajbhandari et al. 2020: 2 + 2 + 12) plus the fp32 gradient partition DeepSpeed
# keeps for the optimizer step. Which copies are partitioned:
#   stage 0: nothing (BF16_Optimizer keeps fp32 master and fp32 gradient accumulation, 20 B/param);
#   stage 1: optimizer states, fp32 master and fp32 gradient (the 16-bit gradient is all-reduced in full);
#   stage 2: also the 16-bit gradient (reduce-scattered bucket by bucket);
#   stage 3: also the 16-bit parameters.
# CPU offload (stages 1-3; DeepSpeed has none at stage 0) moves the fp32 gradient, master and Adam m/v to CPU
# RAM; at stages 2-3 the 16-bit gradient partition then does not exist on the GPU at all (buckets are copied
# straight into the CPU fp32 gradient), at stage 1 the full 16-bit gradient stays.
# rl-seg's learner today runs the adapter in fp32 under torch autocast instead (4 B params, 4 B grads, 8 B Adam,
# plus DeepSpeed's fp32 partition copy at stages >= 1): within 2 B/param of this, <= 0.2 GiB on every size here.

STATE_COMPONENTS = ("param16", "grad16", "grad32", "master32", "adam_m", "adam_v")
_STATE_BYTES = {"param16": 2, "grad16": 2, "grad32": 4, "master32": 4, "adam_m": 4, "adam_v": 4}
OFFLOADED = ("grad32", "master32", "adam_m", "adam_v")


def state_bytes(params: int, stage: int, ranks: int, offload: bool = False) -> dict[str, dict[str, float]]:
    """{component: {"gpu": bytes, "cpu": bytes}} per rank for ``params`` trainable parameters."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}")
    if offload and stage == 0:
        raise ValueError("DeepSpeed offloads the optimizer only with ZeRO stages 1-3")
    partitioned_from = {"param16": 3, "grad16": 2, "grad32": 1, "master32": 1, "adam_m": 1, "adam_v": 1}
    out = {}
    for c in STATE_COMPONENTS:
        full = params * _STATE_BYTES[c]
        per_rank = full / ranks if stage >= partitioned_from[c] else float(full)
        gpu, cpu = per_rank, 0.0
        if offload and c in OFFLOADED:
            gpu, cpu = 0.0, per_rank
        elif offload and c == "grad16" and stage >= 2:
            gpu = 0.0
        out[c] = {"gpu": gpu, "cpu": cpu}
    return out


def state_totals(states: dict[str, dict[str, float]]) -> tuple[float, float]:
    return sum(v["gpu"] for v in states.values()), sum(v["cpu"] for v in states.values())


def frozen_weight_bytes(model: Sa2VAShape, stage: int, ranks: int, bytes_per_param: int = BF16,
                        prefetch_params: int = 50_000_000) -> dict[str, float]:
    """The frozen base on one learner rank. LoRA leaves the base out of the optimizer, and ZeRO stages 0-2 only
    partition what the optimizer holds, so every rank has the whole base. Stage 3 partitions every parameter of
    the module DeepSpeed wraps, frozen or not, and gathers a module's parameters around its forward/backward:
    per rank 1/N of the base, plus the live gathered set (the largest module and the prefetch bucket,
    ``stage3_prefetch_bucket_size`` = 5e7 by default). Parameters under ``stage3_param_persistence_threshold``
    (1e5: norms, biases) stay replicated; they are well under 0.1% here and left out."""
    total = total_params(model) * bytes_per_param
    if stage < 3:
        return {"resident": float(total), "gathered": 0.0}
    return {"resident": total / ranks, "gathered": float((largest_module_params(model) + prefetch_params)
                                                          * bytes_per_param)}


def comm_buffer_bytes(trainable: int, stage: int, bucket: int = 500_000_000) -> float:
    """DeepSpeed's reduce / all-gather buckets (5e8 elements by default) are bounded by the trainable
    parameters, which is small for LoRA: one 16-bit bucket's worth."""
    return float(BF16 * min(bucket, trainable)) if stage >= 1 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------
# The learner's PPO step runs the policy's forward with gradients over a micro-batch of B images and the
# backward through the LLM (LoRA sits in every layer, so the gradient reaches layer 0). What autograd keeps:
#   - InternViT and mlp1: frozen, and their input needs no gradient -> nothing saved (a transient forward peak);
#   - LLM: per decoder layer, the tensors counted in ``llm_layer_saved_bytes_per_token``;
#   - SAM2 image encoder: frozen, input needs no gradient -> transient only;
#   - SAM2 mask decoder: frozen but its prompt (the [SEG] state) needs a gradient -> saved activations;
#   - the PPO loss over K sampled masks per image at 256 x 256 (float32 log-probs, ratios, KL ...).
# The reference policy for the KL term is the same model with its adapter disabled (``disable_adapter`` in
# rl_seg/roles/learner.py) under no_grad: no second copy of the weights, 0 bytes beyond a transient forward.
#
# Reference estimate: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
# (arXiv:2205.05198), eq. 1: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit without recomputation (GPT: GELU MLP
# of 4h, LayerNorm, dropout everywhere, every weight trained); with full recomputation 2*s*b*h per layer (the
# layer input). The count below re-derives their itemization for what runs here, because three things differ
# and each changes the total by 10-60%: a frozen Linear saves no input (autograd saves the input only for the
# weight gradient), the MLP is SwiGLU of width I (silu input, silu output and up output saved: 6*I bytes per
# token instead of 19h), RMSNorm upcasts to float32 (4h bytes per norm), and each LoRA'd Linear saves its own
# 16-bit copy of its input (peft casts x to the adapter's fp32 dtype; autocast makes a fresh bf16 copy per module).
# Attention: without the flash-attn package (not in rl-seg's pinned set) Sa2VA's remote code runs the LLM with
# eager attention, which keeps the float32 softmax output and its bf16 copy (6*a*s bytes per token) and K/V
# repeated to all heads; "flash" (flash-attn or SDPA) keeps q, k, v, the output and the log-sum-exp.
# tests/test_memory_plan_on_cpu.py checks this count against the tensors autograd saves in a real transformers
# Qwen2 layer with a real peft adapter under autocast (CPU), to within 10%.

ATTENTION = ("eager", "flash")


def llm_layer_saved_bytes_per_token(m: LLMShape, seq: int, r: int, targets: str, attention: str = "eager",
                                    lora_dropout: float = 0.0) -> float:
    """Bytes autograd keeps per token for one decoder layer (bf16 activations, fp32 adapter, autocast)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r}: one of {ATTENTION}")
    h, i = m.hidden, m.intermediate
    norms = 2 * (4 * h + 4)                                  # two RMSNorms: fp32 input + rsqrt
    if attention == "eager":
        attn = 3 * BF16 * m.q_dim + 6 * m.heads * seq        # q, repeated k and v; fp32 softmax + bf16 copy
    else:
        attn = BF16 * (2 * m.q_dim + 2 * m.kv_dim) + 4 * m.heads   # q, k, v, output, fp32 log-sum-exp
    mlp = 3 * BF16 * i                                       # silu input, silu output, up output
    lora = 0.0
    for _, fin, _ in lora_linears(m, targets):
        lora += BF16 * fin + BF16 * r                        # the module's input copy, lora_A output
        if lora_dropout > 0:
            lora += 1 * fin                                  # CUDA dropout keeps a 1-byte mask
    return norms + attn + mlp + lora


def korthikanti_layer_bytes(seq: int, batch: int, hidden: int, heads: int) -> float:
    """Korthikanti et al. 2022 eq. 1, for comparison only: s*b*h*(34 + 5*a*s/h) bytes per layer."""
    return seq * batch * hidden * (34 + 5 * heads * seq / hidden)


def llm_activation_bytes(m: LLMShape, seq: int, batch: int, r: int, targets: str, grad_checkpointing: bool,
                         attention: str = "eager", lora_dropout: float = 0.0) -> dict[str, float]:
    """Saved activations of the whole LLM and the backward's working set.

    Without checkpointing every layer's tensors stay until the backward reaches it; the backward then needs about
    one more layer's worth for the gradients in flight. With per-layer checkpointing (HF's
    ``gradient_checkpointing_enable``) a layer keeps only its bf16 input (2*s*b*h, Korthikanti's full
    recomputation) and the backward recomputes one layer at a time (its activations plus their gradients)."""
    per_layer = llm_layer_saved_bytes_per_token(m, seq, r, targets, attention, lora_dropout) * seq * batch
    final_norm = (4 * m.hidden + 4) * seq * batch
    if grad_checkpointing:
        saved = m.layers * BF16 * seq * batch * m.hidden + final_norm
        working = 2 * per_layer
    else:
        saved = m.layers * per_layer + final_norm
        working = per_layer
    return {"saved": float(saved), "working": float(working), "per_layer": float(per_layer)}


def vit_transient_bytes(v: ViTShape, images: int, tiles: int, attention: str = "eager") -> float:
    """One InternViT layer's forward peak, no gradient: the widest live tensors (MLP hidden in and out, q/k/v,
    residual and norm) and, eager, the attention scores (bf16) and their float32 softmax."""
    s = v.tokens
    scores = 6 * v.heads * s * s if attention == "eager" else 0
    return float(images * tiles * (s * (BF16 * 2 * v.intermediate + BF16 * 6 * v.hidden) + scores))


# SAM2 Hiera-L at 1024 x 1024 (approximate, from its public config): stage 1 has (1024/4)^2 tokens of width 144,
# MLP ratio 4, windowed attention (SDPA: no token x token matrix); the FPN neck gives 256 channels at 256^2,
# 128^2 and 64^2 (the decoder uses the 64^2 embedding and the two high-resolution levels).
SAM2_IMAGE = 1024
SAM2_STAGE1_TOKENS = (SAM2_IMAGE // 4) ** 2
SAM2_STAGE1_DIM = 144
SAM2_LOW_RES = 256   # mask decoder logits are 256 x 256


def sam2_encoder_transient_bytes(images: int) -> float:
    """Frozen, input without gradient: a transient forward peak per image (the widest Hiera block: x, norm output
    (fp32 under autocast), qkv, attention output, MLP hidden before and after GELU) plus the neck's features."""
    block = SAM2_STAGE1_TOKENS * (BF16 * SAM2_STAGE1_DIM * 6 + 4 * SAM2_STAGE1_DIM + BF16 * 4 * SAM2_STAGE1_DIM * 2)
    neck = BF16 * 256 * (256 ** 2 + 128 ** 2 + 64 ** 2)
    return float(images * (block + neck))


def sam2_decoder_saved_bytes(images: int) -> float:
    """The mask decoder with a gradient flowing to its prompt (approximate): two two-way layers over 64^2 image
    tokens (attention width 128 for the downsampled cross-attentions, LayerNorms in float32 over 256), the
    upscaling path (LayerNorm2d + GELU at 128^2 x 64, GELU and the hypernetwork product at 256^2 x 32) and the
    multimask logits in float32."""
    tokens = 64 * 64
    two_way = 2 * tokens * (BF16 * 128 * 3 + 4 * 256 + BF16 * 256)
    upscale = BF16 * 128 * 128 * 64 * 6 + BF16 * 256 * 256 * 32 * 3
    logits = 4 * 4 * SAM2_LOW_RES ** 2
    return float(images * (two_way + upscale + logits))


# rl_seg.ppo.core.ppo_loss over MaskDistribution (K x H x W float32 logits, log-probs, ratio, clipped surrogate,
# entropy, closed-form KL to the reference): measured with saved-tensor hooks at 97 bytes per sampled pixel with
# the KL term, 69 without (tests/test_memory_plan_on_cpu.py re-measures it against this bound).
PPO_LOSS_BYTES_PER_SAMPLED_PIXEL = 100
# What a learner rank holds for all of its images over an iteration (rl_seg/roles/learner.py ``prepared``):
# actions and valid (bool), old log-probs, taken probabilities, advantages (float32) per sampled pixel.
PPO_BUFFER_BYTES_PER_SAMPLED_PIXEL = 1 + 1 + 4 + 4 + 4


# ``compute_advantages`` over all of a rank's images at once (rl_seg/ppo/core.py, ``pixel`` credit): the padded,
# concatenated actions / targets / valid masks (bool), the taken probabilities (float32), float64 credit and its
# case-by-case ``torch.where`` temporaries, the float32 result. Counted from the code, not measured.
ADVANTAGE_BYTES_PER_SAMPLED_PIXEL = 3 + 4 + 3 * 8 + 4
# SAM2's side of the image-resolution actions with gradient: the 256^2 logits go bilinearly to 1024^2 (float32)
# and from there to the image (``upsample_like_predict_forward``); bilinear interpolation keeps no input for
# backward, so these are transients of the forward and of the backward (the gradient at 1024^2).
UPSAMPLE_BYTES_PER_IMAGE = 2 * 4 * SAM2_IMAGE ** 2


def preprocess_bytes(vision: int = 448, tiles: int = 1) -> int:
    """``Sa2VAPolicy.preprocess``: SAM2's 1024^2 image and the InternVL tiles (bf16)."""
    return 3 * (SAM2_IMAGE ** 2 + tiles * vision ** 2) * BF16


def frozen_feature_bytes(model: Sa2VAShape, tiles: int = 1, tokens_per_tile: int = 256) -> int:
    """What ``encode_frozen`` keeps per image (bf16): SAM2's three backbone levels after the decoder's stride-4/8
    projections (32 x 256^2, 64 x 128^2, 256 x 64^2 channels x positions) and the vision side's image tokens."""
    sam2 = 32 * 256 ** 2 + 64 * 128 ** 2 + 256 * 64 ** 2
    return BF16 * (sam2 + tiles * tokens_per_tile * model.llm.hidden)


def _pixels(action_hw) -> int:
    h, w = (action_hw, action_hw) if isinstance(action_hw, int) else action_hw
    return int(h) * int(w)


def ppo_loss_saved_bytes(images: int, k: int, action_hw=SAM2_LOW_RES) -> float:
    return float(images * k * _pixels(action_hw) * PPO_LOSS_BYTES_PER_SAMPLED_PIXEL)


def rank_buffer_bytes(images_per_rank: int, k: int, action_hw=SAM2_LOW_RES, tiles: int = 1) -> float:
    """A learner rank's per-iteration state (``prepared`` in rl_seg/roles/learner.py) for all its images: the
    preprocessed inputs, the K masks' buffers and the reference logits (float32) at the action grid."""
    px = _pixels(action_hw)
    return float(images_per_rank * (preprocess_bytes(tiles=tiles) + k * px * PPO_BUFFER_BYTES_PER_SAMPLED_PIXEL
                                    + 4 * px))


def advantage_bytes(images_per_rank: int, k: int, action_hw=SAM2_LOW_RES) -> float:
    return float(images_per_rank * k * _pixels(action_hw) * ADVANTAGE_BYTES_PER_SAMPLED_PIXEL)


def seq_len(tiles: int, text_tokens: int, tokens_per_tile: int = 256) -> int:
    """LLM tokens per image: 448 px tiles give 1024 ViT patches, pixel shuffle (0.5) leaves 256 per tile."""
    return tiles * tokens_per_tile + text_tokens


# ----------------------------------------------------------------------------------------------------------------
# Per-process and per-GPU totals
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    lora_rank: int = 16
    lora_targets: str = "attn+mlp"
    lora_dropout: float = 0.0  # the PPO learner runs in eval mode: LoRA dropout is off, no masks are saved
    micro_batch: int = 4
    samples_per_image: int = 8
    tiles: int = 1
    text_tokens: int = 64
    grad_checkpointing: bool = False
    attention: str = "eager"
    images_per_iteration: int = 128
    reserve: float = 0.10
    cuda_context_gib: float = 2.0
    gpu_gib: float = 80.0
    #: where masks are sampled and the PPO loss runs: (256, 256) for the decoder's native grid, the image's own
    #: (H, W) for image-resolution actions (``policy.action_resolution=image``)
    action_hw: tuple[int, int] = (SAM2_LOW_RES, SAM2_LOW_RES)
    #: frozen-tower reuse (``learner.reuse_frozen_towers``): towers run once per image without gradient, their
    #: outputs kept for the iteration
    reuse_frozen: bool = False
    #: bytes per frozen parameter (2: bf16/fp16 weights, 4: float32)
    weight_bytes: int = BF16


def learner_bytes(model: Sa2VAShape, st: Settings, stage: int, ranks: int, offload: bool,
                  hybrid: bool = False) -> dict[str, float]:
    """One learner rank: frozen weights, trainable states, activations; GPU bytes before reserve and context.

    Two moments can be the peak. The update: saved activations of a micro-batch, the backward's working set, the
    rank's per-iteration buffers and the advantage computation before it. Without frozen-tower reuse the towers
    run inside every forward with gradient, so their transient adds to the LLM's held activations; with reuse
    they run once per image before the update (a moment of their own) and their outputs are kept instead.
    ``hybrid``: the rank also samples, which happens before its update and keeps, per image, the old logits."""
    seq = seq_len(st.tiles, st.text_tokens)
    weights = frozen_weight_bytes(model, stage, ranks, st.weight_bytes)
    trainable = trainable_params(model, st.lora_rank, st.lora_targets)["total"]
    states = state_bytes(trainable, stage, ranks, offload)
    state_gpu, state_cpu = state_totals(states)
    state_gpu += comm_buffer_bytes(trainable, stage)
    b = st.micro_batch
    k = st.samples_per_image
    images = math.ceil(st.images_per_iteration / ranks)
    llm = llm_activation_bytes(model.llm, seq, b, st.lora_rank, st.lora_targets, st.grad_checkpointing,
                               st.attention, st.lora_dropout)
    saved = llm["saved"] + sam2_decoder_saved_bytes(b) + ppo_loss_saved_bytes(b, k, st.action_hw)
    towers = max(vit_transient_bytes(model.vit, b, st.tiles, st.attention), sam2_encoder_transient_bytes(b))
    upsample = UPSAMPLE_BYTES_PER_IMAGE * b
    buffers = rank_buffer_bytes(images, k, st.action_hw, st.tiles)
    kept = 0.0
    if st.reuse_frozen:
        kept += images * frozen_feature_bytes(model, st.tiles)
    if hybrid:
        kept += images * 4 * _pixels(st.action_hw)  # the old logits the rank's own sampling kept
    if st.reuse_frozen:
        # the towers alone (one image, no gradient), then the update without them
        transient = max(llm["working"], upsample)
        towers_moment = max(vit_transient_bytes(model.vit, 1, st.tiles, st.attention), sam2_encoder_transient_bytes(1))
    else:
        transient = max(towers, llm["working"], upsample)
        towers_moment = 0.0
    update = saved + transient + buffers + kept
    advantages = buffers + kept + advantage_bytes(images, k, st.action_hw)
    acts = max(update, advantages, towers_moment + buffers + kept)
    return {"weights": weights["resident"] + weights["gathered"], "states": state_gpu, "activations": acts,
            "cpu_offload": state_cpu, "llm_saved": llm["saved"], "llm_per_layer": llm["per_layer"],
            "transient": transient, "rank_buffers": buffers, "kept": kept, "trainable_params": trainable,
            "peak_moment": ("update" if acts == update else "advantages" if acts == advantages else "towers")}


def rollout_bytes(model: Sa2VAShape, st: Settings) -> dict[str, float]:
    """One rollout actor: its own copy of the whole base plus the adapter (fp32), and one image's forward
    without gradient or KV cache (the mask comes from one teacher-forced pass, nothing is generated); the K masks
    are drawn at the action grid (logits / T, uniforms, probabilities in float32, the masks)."""
    weights = total_params(model) * st.weight_bytes + lora_params(model.llm, st.lora_rank, st.lora_targets) * 4
    return {"weights": float(weights), "activations": sampling_bytes(model, st)}


def sampling_bytes(model: Sa2VAShape, st: Settings) -> float:
    """One image's no-gradient forward and the K masks drawn from it."""
    seq = seq_len(st.tiles, st.text_tokens)
    layer = llm_layer_saved_bytes_per_token(model.llm, seq, st.lora_rank, st.lora_targets, st.attention) * seq
    transient = max(vit_transient_bytes(model.vit, 1, st.tiles, st.attention), sam2_encoder_transient_bytes(1),
                    layer, UPSAMPLE_BYTES_PER_IMAGE)
    masks = st.samples_per_image * _pixels(st.action_hw) * (4 + 4 + 4 + 1)
    return float(transient + masks + preprocess_bytes(tiles=st.tiles))


def gpu_total(process_tensor_bytes: list[float], st: Settings) -> dict[str, float]:
    """Per GPU: every process's tensors plus the allocator/fragmentation reserve, plus a CUDA context (CUDA
    runtime, cuBLAS/cuDNN workspaces, NCCL buffers; ~2 GiB per process is a conservative round figure)."""
    tensors = sum(process_tensor_bytes)
    reserve = st.reserve * tensors
    context = st.cuda_context_gib * GiB * len(process_tensor_bytes)
    total = tensors + reserve + context
    cap = st.gpu_gib * GiB
    return {"tensors": tensors, "reserve": reserve, "context": context, "total": total,
            "headroom": cap - total, "fits": total <= cap}


@dataclass
class Plan:
    name: str
    gpus: int
    stages: tuple[tuple[int, bool], ...]  # (ZeRO stage, CPU offload)
    rollout_gpus_when_disaggregated: int = 1


ALL_STAGES = ((0, False), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True))
PLANS = (Plan("plan 1: 4 x A100-80GB", 4, ALL_STAGES),
         Plan("plan 2: 2 x A100-80GB, ZeRO-2", 2, ((2, False), (2, True))))
LAYOUTS = ("colocated", "disaggregated", "hybrid")


def evaluate(model: Sa2VAShape, st: Settings, plan: Plan, layout: str, stage: int, offload: bool) -> dict:
    """One table row: the most loaded GPU of the layout (a learner GPU, with its rollout actor if colocated;
    hybrid: the learner alone, which also samples)."""
    ranks = plan.gpus - plan.rollout_gpus_when_disaggregated if layout == "disaggregated" else plan.gpus
    if ranks < 1:
        raise ValueError(f"{plan.name}: no GPU left for learners")
    hybrid = layout == "hybrid"
    learner = learner_bytes(model, st, stage, ranks, offload, hybrid=hybrid)
    rollout = rollout_bytes(model, st)
    procs = [learner["weights"] + learner["states"] + learner["activations"]]
    if layout == "colocated":
        procs.append(rollout["weights"] + rollout["activations"])
    gpu = gpu_total(procs, st)
    rollout_gpu = gpu_total([rollout["weights"] + rollout["activations"]], st)
    per_actor = rollout_gpu["total"]
    return {
        "model": model.name, "plan": plan.name, "layout": layout, "learner_ranks": ranks, "zero_stage": stage,
        "offload": offload, "micro_batch": st.micro_batch,
        "weights": learner["weights"], "lora_optimizer": learner["states"], "activations": learner["activations"],
        "rollout_copy": procs[1] if layout == "colocated" else 0.0,
        "context_and_reserve": gpu["context"] + gpu["reserve"], "total": gpu["total"],
        "headroom": gpu["headroom"], "fits": gpu["fits"],
        "cpu_offload_node": learner["cpu_offload"] * ranks,
        # Each process materializes its copy in CPU RAM before ``.to(device)`` (load_policy passes no device_map):
        # the transient peak if all learners and rollout actors load at once.
        "cpu_load_peak_node": total_params(model) * st.weight_bytes * (ranks + {"colocated": ranks, "hybrid": 0}.get(
            layout, plan.rollout_gpus_when_disaggregated)),
        "rollout_gpu_total_per_actor": per_actor if layout == "disaggregated" else None,
        "rollout_actors_per_rollout_gpu": (int((st.gpu_gib * GiB) // per_actor) if layout == "disaggregated"
                                           else None),
        "detail": learner,
    }


def max_micro_batch(model: Sa2VAShape, st: Settings, plan: Plan, layout: str, stage: int, offload: bool,
                    limit: int = 64) -> int:
    """The largest micro-batch (images) that fits; 0 if not even one."""
    best = 0
    for b in range(1, limit + 1):
        s = Settings(**{**asdict(st), "micro_batch": b})
        if evaluate(model, s, plan, layout, stage, offload)["fits"]:
            best = b
        else:
            break
    return best




# ----------------------------------------------------------------------------------------------------------------
# A train config on named GPUs (rl-seg plan / rl-seg submit)
# ----------------------------------------------------------------------------------------------------------------

#: Memory of GPUs by name when a spec gives none (GiB as nvidia-smi reports the total: 81920 MiB = 80 GiB).
GPU_MEMORY_GIB = {"A100": 80.0, "H100": 79.6, "H200": 140.4, "B200": 178.4, "A10G": 22.0, "L4": 22.0, "L40S": 44.4,
                  "V100": 32.0, "A6000": 47.5}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class GpuSpec:
    count: int
    name: str
    gib: float

    def __str__(self) -> str:
        return f"{self.count} x {self.name} ({self.gib:g} GiB each)"


def parse_gpus(text: str) -> GpuSpec:
    """``4xA100-80GB``, ``1xH200``, ``2x80GB``: a count, a name, and the memory per GPU (GiB) after the name or known
    for it (``GPU_MEMORY_GIB``)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(?:([A-Za-z][\w.]*?)(?:-(\d+(?:\.\d+)?)\s*(?:GB|GiB|G))?"
                     r"|(\d+(?:\.\d+)?)\s*(?:GB|GiB|G))\s*", text or "")
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"--gpus {text!r}: expected COUNTxNAME[-MEMORYGB], e.g. 4xA100-80GB, 1xH200 or 2x80GB")
    count, name, mem = int(m.group(1)), m.group(2) or "GPU", m.group(3) or m.group(4)
    if mem is None:
        known = GPU_MEMORY_GIB.get(name.upper())
        if known is None:
            raise ValueError(f"--gpus {text!r}: no memory size given and {name!r} is not one of "
                             f"{sorted(GPU_MEMORY_GIB)}; write it as e.g. 1x{name}-80GB")
        return GpuSpec(count, name, known)
    return GpuSpec(count, name, float(mem))


def _safetensors_params(folder: Path) -> tuple[int, dict[str, int]] | None:
    """The exact parameter count of a checkpoint folder from its safetensors headers (no weight is read), and the
    count per top-level module; None without safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total, parts = 0, {}
    for f in files:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = math.prod(meta["shape"])
            total += count
            parts[key.split(".", 1)[0]] = parts.get(key.split(".", 1)[0], 0) + count
    return total, parts


def shape_from_checkpoint(folder: str | Path) -> tuple[Sa2VAShape, dict]:
    """The Sa2VA shape of a Hugging Face checkpoint folder (InternVL family: ``llm_config`` / ``vision_config``;
    Qwen-VL family: its text model, with the vision side approximated by InternViT-300M-sized tiles), with the exact
    parameter count where the folder has weights. Returns (shape, facts: dtype, family, notes)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    notes = []
    llm_cfg = config.get("llm_config") or config.get("text_config")
    if not llm_cfg:
        raise ValueError(f"{folder / 'config.json'}: neither llm_config nor text_config: not a Sa2VA checkpoint")
    arch = (llm_cfg.get("architectures") or [""])[0]
    fused = arch.startswith("InternLM2")
    heads = int(llm_cfg["num_attention_heads"])
    llm = LLMShape(arch or "LLM", layers=int(llm_cfg["num_hidden_layers"]), hidden=int(llm_cfg["hidden_size"]),
                   intermediate=int(llm_cfg["intermediate_size"]), heads=heads,
                   kv_heads=int(llm_cfg.get("num_key_value_heads") or heads), vocab=int(llm_cfg["vocab_size"]),
                   fused_qkv=fused, qkv_bias=not fused, tied_in_release=bool(llm_cfg.get("tie_word_embeddings")),
                   nominal_b=0.0)
    vc = config.get("vision_config") or {}
    if config.get("llm_config") and vc:
        vit = ViTShape(vc.get("architectures", ["InternViT"])[0], layers=int(vc["num_hidden_layers"]),
                       hidden=int(vc["hidden_size"]), intermediate=int(vc["intermediate_size"]),
                       heads=int(vc["num_attention_heads"]), qkv_bias=bool(vc.get("qkv_bias", True)),
                       qk_norm=bool(vc.get("qk_normalization", False)),
                       norm="rmsnorm" if vc.get("norm_type") == "rms_norm" else "layernorm",
                       image=int(config.get("force_image_size") or vc.get("image_size", 448)),
                       patch=int(vc.get("patch_size", 14)))
    else:
        vit = INTERNVIT_300M
        notes.append("Qwen-VL vision tower approximated by InternViT-300M tiles")
    counted = _safetensors_params(folder)
    if counted is None:
        notes.append("no weights in the folder: parameter count from the shapes")
    shape = Sa2VAShape(config.get("_name_or_path") or folder.name, vit, llm,
                       counted_params=counted[0] if counted else None, approx=tuple(notes))
    dtype = str(config.get("torch_dtype") or config.get("dtype") or llm_cfg.get("torch_dtype") or "bfloat16")
    family = "qwen_vl" if config.get("text_config") else "internvl"
    return shape, {"dtype": dtype, "family": family, "architecture": arch, "notes": notes,
                   "sam2": "tiny" if config.get("replica_sam2_size") == "tiny" else "hiera_l"}


def _image_hw(cfg) -> tuple[tuple[int, int], str | None]:
    """The largest image a run of ``cfg`` samples actions on (its own size at native resolution), and a note when
    the datasets cannot be read here (a submitting machine without the cluster's data): then SAM2's input size."""
    if cfg.policy.action_resolution == "native":
        return (SAM2_LOW_RES, SAM2_LOW_RES), None
    if cfg.data.image_size is not None:
        return (cfg.data.image_size, cfg.data.image_size), None
    from PIL import Image

    from .data import DataError, load_dataset

    biggest = (0, 0)
    try:
        for name in cfg.data.datasets:
            for sample in load_dataset(name, cfg.data.train_split, limit=cfg.data.train_limit):
                with Image.open(sample.image_path) as im:
                    w, h = im.size
                if h * w > biggest[0] * biggest[1]:
                    biggest = (h, w)
    except (DataError, OSError) as exc:
        return (SAM2_IMAGE, SAM2_IMAGE), (f"datasets not readable here ({exc}): actions assumed at "
                                          f"{SAM2_IMAGE}x{SAM2_IMAGE}")
    return (biggest if biggest[0] else (SAM2_LOW_RES, SAM2_LOW_RES)), None


def settings_for(cfg, gpus: GpuSpec, shape: Sa2VAShape, facts: dict, action_hw: tuple[int, int]) -> Settings:
    """The plan's settings for a train config (what the learner and the rollouts will actually run)."""
    targets = cfg.policy.lora.targets
    lora_targets = "attn+mlp" if targets == "llm+mlp" else "attn"
    dtype = cfg.policy.dtype or facts["dtype"]
    # sdpa is the default where the language model allows it (transformers' Qwen2 does; InternLM2 does not)
    eager = cfg.policy.attn_implementation == "eager" or shape.llm.fused_qkv
    return Settings(lora_rank=cfg.policy.lora.r, lora_targets=lora_targets, lora_dropout=0.0,
                    micro_batch=cfg.learner.micro_batch_images, samples_per_image=cfg.rollout.samples_per_image,
                    tiles=1 if cfg.policy.max_tiles <= 1 else cfg.policy.max_tiles + 1,
                    grad_checkpointing=cfg.policy.gradient_checkpointing, attention="eager" if eager else "flash",
                    images_per_iteration=cfg.data.images_per_iteration, gpu_gib=gpus.gib, action_hw=action_hw,
                    reuse_frozen=cfg.learner.reuse_frozen_towers and not _lora_in_towers(targets),
                    weight_bytes=DTYPE_BYTES.get(str(dtype).replace("torch.", ""), BF16))


def _lora_in_towers(targets: str) -> bool:
    """Whether a LoRA target (a preset or a regex) can reach a frozen tower (the presets never do)."""
    return targets not in ("default", "llm", "llm+mlp", "llm+decoder") and bool(
        re.search(r"vision_model|mlp1|image_encoder|conv_s[01]|visual", targets))


def _place(requests: list[tuple[str, float]], gpus: int) -> dict[str, int] | str:
    """Processes onto GPUs as Ray packs fractional GPU requests (best fit, in creation order); a message naming the
    first one that cannot be placed otherwise."""
    free = [1.0] * gpus
    where = {}
    for name, need in requests:
        fits = [i for i in range(gpus) if free[i] + 1e-9 >= need]
        if not fits:
            return (f"{name} asks for {need:g} GPU and no GPU has that much left ({gpus} GPU(s), "
                    f"free: {', '.join(f'{f:g}' for f in free)}): Ray would wait for it forever")
        best = min(fits, key=lambda i: (free[i], i))
        free[best] -= need
        where[name] = best
    return where


def plan_train_config(cfg, gpus: GpuSpec | None = None) -> dict:
    """Whether ``cfg`` fits ``gpus``, per GPU and process, and each learner's largest micro-batch.

    Returns {"fits", "gpus", "model", "processes": [{name, gpu, gib, parts}], "per_gpu": [...], "problems": [...],
    "max_micro_batch", "lines": printable report}. A config that runs on CPUs, or a policy the plan has no model
    of, "fits" with a line saying why nothing was checked."""
    if not cfg.learner.use_gpu:
        return {"fits": True, "checked": False, "lines": ["learner.use_gpu=false: a CPU run, no GPU memory to plan"]}
    folder = Path(cfg.policy.name)
    if not (folder / "config.json").is_file() or (folder / "rl_seg_policy.json").is_file() and not json.loads(
            (folder / "rl_seg_policy.json").read_text()).get("policy", "").startswith("sa2va"):
        return {"fits": True, "checked": False,
                "lines": [f"policy {cfg.policy.name!r}: not a Sa2VA checkpoint folder; the plan models Sa2VA "
                          "checkpoints only, nothing checked"]}
    shape, facts = shape_from_checkpoint(folder)
    hybrid = cfg.placement == "hybrid"
    ranks = cfg.learner.num_workers
    rollouts = 0 if hybrid else cfg.rollout.num_workers
    needed = ranks * cfg.learner.gpus_per_worker + rollouts * cfg.rollout.num_gpus
    if gpus is None:
        gpus = GpuSpec(max(1, math.ceil(needed - 1e-9)), "GPU", 80.0)
    action_hw, note = _image_hw(cfg)
    if note:
        facts["notes"].append(note)
    st = settings_for(cfg, gpus, shape, facts, action_hw)
    stage = cfg.learner.zero_stage
    requests = []
    if cfg.placement == "disaggregated":
        requests += [(f"rollout actor {i}", 1.0) for i in range(rollouts) for _ in range(int(cfg.rollout.num_gpus))]
    elif rollouts and cfg.rollout.num_gpus > 0:
        requests += [(f"rollout actor {i}", cfg.rollout.num_gpus) for i in range(rollouts)]
    requests += [(f"learner rank {r}", cfg.learner.gpus_per_worker) for r in range(ranks)]
    placed = _place(requests, gpus.count)
    head = (f"{folder}: {shape.llm.name} + {shape.vit.name} + SAM2 ({facts['sam2']}), "
            f"{total_params(shape) / 1e9:.2f}B parameters at {st.weight_bytes} B each; LoRA r{st.lora_rank} on "
            f"{cfg.policy.lora.targets}; placement {cfg.placement}; K={st.samples_per_image}, actions "
            f"{st.action_hw[0]}x{st.action_hw[1]}, micro-batch {st.micro_batch}, gradient checkpointing "
            f"{'on' if st.grad_checkpointing else 'off'}, frozen-tower reuse {'on' if st.reuse_frozen else 'off'}; "
            f"on {gpus}")
    lines = [head] + [f"  note: {n}" for n in facts["notes"]]
    if isinstance(placed, str):
        return {"fits": False, "checked": True, "problems": [placed], "lines": lines + [f"does not fit: {placed}"]}

    def learner_total(s: Settings) -> tuple[float, dict]:
        d = learner_bytes(shape, s, stage, ranks, offload=False, hybrid=hybrid)
        return d["weights"] + d["states"] + d["activations"], d

    def rollout_total(s: Settings) -> tuple[float, dict]:
        d = rollout_bytes(shape, s)
        return d["weights"] + d["activations"], d

    def gpu_loads(s: Settings) -> list[dict]:
        loads = []
        for g in range(gpus.count):
            procs = [(name, *(learner_total(s) if name.startswith("learner") else rollout_total(s)))
                     for name, where in placed.items() if where == g]
            if procs:
                total = gpu_total([p[1] for p in procs], s)
                loads.append({"gpu": g, "processes": procs, **total})
        return loads

    loads = gpu_loads(st)
    problems, processes = [], []
    for load in loads:
        names = [p[0] for p in load["processes"]]
        for name, tensors, d in load["processes"]:
            processes.append({"name": name, "gpu": load["gpu"], "gib": tensors / GiB,
                              "parts": {k: v / GiB for k, v in d.items() if isinstance(v, float)}})
        parts = ", ".join(f"{n} {t / GiB:.1f}" for n, t, _ in load["processes"])
        verdict = (f"fits, {load['headroom'] / GiB:.1f} GiB free" if load["fits"]
                   else f"{-load['headroom'] / GiB:.1f} GiB missing")
        lines.append(f"  GPU {load['gpu']}: {parts} + CUDA context {load['context'] / GiB:.1f} + allocator reserve "
                     f"{load['reserve'] / GiB:.1f} = {load['total'] / GiB:.1f} GiB of {gpus.gib:g}: {verdict}")
        if not load["fits"]:
            who = names[0] if len(names) == 1 else " with ".join(names)
            problems.append(f"GPU {load['gpu']}: {who} need{'s' if len(names) == 1 else ''} "
                            f"{load['total'] / GiB:.1f} GiB, the GPU has {gpus.gib:g} GiB: "
                            f"{-load['headroom'] / GiB:.1f} GiB missing")
    per_rank = max(1, cfg.data.images_per_iteration // ranks)
    best = 0
    for b in range(1, per_rank + 1):
        if all(load["fits"] for load in gpu_loads(replace(st, micro_batch=b))):
            best = b
        else:
            break
    lines.append(f"  largest micro-batch per learner rank: {best or 'none fits'} (learner.micro_batch_images="
                 f"{st.micro_batch}; at most {per_rank}, the images of a rank)")
    lines.append("fits" if not problems else "does not fit: " + "; ".join(problems))
    return {"fits": not problems, "checked": True, "gpus": asdict(gpus), "model": shape.name, "settings": asdict(st),
            "processes": processes, "per_gpu": [{k: v for k, v in load.items() if k != "processes"}
                                                for load in loads],
            "problems": problems, "max_micro_batch": best, "lines": lines}
