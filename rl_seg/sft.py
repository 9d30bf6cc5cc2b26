"""Supervised warm start (`rl-seg sft`): Sa2VA's own mask recipe, 2.0 x BCE + 0.5 x Dice.

Trains a policy on random crops of the training splits (datasets sampled equally often, so 16 DRIVE images are
not drowned by 300 ARCADE ones), validates on full images of the validation splits every ``val_every`` steps,
keeps the best checkpoint by mean validation Dice, and writes a resumable checkpoint (weights, optimizer,
scheduler, RNG, step) at each validation. Deliberately nothing beyond the recipe (no Dice-optimal thresholds,
no thin-vessel weighting): like Sa2VA's fine-tune, the result is expected to under-call thin vessels, and that
gap is what RL is for.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rewards.metrics import MaskPair, Target

from .config import save_config
from .data import Sample, load_dataset
from .evaluate import predict_probabilities
from .policy.base import autocast_for
from .policy.default_model import DefaultModelConfig, DefaultSegModel, standardize

__all__ = ["SFTConfig", "run_sft", "mask_loss"]


@dataclass
class SFTConfig:
    out: Path = field(default=Path("runs/sft"), metadata={"help": "run folder: checkpoints, metrics, best model"})
    data: list[str] = field(default_factory=lambda: ["drive", "arcade"], metadata={
        "help": "datasets (names or folders) trained on together"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    val_split: str = field(default="val", metadata={"help": "split to select the best checkpoint on"})
    model: str = field(default="base", metadata={
        "help": "'base' or 'tiny' (fresh default model of that size), or a checkpoint folder to continue from"})
    model_overrides: dict = field(default_factory=dict, metadata={
        "help": "fields of the fresh model's DefaultModelConfig to change, e.g. {enc_channels: [24, 48, 96, 192]}"})
    steps: int = field(default=4000, metadata={"help": "optimizer steps", "min": 1})
    max_minutes: float | None = field(default=None, metadata={
        "help": "stop (after a final validation and checkpoint) once training has run this long", "gt": 0})
    batch_size: int = field(default=16, metadata={"help": "crops per step", "min": 1})
    crop: int = field(default=256, metadata={"help": "square crop size (images smaller than this are padded)",
                                              "min": 8})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate", "gt": 0})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay", "min": 0})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up, then cosine decay to 0", "min": 0})
    bce_weight: float = field(default=2.0, metadata={"help": "BCE weight (Sa2VA: 2.0)"})
    dice_weight: float = field(default=0.5, metadata={"help": "soft-Dice weight (Sa2VA: 0.5)"})
    val_every: int = field(default=500, metadata={"help": "validate and checkpoint every N steps", "min": 1})
    val_limit: int | None = field(default=None, metadata={"help": "validate on at most N images per dataset",
                                                           "min": 1})
    train_limit: int | None = field(default=None, metadata={"help": "train on at most N images per dataset",
                                                             "min": 1})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu' or 'cuda'"})
    seed: int = field(default=0, metadata={"help": "seed of the crop sampler and the initialization"})
    resume: bool = field(default=False, metadata={"help": "continue from out/checkpoint if it exists"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def mask_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float, dice_weight: float) -> torch.Tensor:
    """Sa2VA's mask loss: weighted BCE on logits plus soft Dice per image (smoothing 1, as in its code)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce_weight * bce + dice_weight * dice.mean()


class CropSampler:
    """Random square crops with flips and 90-degree turns, from images held (standardized) on the device."""

    def __init__(self, datasets: list[list[Sample]], crop: int, device: torch.device, seed: int):
        self.crop = crop
        self.rng = random.Random(seed)
        self.images, self.masks = [], []
        for samples in datasets:
            imgs, msks = [], []
            for s in samples:
                x = torch.from_numpy(np.array(s.image)).permute(2, 0, 1)[None].float()
                imgs.append(standardize(x)[0].to(device))
                msks.append(torch.from_numpy(np.array(s.mask)).to(device))
            self.images.append(imgs)
            self.masks.append(msks)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(size):
            d = self.rng.randrange(len(self.images))
            i = self.rng.randrange(len(self.images[d]))
            x, y = self.images[d][i], self.masks[d][i]
            h, w = y.shape
            pad_h, pad_w = max(0, self.crop - h), max(0, self.crop - w)
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
                y = F.pad(y, (0, pad_w, 0, pad_h))
                h, w = y.shape
            top, left = self.rng.randrange(h - self.crop + 1), self.rng.randrange(w - self.crop + 1)
            x = x[:, top:top + self.crop, left:left + self.crop]
            y = y[top:top + self.crop, left:left + self.crop]
            if self.rng.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            k = self.rng.randrange(4)
            xs.append(torch.rot90(x, k, (-2, -1)))
            ys.append(torch.rot90(y, k, (-2, -1)))
        return torch.stack(xs), torch.stack(ys).float()


def validate(model, val_sets: dict[str, list[Sample]]) -> dict:
    """Dice, recall and precision at 0.5 (inside the FOV) per validation set, and their mean Dice."""
    out = {}
    for name, samples in val_sets.items():
        probs = predict_probabilities(model, samples)
        rows = [MaskPair(p > 0.5, Target(s.mask, s.fov)) for s, p in zip(samples, probs)]
        out[name] = {k: float(np.mean([getattr(r, k)() for r in rows])) for k in ("dice", "recall", "precision")}
    out["mean_dice"] = float(np.mean([m["dice"] for m in out.values()]))
    return out


def _build_model(cfg: SFTConfig) -> DefaultSegModel:
    torch.manual_seed(cfg.seed)
    if cfg.model in ("base", "tiny"):
        base = DefaultModelConfig() if cfg.model == "base" else DefaultModelConfig.tiny()
        return DefaultSegModel(DefaultModelConfig.from_dict({**asdict(base), **cfg.model_overrides}))
    return DefaultSegModel.from_pretrained(cfg.model)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def run_sft(cfg: SFTConfig) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    train_sets = [list(load_dataset(d, cfg.train_split, limit=cfg.train_limit)) for d in cfg.data]
    val_sets = {Path(d).name: list(load_dataset(d, cfg.val_split, limit=cfg.val_limit)) for d in cfg.data}

    model = _build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.steps))
    sampler = CropSampler(train_sets, cfg.crop, device, cfg.seed)
    step, best = 0, -1.0
    ckpt = out / "checkpoint"
    if cfg.resume and (ckpt / "trainer.pt").is_file():
        state = torch.load(ckpt / "trainer.pt", map_location=device, weights_only=False)
        model.load_state_dict(DefaultSegModel.from_pretrained(ckpt).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.rng.setstate(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, best = state["step"], state["best"]
        # The saved lr belongs to the saved run's schedule; a resumed run with another `steps` follows its own.
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        scheduler.lr_lambdas = [_lr_lambda(cfg.warmup_steps, cfg.steps)] * len(optimizer.param_groups)
        for group, lr in zip(optimizer.param_groups, [cfg.lr * _lr_lambda(cfg.warmup_steps, cfg.steps)(step)]
                             * len(optimizer.param_groups)):
            group["lr"] = lr
        print(f"resumed from {ckpt} at step {step} (best mean val Dice {best:.4f})")

    log = (out / "metrics.jsonl").open("a")
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", unit="step", disable=not cfg.progress)
    start, losses = time.time(), []
    model.train()
    while step < cfg.steps:
        x, y = sampler.batch(cfg.batch_size)
        with autocast_for(device):
            logits = model(x).logits
        loss = mask_loss(logits.float(), y, cfg.bce_weight, cfg.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        out_of_time = cfg.max_minutes is not None and time.time() - start > 60 * cfg.max_minutes
        if step % cfg.val_every == 0 or step == cfg.steps or out_of_time:
            metrics = validate(model, val_sets)
            record = {"step": step, "loss": float(np.mean(losses[-cfg.val_every:])), "lr": scheduler.get_last_lr()[0],
                      "seconds": time.time() - start, "val": metrics}
            improved = metrics["mean_dice"] > best
            if improved:
                best = metrics["mean_dice"]
                model.save_pretrained(out / "best")
            record["best"] = best
            log.write(json.dumps(record) + "\n")
            log.flush()
            summary = "  ".join(f"{k} dice {v['dice']:.4f} R {v['recall']:.3f} P {v['precision']:.3f}"
                                for k, v in metrics.items() if isinstance(v, dict))
            tqdm.write(f"step {step}: loss {record['loss']:.4f}  {summary}  {'(best)' if improved else ''}")
            model.save_pretrained(ckpt)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "sampler_rng": sampler.rng.getstate(), "torch_rng": torch.get_rng_state(),
                        "step": step, "best": best}, ckpt / "trainer.pt")
            if out_of_time:
                tqdm.write(f"stopping at step {step}: max_minutes={cfg.max_minutes} reached")
                break
    bar.close()
    log.close()
    return {"steps": step, "best_mean_val_dice": best, "best": str(out / "best"), "seconds": time.time() - start}
