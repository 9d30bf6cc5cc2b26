"""Ship a trained PPO adapter: copy it to rl_seg/assets/adapters/<name>/ and write its model card from an evaluation.

    python benchmarks/adapter_card.py --adapter RUN/final_adapter --name NAME [--command "rl-seg train ..."]

The card (README.md, with the numbers also in eval.json) says how the adapter was made - the exact command
(``--command``, else ``rl-seg train --config train_config.yaml``, the run's full config copied beside it), the
data and the iterations the run completed - and what it does on each dataset's test split: its metrics at 0.5
and at the threshold chosen on the validation split (best Dice over the sweep), the warm start's at the same two
kinds of threshold, and its precision above the warm start's test threshold curve at equal recall with a 95%
paired-bootstrap interval (``curve_bootstrap.py``). Run it on a CPU: ``rl-seg eval --adapter NAME`` on a CPU
then reproduces the card, which ``tests/test_adapter_card_on_cpu.py`` checks.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curve_bootstrap import bootstrap_gap, recall_precision  # noqa: E402
from rl_seg.adapters import ADAPTERS_DIR, CARD_JSON  # noqa: E402
from rl_seg.data import load_dataset  # noqa: E402
from rl_seg.evaluate import predict_probabilities  # noqa: E402
from rl_seg.merge import adapter_base  # noqa: E402
from rl_seg.policy import load_policy  # noqa: E402
from rl_seg.policy.lora import load_adapter  # noqa: E402
from rl_seg.score import SWEEP, best_threshold, score_probabilities  # noqa: E402

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAIN_CONFIG = "train_config.yaml"
SHOWN = ("dice", "recall", "precision", "cldice", "betti0_error")


def evaluate(adapter: Path, data: str, limit: int | None, device: str, resamples: int, seed: int) -> dict:
    """The card's numbers for one dataset (the adapter's entries use the keys ``rl-seg eval`` reports)."""
    base = adapter_base(adapter)
    warm = load_policy(base, device=device)
    tuned = load_adapter(load_policy(base, device=device), adapter)
    val, test = load_dataset(data, "val", limit=limit), load_dataset(data, "test", limit=limit)
    chosen = {}
    for label, policy in (("warm", warm), ("adapter", tuned)):
        report = score_probabilities(list(zip(val, predict_probabilities(policy, val))), SWEEP, progress=False)
        chosen[label] = best_threshold(report)
    warm_probs, probs = predict_probabilities(warm, test), predict_probabilities(tuned, test)
    warm_test = score_probabilities(list(zip(test, warm_probs)), [float(chosen["warm"])], progress=False)
    run_test = score_probabilities(list(zip(test, probs)), [float(chosen["adapter"])], progress=False)
    gap = bootstrap_gap(recall_precision(test, warm_probs, SWEEP), recall_precision(test, probs, [0.5])[:, 0],
                        resamples, seed)
    return {"split": "test", "num_images": len(test), "limit": limit, "val_images": len(val),
            "threshold": 0.5, "mean": run_test["mean"], "val_threshold": chosen["adapter"],
            "thresholds": run_test["thresholds"],
            "warm_start": {"policy": base, "mean": warm_test["mean"], "val_threshold": chosen["warm"],
                           "at_val_threshold": warm_test["thresholds"][chosen["warm"]]},
            "above_curve": gap}


def run_facts(run: Path | None) -> dict:
    """What the run folder says about how the adapter was made: its config and completed iterations."""
    if run is None or not (run / "config.yaml").is_file():
        return {}
    config = yaml.safe_load((run / "config.yaml").read_text())
    # As a recipe to run again: from the start (a run continued after a stop records resume: true).
    config.update(resume=False, stop_after_iterations=None)
    facts = {"config": config, "iterations": config.get("iterations")}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        facts["completed_iterations"] = max((int(r["iteration"]) for r in rows), default=0)
    return facts


def card_text(name: str, card: dict) -> str:
    data = card.get("train_data", {})
    lines = [f"# rl-seg adapter `{name}` (model card)", "",
             f"A LoRA adapter (PEFT format) on rl-seg's `{card['base_policy']}` policy, trained with PPO by rl-seg. "
             f"Use it by name: `rl-seg eval --adapter {name} --data arcade --split test`.", "",
             "## How it was made", "", "    " + card["command"], ""]
    if data.get("datasets"):
        size = "at their own size" if data.get("image_size") is None else f"resized to {data['image_size']} px"
        lines += [f"Data: {', '.join(data['datasets'])} (split `{data.get('train_split')}` for rollouts, "
                  f"`{data.get('val_split')}` for validation), images {size}. "
                  + (f"{data['note']}. " if data.get("note") else "")
                  + f"Iterations: {card.get('completed_iterations')} (of {card.get('iterations')} planned). "
                  f"The run's whole config: `{TRAIN_CONFIG}`.", ""]
    lines += ["## Test metrics", "",
              f"Per-image means on each dataset's test split (inside the FOV where there is one), evaluated on "
              f"{card['evaluated']['device']} with `benchmarks/adapter_card.py`; `rl-seg eval --adapter {name} "
              "--data D --split test --thresholds T` prints the adapter's rows. Thresholds 'chosen on val': best "
              "Dice over 0.05-0.95 on the validation split, for each model separately.", ""]
    for data_name, r in card["results"].items():
        gap = r["above_curve"]
        lines += [f"### {data_name} (test, {r['num_images']} images{', first ' + str(r['limit']) if r['limit'] else ''})",
                  "", "| model | threshold | " + " | ".join(SHOWN) + " |", "|---|---|" + "---|" * len(SHOWN)]
        rows = [("warm start", "0.5", r["warm_start"]["mean"]),
                ("warm start", f"{r['warm_start']['val_threshold']} (chosen on val)",
                 r["warm_start"]["at_val_threshold"]),
                (f"`{name}`", "0.5", r["mean"]),
                (f"`{name}`", f"{r['val_threshold']} (chosen on val)", r["thresholds"][r["val_threshold"]])]
        lines += [f"| {m} | {t} | " + " | ".join(f"{v[k]:.4f}" for k in SHOWN) + " |" for m, t, v in rows]
        lines += ["", f"Precision above the warm start's test threshold curve at equal recall (adapter at 0.5): "
                      f"**{gap['gap']:+.4f}**, 95% paired-bootstrap interval [{gap['ci95'][0]:+.4f}, "
                      f"{gap['ci95'][1]:+.4f}] ({gap['resamples']} resamples of the {gap['images']} images, seed "
                      f"{gap['seed']}; share of resamples at or above +0.01: {gap['share_above_0.01']:.0%}). Above 0, "
                      "the adapter is a better model than any threshold of the warm start at its recall; at or "
                      "below 0, it mostly moved the operating point.", ""]
    lines += ["## Licence and data", "",
              "Weights: Apache-2.0, as the project. Trained and evaluated on DRIVE (Staal et al., IEEE TMI 2004; "
              "research use) and ARCADE (Popov et al., Scientific Data 2024; CC BY 4.0); see "
              "`data/samples/README.md`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="the trained adapter (a run's final_adapter)")
    parser.add_argument("--name", required=True, help="the shipped adapter's name (its folder under --out)")
    parser.add_argument("--out", type=Path, default=ADAPTERS_DIR, help="parent folder (default: the package's)")
    parser.add_argument("--run", type=Path, default=None, help="the run folder (default: the adapter's parent)")
    parser.add_argument("--command", default=None, help="the exact command that trained it, to quote on the card")
    parser.add_argument("--data-note", default=None, help="what the run's data was where the config alone does not "
                        "say (e.g. which images a host held)")
    parser.add_argument("--datasets", default="drive,arcade")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split (for a quick check)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not (args.adapter / "adapter_config.json").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter_config.json there")
    folder = args.out / args.name
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() != args.adapter.resolve():
        for file in ADAPTER_FILES:
            shutil.copy2(args.adapter / file, folder / file)
    facts = run_facts(args.run or args.adapter.parent)
    if "config" in facts:
        (folder / TRAIN_CONFIG).write_text(yaml.safe_dump(facts["config"], sort_keys=False))
    import torch

    card = {"name": args.name, "base_policy": adapter_base(folder),
            "command": args.command or (f"rl-seg train --config rl_seg/assets/adapters/{args.name}/{TRAIN_CONFIG}"
                                        if "config" in facts else "unknown (no run folder given)"),
            "iterations": facts.get("iterations"), "completed_iterations": facts.get("completed_iterations"),
            "train_data": {**({k: facts["config"]["data"].get(k) for k in ("datasets", "train_split", "val_split",
                                                                           "image_size")} if "config" in facts else {}),
                           "note": args.data_note},
            "evaluated": {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d")},
            "results": {}}
    for data in args.datasets.split(","):
        card["results"][data] = r = evaluate(folder, data, args.limit, args.device, args.resamples, args.seed)
        print(f"{data}: Dice {r['mean']['dice']:.4f} at 0.5; precision above the curve {r['above_curve']['gap']:+.4f} "
              f"[{r['above_curve']['ci95'][0]:+.4f}, {r['above_curve']['ci95'][1]:+.4f}]", flush=True)
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (folder / "README.md").write_text(card_text(args.name, card))
    print(f"wrote {folder / 'README.md'} and {folder / CARD_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
