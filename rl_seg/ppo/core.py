"""PPO for per-pixel Bernoulli mask policies, in plain torch: advantages, the clipped loss, KL and entropy.

Read top to bottom (no Ray in here; the learner role calls these):

1. A sampled mask is N = H x W pixel actions; log pi(mask) is their sum, so PPO ratios and clipping are per
   pixel, like per-token PPO in language RLHF, and the loss is a mean over valid (in-FOV) pixels.
2. Advantages come from a registry of small functions (``ADVANTAGES``):

   ``pixel`` (default)  For reward terms built from TP/FP/FN counts (dice, iou, recall, precision) the reward of
                        the mask with pixel i flipped has a closed form, and A_i = (1 - pi(a_i)) (R(a) - R(a^i))
                        is an unbiased per-pixel advantage (a local-expectation gradient: its expectation over
                        a_i is p(1 - p)(R(1) - R(0)), the exact derivative with respect to the logit). A flip
                        moves one of four counts by one, so R(a^i) takes four values per mask: O(pixels).
                        Terms that do not decompose over pixels (clDice, Betti, length) get the group baseline
                        below, broadcast; the two parts are each scaled to unit variance and mixed by their
                        share of the reward's weights. That mix is this project's documented answer to the
                        open question of credit for topology; it is a baseline, not a solution.
   ``topology``         ``pixel`` with clDice and Betti-0 given per-pixel credit too, from local flip
                        counterfactuals (``topology.py``: exact for clDice's sensitivity, for specks, and for
                        switching pixels on in Betti-0), instead of the group baseline. Terms with neither
                        (skeleton length) keep the group baseline, as in ``pixel``.
   ``group``            GRPO-style: K masks per image, advantage (r - mean_group) / (std_group + eps),
                        broadcast to every pixel (what text-RL systems do).
   ``value``            r - V(image), V from a value head on the [SEG] hidden state (the PPO critic), whitened
                        (centred and scaled) over the batch and broadcast.

3. The loss: clipped surrogate per pixel + kl_coef x KL(pi || pi_ref) per pixel in closed form (pi_ref: the same
   model with the LoRA adapter disabled) - entropy_coef x entropy + value_coef x value MSE.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from ..policy.distribution import MaskDistribution
from .topology import TOPOLOGY_METRICS, GroundTruthTopology, local_reward_flips

__all__ = ["COUNT_METRICS", "AdvantageInputs", "ADVANTAGES", "register_advantage", "count_metric",
           "confusion_counts", "count_reward", "pixel_credit", "group_normalize", "compute_advantages",
           "ppo_loss", "PPOLossConfig"]

EPS = 1e-6
#: Reward components that are functions of (TP, FP, FN) alone, and so admit closed-form per-pixel credit.
COUNT_METRICS = ("dice", "iou", "recall", "precision")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with the project's convention: a zero denominator scores 1."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.ones_like(num), num / safe)


def count_metric(name: str, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    if name == "dice":
        return _ratio(2 * tp, 2 * tp + fp + fn)
    if name == "iou":
        return _ratio(tp, tp + fp + fn)
    if name == "recall":
        return _ratio(tp, tp + fn)
    if name == "precision":
        return _ratio(tp, tp + fp)
    raise ValueError(f"{name!r} is not a count metric ({COUNT_METRICS})")


def count_reward(weights: Mapping[str, float], tp, fp, fn) -> torch.Tensor:
    return sum(w * count_metric(k, tp, fp, fn) for k, w in weights.items())


def confusion_counts(actions: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor):
    """TP, FP, FN per mask (N), inside the valid region, as float64 for exact ratios."""
    a, g, v = actions.bool() & valid, gt.bool() & valid, valid
    tp = (a & g).flatten(1).sum(1).double()
    fp = (a & ~g & v).flatten(1).sum(1).double()
    fn = (~a & g & v).flatten(1).sum(1).double()
    return tp, fp, fn


def pixel_credit(actions: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, prob_taken: torch.Tensor,
                 weights: Mapping[str, float]) -> torch.Tensor:
    """A_i = (1 - pi(a_i)) (R(a) - R(a with pixel i flipped)) for a count-based reward; N x H x W, 0 off-valid."""
    tp, fp, fn = confusion_counts(actions, gt, valid)
    r = count_reward(weights, tp, fp, fn)
    one = torch.ones_like(tp)
    # Flipping one pixel moves exactly one pair of counts; the four cases by (action, truth):
    r_flip = {
        (1, 1): count_reward(weights, tp - one, fp, fn + one),  # a TP becomes a FN
        (1, 0): count_reward(weights, tp, fp - one, fn),  # a FP becomes a TN
        (0, 1): count_reward(weights, tp + one, fp, fn - one),  # a FN becomes a TP
        (0, 0): count_reward(weights, tp, fp + one, fn),  # a TN becomes a FP
    }
    a, g = actions.bool(), gt.bool()
    shape = (-1,) + (1,) * (actions.dim() - 1)
    delta = torch.zeros(actions.shape, dtype=torch.float64, device=actions.device)
    for (av, gv), rf in r_flip.items():
        case = (a == bool(av)) & (g == bool(gv))
        delta = torch.where(case, (r - rf).reshape(shape).expand_as(delta), delta)
    adv = (1.0 - prob_taken.double()) * delta
    return (adv * valid).to(prob_taken.dtype)


def group_normalize(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); a group of one gets 0."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for g in groups.unique():
        idx = groups == g
        r = rewards[idx].float()
        if r.numel() > 1:
            out[idx] = (r - r.mean()) / (r.std(unbiased=False) + EPS)
    return out


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def _unit_scale(adv: torch.Tensor, valid: torch.Tensor, reduce=_no_reduce) -> torch.Tensor:
    """Divide by the RMS over valid pixels: a scale, not a centring (centring would move credit between pixels).
    ``reduce`` sums the statistics over every shard of the batch, so each shard scales by the batch's RMS."""
    sums = reduce(torch.stack([adv.pow(2).sum(), valid.sum().to(adv.dtype)]))
    rms = sums[0].div(sums[1].clamp_min(1)).sqrt()
    # No additive epsilon: per-pixel credits of a large image are ~1e-5, where rms + 1e-6 would shrink them 10%.
    return adv / rms.clamp_min(1e-30)


@dataclass
class AdvantageInputs:
    actions: torch.Tensor  # N x H x W bool: the sampled masks
    gt: torch.Tensor  # N x H x W bool
    valid: torch.Tensor  # N x H x W bool (FOV)
    prob_taken: torch.Tensor  # N x H x W: pi_old(a_i) of the action taken
    rewards: torch.Tensor  # N: reward totals
    components: dict[str, torch.Tensor]  # name -> N: raw component values
    weights: dict[str, float]  # the reward's component weights
    groups: torch.Tensor  # N: index of the image each mask was sampled for
    values: torch.Tensor | None = None  # N: V(image) from the value head (value mode)
    #: Sums a tensor of statistics over the shards of one batch (data-parallel ranks: an all-reduce). Batch-wide
    #: normalizations (pixel RMS, value whitening) use it, so that N ranks compute what one process would.
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _no_reduce


AdvantageFn = Callable[[AdvantageInputs], torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str):
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return wrap


def _broadcast(per_sample: torch.Tensor, x: AdvantageInputs) -> torch.Tensor:
    return per_sample.reshape(-1, *([1] * (x.actions.dim() - 1))).float() * x.valid


@register_advantage("group")
def group_advantages(x: AdvantageInputs) -> torch.Tensor:
    return _broadcast(group_normalize(x.rewards, x.groups), x)


@register_advantage("value")
def value_advantages(x: AdvantageInputs) -> torch.Tensor:
    if x.values is None:
        raise ValueError("advantage 'value' needs values from the value head")
    a = x.rewards.float() - x.values.float()
    # Whitened (centred and scaled) over the whole batch, as PPO implementations normalize advantages: a value
    # head that is off by the same amount everywhere must not turn into a huge advantage.
    n, total, squares = x.reduce_sum(torch.stack([torch.tensor(float(a.numel()), device=a.device), a.sum(),
                                                  a.pow(2).sum()]))
    if n <= 1:
        return _broadcast(torch.zeros_like(a), x)
    mean = total / n
    std = (squares / n - mean.pow(2)).clamp_min(0).sqrt()
    return _broadcast((a - mean) / (std + EPS), x)


def _topology_credit(x: AdvantageInputs, weights: Mapping[str, float]) -> torch.Tensor:
    """(1 - pi(a_i)) (R(a) - R(a^i)) for the topology terms, from local flip counterfactuals (topology.py)."""
    actions, gt, valid = (t.bool().cpu().numpy() for t in (x.actions, x.gt, x.valid))
    groups = x.groups.tolist()
    if not groups:
        return torch.zeros(x.actions.shape, dtype=torch.float64, device=x.actions.device)
    first = {g: n for n, g in reversed(list(enumerate(groups)))}  # the K masks of an image share one truth
    targets = {g: GroundTruthTopology(gt[n], valid[n]) for g, n in first.items()}
    # skimage and numpy release the GIL here: threads, as many as the process's torch threads (Ray sets those
    # from the actor's CPUs), give ~1.8x on 2 cores.
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(groups)))) as pool:
        deltas = np.stack(list(pool.map(lambda n: local_reward_flips(actions[n], targets[groups[n]], weights),
                                        range(len(groups)))))
    return (1.0 - x.prob_taken.double()) * torch.from_numpy(deltas).to(x.prob_taken.device) * x.valid


def _local_credit_advantages(x: AdvantageInputs, local: tuple[str, ...]) -> torch.Tensor:
    """Per-pixel credit for the reward terms in ``local``, the group baseline for the rest; the two parts are
    each scaled to unit RMS and mixed by their share of the reward's weights."""
    local_w = {k: w for k, w in x.weights.items() if k in local}
    other_w = {k: w for k, w in x.weights.items() if k not in local}
    total = sum(abs(w) for w in x.weights.values()) or 1.0
    adv = torch.zeros(x.actions.shape, dtype=torch.float32, device=x.actions.device)
    if local_w:
        count_w = {k: w for k, w in local_w.items() if k in COUNT_METRICS}
        topo_w = {k: w for k, w in local_w.items() if k in TOPOLOGY_METRICS}
        credit = torch.zeros(x.actions.shape, dtype=torch.float64, device=x.actions.device)
        if count_w:
            credit = credit + pixel_credit(x.actions, x.gt, x.valid, x.prob_taken, count_w).double()
        if topo_w:
            credit = credit + _topology_credit(x, topo_w)
        adv = adv + sum(abs(w) for w in local_w.values()) / total * _unit_scale(credit.float(), x.valid,
                                                                                  x.reduce_sum)
    if other_w:
        r_other = sum(w * x.components[k].float() for k, w in other_w.items())
        adv = adv + sum(abs(w) for w in other_w.values()) / total * _broadcast(group_normalize(r_other, x.groups), x)
    return adv


@register_advantage("pixel")
def pixel_advantages(x: AdvantageInputs) -> torch.Tensor:
    return _local_credit_advantages(x, COUNT_METRICS)


@register_advantage("topology")
def topology_advantages(x: AdvantageInputs) -> torch.Tensor:
    return _local_credit_advantages(x, COUNT_METRICS + TOPOLOGY_METRICS)


def compute_advantages(mode: str, inputs: AdvantageInputs) -> torch.Tensor:
    if mode not in ADVANTAGES:
        raise ValueError(f"unknown advantage mode {mode!r}; known: {sorted(ADVANTAGES)}")
    return ADVANTAGES[mode](inputs)


@dataclass
class PPOLossConfig:
    clip: float = field(default=0.2, metadata={"help": "PPO clip range of the per-pixel ratio", "gt": 0})
    kl_coef: float = field(default=0.0, metadata={"help": "weight of KL(pi || pi_ref), pi_ref = adapter disabled",
                                                   "min": 0})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus", "min": 0})
    value_coef: float = field(default=0.5, metadata={"help": "weight of the value-head MSE (value advantages)",
                                                      "min": 0})


def _valid_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (x * valid).sum() / valid.sum().clamp_min(1)


def ppo_loss(dist: MaskDistribution, actions: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
             cfg: PPOLossConfig, ref_dist: MaskDistribution | None = None, values: torch.Tensor | None = None,
             returns: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO objective for one micro-batch of masks; returns the loss and its statistics."""
    valid = dist.valid if dist.valid is not None else torch.ones_like(actions, dtype=torch.bool)
    logp = dist.log_prob(actions)
    log_ratio = (logp - old_logp) * valid
    ratio = torch.exp(log_ratio)
    surr = torch.min(ratio * advantages, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * advantages)
    policy_loss = -_valid_mean(surr, valid)
    entropy = _valid_mean(dist.entropy(), valid)
    loss = policy_loss - cfg.entropy_coef * entropy
    stats = {"policy_loss": policy_loss.item(), "entropy": entropy.item()}
    if ref_dist is not None:
        kl = _valid_mean(dist.kl(ref_dist), valid)
        loss = loss + cfg.kl_coef * kl
        stats["kl_ref"] = kl.item()
    if values is not None and returns is not None:
        value_loss = torch.mean((values.float() - returns.float()) ** 2)
        loss = loss + cfg.value_coef * value_loss
        stats["value_loss"] = value_loss.item()
    with torch.no_grad():
        stats["clip_fraction"] = _valid_mean(((ratio - 1).abs() > cfg.clip).float(), valid).item()
        stats["approx_kl"] = _valid_mean((ratio - 1) - log_ratio, valid).item()
    return loss, stats
