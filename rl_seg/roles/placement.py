"""Where the rollout actors go: beside the learners (colocated) or on GPUs of their own (disaggregated); with
``hybrid`` there are none (the learner ranks sample, ``rl_seg.roles.hybrid``), so nothing is placed here.

- ``colocated``: rollout actors ask for a fraction of a GPU (``rollout.num_gpus`` < 1) and share GPUs with the
  learner ranks; Ray places them. What one GPU can do (BENCHMARKS.md, "PPO throughput").
- ``disaggregated``: every rollout actor holds a whole GPU in a placement group reserved before anything starts
  (bundle i -> actor i), so the learner ranks, which Ray Train pins in its own placement group, never share a
  device with sampling. When the run is a Tune trial its actors already live in the trial's placement group
  (``tune.sweep.trial_bundles``), which then does this reservation.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..ppo.config import TrainConfig

__all__ = ["RolloutPlacement"]


class RolloutPlacement:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.group = None
        if cfg.placement == "disaggregated" and ray.util.get_current_placement_group() is None:
            bundle = {"CPU": cfg.rollout.num_cpus, "GPU": cfg.rollout.num_gpus}
            self.group = placement_group([bundle] * cfg.rollout.num_workers, strategy="PACK")
            ready, _ = ray.wait([self.group.ready()], timeout=cfg.placement_timeout_s)
            if not ready:
                remove_placement_group(self.group)
                have = ray.cluster_resources().get("GPU", 0)
                raise RuntimeError(
                    f"placement=disaggregated: {cfg.rollout.num_workers} rollout actor(s) need "
                    f"{cfg.rollout.num_workers * cfg.rollout.num_gpus:g} whole GPU(s) of their own, plus "
                    f"{cfg.learner.num_workers * cfg.learner.gpus_per_worker:g} for the learners; the cluster has "
                    f"{have:g} GPU(s) and none came free within {cfg.placement_timeout_s:g} s")

    def options(self, index: int) -> dict:
        """Ray actor options for rollout actor ``index``."""
        options = {"num_cpus": self.cfg.rollout.num_cpus, "num_gpus": self.cfg.rollout.num_gpus}
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=index)
        return options

    def release(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
