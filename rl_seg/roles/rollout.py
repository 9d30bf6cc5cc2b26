"""Rollout workers: Ray actors that hold the policy with the current LoRA adapter and sample masks.

Every request carries the adapter version it wants and a reference to that version's weights, so a request is
self-contained: an actor that died and was restarted by Ray (with a fresh base model) loads the weights it is
asked for and redoes the work, and because sampling is seeded by the request, redone work gives the same masks.
Each actor stamps its replies with an incarnation id, which changes when Ray restarts it: that is how restarts
are counted without double-counting any sample.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import ray
import torch

from ..console import announce
from ..policy import load_policy
from ..policy.distribution import sample_masks
from ..policy.base import autocast_for
from ..policy.lora import LoraSettings, attach_lora

__all__ = ["RolloutWorker", "adapter_state", "load_adapter_state", "packed_sample", "peak_memory_gib"]


def adapter_state(model) -> dict[str, np.ndarray]:
    """The LoRA weights only (what moves from learner to rollout), as CPU numpy arrays for the object store."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().numpy() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, np.ndarray]) -> None:
    from peft import set_peft_model_state_dict

    device = next(model.parameters()).device
    result = set_peft_model_state_dict(model, {k: torch.from_numpy(np.array(v)).to(device) for k, v in state.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter state has keys the rollout model lacks: {unexpected[:5]}")


def packed_sample(state_id: str, masks: np.ndarray) -> dict:
    """K x H x W boolean masks as they travel to the coordinator: bit-packed, with their shape."""
    return {"id": state_id, "shape": masks.shape, "bits": np.packbits(masks.ravel())}


def peak_memory_gib(device: torch.device) -> float | None:
    """This process's peak of allocated GPU memory (``torch.cuda.max_memory_allocated``) in GiB; None on a CPU."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


@ray.remote
class RolloutWorker:
    def __init__(self, policy: str, lora: LoraSettings, threads: int = 1, use_gpu: bool = False,
                 policy_options: dict | None = None, log_dir: str | None = None, role: str = "rollout"):
        self.role = role
        announce(log_dir, role)
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.incarnation = uuid.uuid4().hex
        self.model = attach_lora(load_policy(policy, device=self.device, **(policy_options or {})), lora)
        self.model.eval()
        self.version = -1
        self.weights_key = None

    def __repr__(self) -> str:  # Ray names the actor's log lines and errors by it
        return self.role

    def ready(self) -> str:
        return self.incarnation

    def _sync(self, version: int, weights_box: list) -> float:
        """Load the adapter named by ``weights_box`` ([ref, key]) unless it is already loaded."""
        if weights_box[1] == self.weights_key:
            return 0.0
        start = time.perf_counter()
        load_adapter_state(self.model, ray.get(weights_box[0]))
        self.version, self.weights_key = version, weights_box[1]
        return time.perf_counter() - start

    def _logits(self, image: np.ndarray, keep_frozen: bool = False) -> tuple[torch.Tensor, object]:
        """Logits for one image, and (``keep_frozen``) the frozen towers' outputs they were computed from."""
        inputs = self.model.preprocess([image])
        with torch.no_grad(), autocast_for(self.device):
            frozen = self.model.encode_frozen(inputs) if keep_frozen else None
            return self.model(inputs, **({} if frozen is None else {"frozen": frozen})).logits.float(), frozen

    def sample(self, version: int, weights_box: list, states: list, k: int, temperature: float,
               seeds: list[int], ship_frozen: bool = False) -> dict:
        """K masks per state (``states``: [(id, ref to (image, gt, fov))]); masks come back bit-packed, and with
        ``ship_frozen`` the frozen towers' outputs (on the CPU) for the learner to reuse."""
        sync_s = self._sync(version, weights_box)
        start = time.perf_counter()
        out = []
        for (state_id, box), seed in zip(states, seeds):
            image, _, fov = ray.get(box[0])
            valid = None if fov is None else torch.from_numpy(np.array(fov))
            logits, frozen = self._logits(image, ship_frozen)
            out.append(packed_sample(state_id, sample_masks(logits, k, temperature, seed, valid).cpu().numpy()))
            if frozen is not None:
                out[-1]["frozen"] = frozen.to("cpu")
        return {"version": self.version, "incarnation": self.incarnation, "sync_s": sync_s,
                "sample_s": time.perf_counter() - start, "samples": out,
                "peak_memory_gib": peak_memory_gib(self.device)}

    def predict(self, version: int, weights_box: list, states: list) -> dict:
        """Vessel probabilities (float16) for validation states, with the requested adapter version."""
        self._sync(version, weights_box)
        probs = {}
        for state_id, box in states:
            image, _, _ = ray.get(box[0])
            probs[state_id] = torch.sigmoid(self._logits(image)[0])[0].cpu().numpy().astype(np.float16)
        return {"version": self.version, "incarnation": self.incarnation, "probs": probs}
