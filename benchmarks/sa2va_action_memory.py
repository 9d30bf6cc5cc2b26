"""What image-resolution actions cost in memory: one PPO micro-step of a Sa2VA policy (tiny replica towers) with its
actions on the decoder's native 256 x 256 grid and at image sizes, for K sampled masks per image.

Measured on a GPU (torch.cuda.max_memory_allocated, so the numbers are real allocations): the peak of a
forward + PPO loss (with the KL term) + backward, minus the memory held before the step (weights, optimizer-free).
The towers' activations are the same for every row (SAM2 sees 1024 x 1024, the vision tower 448 x 448 whatever the
image size); what changes between rows is the action path: the upsampled logits, K sampled masks, log-probs, ratios,
advantages and their gradients.

    python benchmarks/sa2va_action_memory.py [--out FILE.json]     # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SIZES = [("native", (256, 256)), ("image", (256, 256)), ("image", (512, 512)), ("image", (584, 565)),
         ("image", (1024, 1024))]


def step_peak(policy, image: np.ndarray, k: int, device) -> int:
    from rl_seg.policy import MaskDistribution
    from rl_seg.ppo.core import PPOLossConfig, ppo_loss

    x = policy.preprocess([image])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logits = policy(x).logits.float()
    with torch.no_grad(), policy.disable_adapter():
        ref = policy(x).logits.float()
    dist = MaskDistribution(logits.expand(k, -1, -1), 0.25)
    actions = dist.sample(torch.Generator(device=device).manual_seed(0))
    old = dist.log_prob(actions).detach()
    adv = torch.randn(actions.shape, device=device)
    loss, _ = ppo_loss(dist, actions, old, adv, PPOLossConfig(kl_coef=1.0),
                       MaskDistribution(ref.expand(k, -1, -1), 0.25))
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    policy.zero_grad(set_to_none=True)
    return int(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device (torch.cuda.max_memory_allocated)", file=sys.stderr)
        return 2
    from sa2va_replica.stubs import use_test_stubs

    use_test_stubs()  # the replica's remote code imports torchvision and timm: TEST STUBs only where they are missing
    from sa2va_replica import build_replica

    from rl_seg.policy import load_policy
    from rl_seg.policy.lora import LoraSettings, attach_lora

    device = torch.device("cuda")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_replica(Path(tmp) / "tiny", family="qwen2")
        for resolution, (h, w) in SIZES:
            policy = attach_lora(load_policy(folder, trust_remote_code=True, device=device,
                                             action_resolution=resolution), LoraSettings(targets="llm", dropout=0.0))
            image = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            for k in (1, 8):
                step_peak(policy, image, k, device)  # warm-up: allocator caches, lazy inits
                peak = step_peak(policy, image, k, device)
                grid = (256, 256) if resolution == "native" else (h, w)
                rows.append({"actions": resolution, "image": [h, w], "grid": list(grid), "k": k, "peak_bytes": peak,
                             "peak_mib": round(peak / 2 ** 20, 1)})
                print(f"{resolution:>6} {h}x{w} grid {grid[0]}x{grid[1]} K={k}: {peak / 2 ** 20:8.1f} MiB", flush=True)
                if args.out:  # after every row: a call cut short by its time limit keeps the rows it measured
                    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                   indent=2) + "\n")
            del policy
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
