"""The training job's one typed config: YAML file + ``key=value`` overrides, every field documented.

``rl-seg train --help-config`` prints this schema; each run saves the resolved config as ``config.yaml`` in its
run folder. Defaults are the default model's own, chosen by measurement (BENCHMARKS.md, PPO section); the
original plan's Sa2VA-26B values ship as ``configs/sa2va-26b.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..policy.lora import LoraSettings
from .core import ADVANTAGES, PPOLossConfig

__all__ = ["TrainConfig", "DataConfig", "PolicyConfig", "RolloutConfig", "RewardConfig", "PPOConfig",
           "LearnerConfig", "AdaptiveRecallConfig", "PLACEMENTS"]

PLACEMENTS = ("colocated", "disaggregated", "hybrid")


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=lambda: ["drive", "arcade"], metadata={
        "help": "datasets (names or folders) whose images are the PPO states", "min_items": 1})
    train_split: str = field(default="train", metadata={"help": "split sampled for rollouts"})
    val_split: str = field(default="val", metadata={"help": "split for validation metrics (never test)"})
    image_size: int | None = field(default=256, metadata={
        "help": "images and masks resized to this square size for rollouts and learning (null: native size; "
                "micro-batches of several sizes need a policy that takes them, as Sa2VA does)", "min": 8})
    images_per_iteration: int = field(default=8, metadata={
        "help": "images per PPO iteration (across learners)", "min": 1})
    balance_datasets: bool = field(default=True, metadata={
        "help": "draw every dataset equally often, whatever its size (as rl-seg sft does); false: every image "
                "equally often, so a 16-image dataset beside a 300-image one is 5% of each batch"})
    train_limit: int | None = field(default=None, metadata={
        "help": "use at most N training images per dataset", "min": 1})
    val_limit: int | None = field(default=None, metadata={
        "help": "validate on at most N images per dataset", "min": 1})
    curriculum: bool = field(default=False, metadata={
        "help": "first pass over the data easy images first (lowest thin-vessel fraction), then random"})
    augment: bool = field(default=False, metadata={
        "help": "show each drawn image in one of its 8 flips and quarter turns (mask and FOV alike; rollout, "
                "reward and learner all see the same view; drawn from seed and iteration, so a resumed run "
                "repeats it), as rl-seg sft does. Off by default (measured, BENCHMARKS.md issue 4, fourth attempt): "
                "it kept PPO on DRIVE alone from over-fitting its 16 images, but cost ARCADE a third of its gain"})


@dataclass
class PolicyConfig:
    name: str = field(default="default", metadata={"help": "policy name or checkpoint folder (load_policy)"})
    # 'default' resolves per policy: the default model's 'all' is measured (BENCHMARKS.md, issue 4, third attempt:
    # with adapters that cannot change per-pixel features PPO only moved along the threshold curve); a Sa2VA
    # checkpoint's is 'llm' (its language model's attention, the design's choice).
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(targets="default"), metadata={
        "help": "the LoRA adapter PPO trains"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow a checkpoint folder whose config.json has an auto_map (Hugging Face remote code, as Sa2VA "
                "checkpoints ship) to run its own Python in the driver, rollout actors and learners; off: such a "
                "folder is refused before anything starts"})
    init_adapter: str | None = field(default=None, metadata={
        "help": "start the adapter from this PEFT adapter folder (same r and targets as `lora`) instead of zero "
                "(continuing from another run's adapter; population-based training's exploit step)"})
    action_resolution: str = field(default="image", metadata={
        "help": "Sa2VA: where masks are sampled and scored. 'image': the decoder's 256x256 logits upsampled as "
                "predict_forward does (bilinear to 1024, then to the image size), so 1-2 px vessels are actions; "
                "'native': the decoder's 256x256 grid, targets resized to it. The default model is always 'image'",
        "choices": ("image", "native")})
    max_tiles: int = field(default=1, metadata={
        "help": "Sa2VA InternVL family: 448 px tiles per image for the vision tower. 1: one squashed tile (what "
                "predict_forward uses for DRIVE/ARCADE-sized images anyway, and the cheapest); 12: predict_forward's "
                "dynamic tiling (grid closest to the aspect ratio, plus a thumbnail) for large or elongated images",
        "min": 1, "max": 40})
    dtype: str | None = field(default=None, metadata={
        "help": "Sa2VA: weight dtype on load (bfloat16, float16, float32); null: the checkpoint's own",
        "choices": (None, "bfloat16", "float16", "float32")})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Sa2VA: the language model's attention, 'sdpa' or 'eager', where the model allows the choice "
                "(transformers' Qwen2/Qwen2.5/Qwen3 and Qwen-VL do; InternLM2's remote code has eager or flash-attn "
                "only); null: the policy's default, sdpa", "choices": (None, "sdpa", "eager")})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "learner: activation checkpointing of every language-model layer (and of the vision tower's when "
                "LoRA sits in it): each layer keeps only its input and is run again in the backward. Less memory "
                "for a larger micro-batch, about a third more learner compute (rl-seg plan shows both)"})

    def load_kwargs(self) -> dict:
        """What ``load_policy`` takes from this config: only options that differ from their defaults, so that a
        policy that has no such option (the default model) is asked for none unless the user set it."""
        defaults = PolicyConfig()
        options = {k: getattr(self, k) for k in ("action_resolution", "max_tiles", "dtype", "attn_implementation")
                   if getattr(self, k) != getattr(defaults, k)}
        if self.trust_remote_code:
            options["trust_remote_code"] = True
        return options


@dataclass
class RolloutConfig:
    num_workers: int = field(default=2, metadata={"help": "rollout actors", "min": 1})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs per rollout actor (fractions allowed)", "min": 0})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per rollout actor (fractions colocate)", "min": 0})
    samples_per_image: int = field(default=8, metadata={"help": "K masks sampled per image", "min": 1})
    temperature: float = field(default=0.25, metadata={
        "help": "sampling temperature of the Bernoulli policy; 0.25 (measured): pixels the model is sure of stay "
                "fixed and only those near the threshold are explored, so reward cannot rise by mere de-noising",
        "gt": 0})
    max_restarts: int = field(default=3, metadata={
        "help": "times Ray restarts a dead rollout actor; once spent, the run fails naming this budget (a resumed "
                "run starts fresh actors with a fresh budget)", "min": 0})
    ship_frozen: bool | None = field(default=None, metadata={
        "help": "send the frozen towers' outputs (learner.reuse_frozen_towers) with each rollout reply, so the "
                "learner does not compute them at all. null: where the rollout actors run on CPUs (measured with "
                "the tiny Sa2VA replica: handing them over cost ~1% of computing them), not on GPUs (the towers "
                "take milliseconds there; benchmarks/sa2va_scale.py measures both). Unused with placement=hybrid"})


@dataclass
class AdaptiveRecallConfig:
    enabled: bool = field(default=False, metadata={
        "help": "raise the recall weight while batch recall is under `bound` (the original plan's extra)"})
    bound: float = field(default=0.85, metadata={"help": "target batch recall", "min": 0, "max": 1})
    step: float = field(default=0.05, metadata={
        "help": "added to the recall weight per iteration under bound", "gt": 0})
    max_weight: float = field(default=1.0, metadata={"help": "ceiling of the recall weight", "min": 0})


@dataclass
class RewardConfig:
    preset: str = field(default="default", metadata={"help": "reward preset: default or seed"})
    weights: dict[str, float] | None = field(default=None, metadata={
        "help": "component weights replacing the preset's, e.g. {dice: 0.5, recall: 0.5} (normalized)"})
    num_actors: int = field(default=2, metadata={"help": "reward-pool CPU actors", "min": 1})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs per reward actor", "min": 0})
    timeout_s: float = field(default=60.0, metadata={"help": "per-mask scoring timeout", "gt": 0})
    adaptive_recall: AdaptiveRecallConfig = field(default_factory=AdaptiveRecallConfig, metadata={
        "help": "adaptive recall weight"})


@dataclass
class PPOConfig:
    advantage: str = field(default="pixel", metadata={"help": f"advantage estimator: {sorted(ADVANTAGES)}",
                                                       "choices": sorted(ADVANTAGES)})
    epochs: int = field(default=2, metadata={"help": "PPO epochs over each iteration's samples", "min": 1})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per epoch", "min": 1})
    # A KL anchor of 1.0 to the adapter-disabled model (measured): without one, at temperature 1, entropy collapsed
    # and the threshold knob was lost; the best runs (temperature 0.25, LoRA 'all') had KL 0.1 or 1.0.
    loss: PPOLossConfig = field(default_factory=lambda: PPOLossConfig(kl_coef=1.0), metadata={
        "help": "clip, KL, entropy, value"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (1e-4 barely moved LoRA, measured)",
                                             "gt": 0})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "min": 0})
    warmup_steps: int = field(default=5, metadata={"help": "optimizer steps of linear warm-up, then lr_schedule",
                                                   "min": 0})
    lr_schedule: str = field(default="cosine", metadata={
        "help": "after warm-up: cosine (to zero at the last iteration) or constant (population-based training, "
                "whose segments must not each decay to zero)", "choices": ["cosine", "constant"]})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping", "gt": 0})


@dataclass
class LearnerConfig:
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers (data-parallel ranks)", "min": 1})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU share per worker (bf16, NCCL)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per learner worker", "min": 0})
    gpus_per_worker: float = field(default=1.0, metadata={"help": "GPU share per learner worker when use_gpu",
                                                           "gt": 0})
    zero_stage: int = field(default=2, metadata={
        "help": "DeepSpeed ZeRO stage (0, 1 or 2; LoRA states are small, and stage 3 would need gathering before "
                "every weight sync)", "choices": [0, 1, 2]})
    micro_batch_images: int = field(default=1, metadata={
        "help": "images (each with its K masks) per forward/backward on one rank; with placement hybrid also "
                "per sampling forward", "min": 1})
    max_failures: int = field(default=1, metadata={
        "help": "learner-group restarts from the last checkpoint; once spent, the run fails naming this budget",
        "min": 0})
    reuse_frozen_towers: bool = field(default=True, metadata={
        "help": "compute the towers no LoRA layer sits in (Sa2VA: InternViT + mlp1, SAM2's image encoder) once per "
                "image and iteration and reuse them in the reference pass and every PPO epoch (same numbers, "
                "fewer FLOPs); off where a LoRA target puts an adapter into a tower, whatever this says"})
    count_flops: bool = field(default=False, metadata={
        "help": "count the FLOPs of the first iteration's learn phase (and, hybrid, its rollout) with "
                "torch.utils.flop_counter: metrics flops/learn, flops/rollout (for MFU; slows that iteration)"})
    report_poll_s: float = field(default=0.05, metadata={
        "help": "how often Ray Train's controller collects reports (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, when not "
                "set): each iteration's report waits for it, so it must be well under an iteration", "gt": 0})


@dataclass
class TrainConfig:
    name: str = field(default="ppo", metadata={"help": "run name: the run folder is run_dir/name"})
    run_dir: Path = field(default=Path("runs"), metadata={"help": "parent folder of run folders"})
    iterations: int = field(default=20, metadata={"help": "PPO iterations", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of data order, sampling and initialization"})
    checkpoint_every: int = field(default=5, metadata={"help": "checkpoint every N iterations (and at the end)",
                                                       "min": 1})
    keep_checkpoints: int | None = field(default=3, metadata={
        "help": "checkpoints kept in the run folder: the latest N plus the best by validation Dice (null: all)",
        "min": 1})
    val_every: int = field(default=5, metadata={"help": "validation metrics every M iterations (0: never)",
                                                "min": 0})
    resume: bool = field(default=False, metadata={
        "help": "continue the run folder's run from its latest checkpoint, with its saved config (only iterations, "
                "stop_after_iterations, progress, ray_address and ray_num_cpus may differ); a run interrupted before "
                "its first checkpoint starts again from iteration 0"})
    stop_after_iterations: int | None = field(default=None, metadata={
        "help": "end this session after N iterations (checkpointed; resume=true continues): for time-sliced or "
                "preemptible allocations", "min": 1})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster address (default: RAY_ADDRESS, else a local instance on 127.0.0.1)"})
    ray_num_cpus: float | None = field(default=None, metadata={"help": "logical CPUs of a local Ray instance",
                                                                 "gt": 0})
    threads_per_worker: int = field(default=1, metadata={"help": "torch threads in each actor and worker",
                                                         "min": 1})
    placement: str = field(default="colocated", metadata={
        "help": "colocated: rollout actors share GPUs with the learners (fractional rollout.num_gpus); "
                "disaggregated: each rollout actor gets whole GPUs of its own, reserved in a placement group; "
                "hybrid: no rollout actors, each learner rank samples its own images with the weights it trains "
                "(one model copy per GPU, no adapter sync; rollout.num_workers/num_cpus/num_gpus unused)",
        "choices": list(PLACEMENTS)})
    placement_timeout_s: float = field(default=300.0, metadata={
        "help": "disaggregated: how long to wait for the rollout GPUs before failing with what is missing", "gt": 0})
    progress: bool = field(default=True, metadata={"help": "progress line per iteration"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "datasets and batch"})
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata={"help": "policy and LoRA"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "rollout actors"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "reward and its CPU pool"})
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "PPO algorithm"})
    learner: LearnerConfig = field(default_factory=LearnerConfig, metadata={"help": "Ray Train + DeepSpeed"})

    def __post_init__(self):
        # Bounds and choices are in the fields' metadata (checked as the config is built); here only what ties
        # fields together. Folders, data and remote code are checked by rl_seg.validation before a run starts.
        if self.placement == "disaggregated":
            whole = float(self.rollout.num_gpus).is_integer() and self.rollout.num_gpus >= 1
            if not whole or (self.learner.use_gpu and not float(self.learner.gpus_per_worker).is_integer()):
                raise ConfigError(
                    "placement: disaggregated gives rollout actors and learner ranks GPUs of their own: "
                    f"rollout.num_gpus ({self.rollout.num_gpus}) must be a whole number >= 1 and "
                    f"learner.gpus_per_worker ({self.learner.gpus_per_worker}) a whole number (got disaggregated)")
        per_rank, rem = divmod(self.data.images_per_iteration, self.learner.num_workers)
        if rem or per_rank == 0:
            raise ConfigError(f"data.images_per_iteration: must be a positive multiple of learner.num_workers="
                              f"{self.learner.num_workers} (got {self.data.images_per_iteration})")
        steps, rem = divmod(per_rank, self.learner.micro_batch_images * self.ppo.minibatches)
        if rem or steps == 0:
            raise ConfigError(f"data.images_per_iteration: images per rank ({per_rank}) must be a multiple of "
                              f"learner.micro_batch_images x ppo.minibatches ({self.learner.micro_batch_images} x "
                              f"{self.ppo.minibatches}) (got {self.data.images_per_iteration})")
        if self.ppo.advantage == "group" and self.rollout.samples_per_image < 2:
            raise ConfigError("rollout.samples_per_image: ppo.advantage=group needs >= 2 "
                              f"(got {self.rollout.samples_per_image})")

    @property
    def ships_frozen(self) -> bool:
        """Whether rollout actors send frozen-tower outputs to the learner (``rollout.ship_frozen`` resolved)."""
        if self.placement == "hybrid" or not self.learner.reuse_frozen_towers:
            return False
        return self.rollout.ship_frozen if self.rollout.ship_frozen is not None else self.rollout.num_gpus == 0

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    @property
    def grad_accum_steps(self) -> int:
        per_rank = self.data.images_per_iteration // self.learner.num_workers
        return per_rank // (self.learner.micro_batch_images * self.ppo.minibatches)

    @property
    def optimizer_steps(self) -> int:
        return self.iterations * self.ppo.epochs * self.ppo.minibatches
