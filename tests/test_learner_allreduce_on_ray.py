"""The learner's data-parallel update on the real stack (Ray Train TorchTrainer, gloo, DeepSpeed ZeRO-2, fp32).

One fixed rollout batch (4 sample images at 32 x 32, K=2 masks each, rewards from the project's reward) and one
PPO update (epochs=1, minibatches=1: a single optimizer step, gradient accumulation covering the rank's share)
with 1 and 2 workers. The loss is a mean over images, each rank's accumulation averages its equal share and
the all-reduce averages the ranks, so 2 workers must reproduce the 1-worker gradient and weights. (Every statistic
that crosses ranks does so with 2 already; 4 would add a process per rank to the suite's time and nothing else.)

The gradient is compared through Adam's first moment after the step (exp_avg = (1 - beta1) * g), gathered from
ZeRO-2's partitions, and through the pre-clipping global norm: one Adam step moves each weight by about
lr * sign(g), which would hide a gradient off by a constant factor, so weights alone could not fail such a bug.

Every advantage mode is checked: ``pixel`` (RMS over every valid pixel of the batch) and ``value`` (whitening
over the batch) need their statistics summed over the ranks (``AdvantageInputs.reduce_sum``); before that they
trained each world size on differently scaled advantages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ray import cloudpickle

from rewards.composite import PRESETS, get_reward
from rl_seg.config import from_dict, load_config, to_dict
from rl_seg.policy.default_model import DefaultModelConfig, DefaultSegModel
from rl_seg.ppo.config import TrainConfig
from rl_seg.ppo.states import load_states
from rl_seg.roles.coordinator import RolloutBatch

pytestmark = pytest.mark.ray

# The worker function travels to the Ray Train workers by value (this module is not importable there).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORLDS = (1, 2)
MODES = ("group", "pixel", "value")
IMAGES, K, SIZE = 4, 2, 32
# float32 sums in a different order (one rank's 4 images vs 2 + 2 reduced): ~1e-7 relative seen; the pixel
# mode's shard normalization gives ~1e-2, so 1e-5 separates the two by three orders of magnitude.
RTOL = 1e-5


def fixed_batch() -> RolloutBatch:
    """The same batch for every world size: shipped DRIVE images with their FOV, masks perturbed from the truth
    (so rewards and advantages vary within each group), scored by the default reward."""
    states = load_states(["drive-sample"], "train", SIZE, IMAGES)[:IMAGES]
    assert len(states) == IMAGES
    rng = np.random.default_rng(7)
    reward = get_reward("default")
    actions, rewards, components = [], [], []
    for s in states:
        masks = np.stack([(s.gt & (rng.random(s.gt.shape) > drop)) | (rng.random(s.gt.shape) < 0.05)
                          for drop in np.linspace(0.1, 0.6, K)])
        scored = [reward(m, s.gt, s.fov) for m in masks]
        actions.append((np.packbits(masks), masks.shape))
        rewards.append(np.array([r.total for r in scored]))
        components.append({c: np.array([r.components[c] for r in scored]) for c in scored[0].components})
    return RolloutBatch(ids=[s.id for s in states], images=[s.image for s in states], gts=[s.gt for s in states],
                        fovs=[s.fov for s in states], actions=actions, rewards=rewards, components=components,
                        ok=[np.ones(K, bool) for _ in states], weights=dict(PRESETS["default"]), version=0)


def learner_config(policy: str | Path, world: int, advantage: str = "group") -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"policy.name={policy}", "policy.lora.dropout=0.0", "seed=0", "iterations=1",
        f"data.image_size={SIZE}", f"data.images_per_iteration={IMAGES}", f"rollout.samples_per_image={K}",
        f"learner.num_workers={world}", "learner.cpus_per_worker=0.5", "ppo.epochs=1", "ppo.minibatches=1",
        f"ppo.advantage={advantage}"])


def build_engine(cfg: TrainConfig):
    """The engine exactly as ``train_loop`` builds it on CPU (fp32, gloo already initialized by the caller)."""
    import deepspeed

    from rl_seg.policy import load_policy
    from rl_seg.policy.lora import attach_lora
    from rl_seg.roles.learner import PPOModule, deepspeed_config

    torch.manual_seed(cfg.seed)
    policy = attach_lora(load_policy(cfg.policy.name, device=torch.device("cpu")), cfg.policy.lora)
    module = PPOModule(policy, policy.get_base_model().hidden_size)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params,
                                      config=deepspeed_config(cfg, bf16=False), dist_init_required=False)
    # DeepSpeed's WarmupCosineLR gives the first two optimizer steps lr = 0 (its initial value, then ratio
    # 0 / warmup at iteration 0), which would leave the weights where they were; the step under test is taken
    # as the last warm-up step instead.
    engine.lr_scheduler.step(cfg.ppo.warmup_steps - 1)
    return engine


def weights(module) -> dict[str, np.ndarray]:
    from rl_seg.roles.rollout import adapter_state

    # copies: on CPU adapter_state's arrays share memory with the parameters the step updates in place
    out = {f"lora/{k}": v.copy() for k, v in adapter_state(module.policy).items()}
    out.update({f"value_head/{k}": v.detach().float().numpy().copy()
                for k, v in module.value_head.state_dict().items()})
    return out


def one_update(cfg: TrainConfig, batch: RolloutBatch, rank: int, world: int) -> dict[str, np.ndarray]:
    """One learner update; everything the comparison needs, as numpy (identical on every rank)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from rl_seg.roles.learner import learn

    engine = build_engine(cfg)
    before = weights(engine.module)
    lr = engine.get_lr()[0]
    learn(engine, batch, cfg, rank, world, iteration=0)
    out = {f"before/{k}": v for k, v in before.items()}
    out.update({f"after/{k}": v for k, v in weights(engine.module).items()})
    # A collective under ZeRO-2 (each rank owns a slice of the optimizer state): every rank calls it, in order.
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[f"exp_avg/{name}"] = safe_get_full_optimizer_state(p, "exp_avg").float().numpy().copy()
    out["lr"] = np.array(lr)
    out["grad_norm"] = np.array(float(engine.get_global_grad_norm()))
    out["steps"] = np.array(engine.global_steps)
    return out


def _worker(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    batch = fixed_batch()
    results = {}
    for mode in MODES:
        cfg = from_dict(TrainConfig, config["cfg"][mode])
        results.update({f"{mode}/{k}": v for k, v in one_update(cfg, batch, rank, world).items()})
    if rank == 0:
        np.savez(config["out"], **results)


@pytest.fixture(scope="module")
def updates(ray_local, tmp_path_factory) -> dict[int, dict[str, np.ndarray]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root = tmp_path_factory.mktemp("allreduce")
    torch.manual_seed(0)
    policy = DefaultSegModel(DefaultModelConfig.tiny()).save_pretrained(root / "policy")
    out = {}
    for world in WORLDS:
        cfgs = {mode: learner_config(policy, world, mode) for mode in MODES}
        path = root / f"world{world}.npz"
        TorchTrainer(
            train_loop_per_worker=_worker,
            train_loop_config={"cfg": {m: to_dict(c) for m, c in cfgs.items()}, "out": str(path)},
            scaling_config=ScalingConfig(num_workers=world, use_gpu=False,
                                         resources_per_worker={"CPU": cfgs["group"].learner.cpus_per_worker}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name=f"world{world}", storage_path=str(root / "ray_train")),
        ).fit()
        with np.load(path) as f:
            out[world] = dict(f)
    return out


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _check_same_update(updates, mode: str, world: int) -> None:
    ref, got = updates[1], updates[world]
    assert int(got[f"{mode}/steps"]) == 1  # one optimizer step, not one per micro-batch
    assert float(got[f"{mode}/grad_norm"]) == pytest.approx(float(ref[f"{mode}/grad_norm"]), rel=RTOL)
    moments = [k for k in ref if k.startswith(f"{mode}/exp_avg/")]
    assert moments
    worst = max(moments, key=lambda k: _relative(got[k], ref[k]))
    assert _relative(got[worst], ref[worst]) < RTOL, (
        f"world {world} vs 1: gradient of {worst} differs by {_relative(got[worst], ref[worst]):.2e} (relative)")
    for k in (k for k in ref if k.startswith(f"{mode}/after/")):
        # Adam's first step moves a weight by ~lr; a tenth of a percent of that is the float noise allowed.
        torch.testing.assert_close(torch.from_numpy(got[k]), torch.from_numpy(ref[k]), rtol=RTOL,
                                   atol=1e-3 * float(ref[f"{mode}/lr"]), msg=lambda m: f"{k}: {m}")


def test_the_update_moves_the_adapter(updates):
    """Guards the comparison: an update that did nothing would match across world sizes trivially."""
    for mode in MODES:
        got = updates[1]
        lr = float(got[f"{mode}/lr"])
        assert lr > 0
        assert float(got[f"{mode}/grad_norm"]) > 0
        moved = {k.split("/", 2)[2]: float(np.abs(got[k] - got[k.replace("/after/", "/before/")]).max())
                 for k in got if k.startswith(f"{mode}/after/")}
        # LoRA B starts at zero and is what the first step trains (A gets no gradient through B = 0).
        assert max(v for k, v in moved.items() if "lora_B" in k) > 0.5 * lr, (mode, moved)
        if mode == "value":  # the critic's loss reaches the value head only in this mode
            assert max(v for k, v in moved.items() if k.startswith("value_head/")) > 0.5 * lr, moved


@pytest.mark.parametrize("mode", ["pixel", "group", "value"])
@pytest.mark.parametrize("world", [w for w in WORLDS if w > 1])
def test_data_parallel_update_equals_the_full_batch_update(updates, world, mode):
    _check_same_update(updates, mode, world)
