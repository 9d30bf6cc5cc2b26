"""The smoke sweep end to end on a real local Ray: PPO trials run under Tune, an interrupted sweep resumes, ASHA
stops some trials, the best config is a ready-to-run train config, and every trial is in the table and the plot."""

import csv

import pytest

from rl_seg.config import ConfigError, load_config
from rl_seg.ppo.config import TrainConfig
from tune.sweep import CONFIGS, SweepConfig, run_sweep, trial_resources

pytestmark = pytest.mark.ray


@pytest.mark.scenario
def test_population_based_training_exploits_and_explores(ray_local, tmp_path):
    """PBT over two trials, one segment of one iteration each before the population is compared: the worse
    trial continues from the better one's adapter with perturbed hyperparameters."""
    cfg = load_config(SweepConfig, CONFIGS / "smoke.yaml", [
        f"out_dir={tmp_path}", "name=pbt", "num_samples=2", "scheduler=pbt", "perturbation_interval=1",
        "quantile_fraction=0.5", "max_concurrent_trials=2",
        "space={ppo.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}, "
        "reward.weights.recall: {type: uniform, low: 0.0, high: 0.4}}"])
    summary = run_sweep(cfg)
    assert summary["trials"] == 2 and summary["failed"] == 0
    trials = tmp_path / "pbt" / "trials"
    # Synchronous PBT pauses every trial at the boundary: each restarts from a checkpoint, its own or, for the
    # bottom one, the top one's.
    restored = sorted(trials.glob("trial_*/adapter_00001_from_trial_*"))
    exploited = [a for a in restored if a.parent.name != "trial_" + a.name.split("_from_trial_")[1]]
    assert len(exploited) == 1, f"the bottom trial should have copied the top trial's adapter: {restored}"
    exploiter = exploited[0].parent
    assert (trials / ("trial_" + exploited[0].name.split("_from_trial_")[1])).is_dir()
    first = load_config(TrainConfig, exploiter / "segment_00000" / "config.yaml")
    second = load_config(TrainConfig, exploiter / "segment_00001" / "config.yaml")
    assert second.policy.init_adapter == str(exploited[0])  # continued from the donor's adapter ...
    assert (second.ppo.lr, second.reward.weights) != (first.ppo.lr, first.reward.weights)  # ... perturbed
    assert second.ppo.lr_schedule == "constant"
    with (tmp_path / "pbt" / "trials.csv").open() as fh:
        assert all(int(r["iterations"]) == 2 for r in csv.DictReader(fh))
    best = load_config(TrainConfig, tmp_path / "pbt" / "best_config.yaml")
    assert best.iterations == 2 and best.policy.init_adapter is None
    with pytest.raises(ConfigError, match="cannot change during a run"):
        load_config(SweepConfig, None, ["scheduler=pbt", "space={policy.lora.r: {type: choice, values: [8]}}"])


def test_sweep_config_errors_and_resources():
    with pytest.raises(ConfigError, match=r"space.ppo.lr: loguniform needs 'low' and 'high'"):
        load_config(SweepConfig, None, ["space={ppo.lr: {type: loguniform}}"])
    with pytest.raises(ConfigError, match=r"^search: not one of \['random', 'optuna'\] \(got 'bayes'\)$"):
        load_config(SweepConfig, None, ["search=bayes"])
    with pytest.raises(ConfigError, match="grid keys need search=random"):
        load_config(SweepConfig, None, ["search=optuna", "space={ppo.lr: {type: grid, values: [1]}}"])
    train = load_config(TrainConfig, None, ["rollout.num_workers=2", "rollout.num_cpus=0.5", "reward.num_actors=2",
                                            "reward.num_cpus=1", "learner.num_workers=2", "learner.cpus_per_worker=1"])
    assert trial_resources(train) == (0.25 + 1.0 + 2.0 + 2.0, 0.0)
    # the constrained objective: Dice less recall's shortfall under the floor, Dice itself above it
    from rl_seg.roles.learner import constrained_objective

    floor = {"metric": "val_recall", "min": 0.85, "objective": "val_dice"}
    assert constrained_objective({"val_dice": 0.8, "val_recall": 0.80}, floor) == pytest.approx(0.75)
    assert constrained_objective({"val_dice": 0.8, "val_recall": 0.90}, floor) == pytest.approx(0.8)


@pytest.mark.scenario
def test_asha_sweep_interrupted_resumes_stops_trials_and_writes_a_loadable_best_config(ray_local, tmp_path):
    """Ctrl-C a running sweep (Tune saves its state), then resume=true finishes it: every trial is accounted for,
    ASHA stops the ones it must, and the best config is a ready-to-run train config.

    One trial at a time over a grid of reward weights, with ASHA deciding on a metric the weights determine (the
    reported dice weight): which trials ASHA must stop is then known in advance, so the Train -> Tune -> scheduler
    path is checked without depending on how noisy two PPO iterations are."""
    import os
    import signal
    import subprocess
    import sys
    import time

    overrides = [f"out_dir={tmp_path}", "num_samples=1", "max_concurrent_trials=1", "metric=weight/dice",
                 "grace_period=1", "reduction_factor=3",
                 "space={reward.weights.dice: {type: grid, values: [0.5, 0.4]}, "
                 "ppo.lr: {type: choice, values: [0.001]}}"]
    assert load_config(TrainConfig, None, load_config(SweepConfig, CONFIGS / "smoke.yaml", overrides)
                       .train_overrides).iterations == 2
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    # the sweep's driver joins the session's Ray instance (starting one of its own costs the 2-core machine ~20 s)
    joined = f"ray_address={ray_local.get_runtime_context().gcs_address}"
    proc = subprocess.Popen([sys.executable, "-m", "tune", "--config", str(CONFIGS / "smoke.yaml"), *overrides, joined],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    path = tmp_path / "smoke"
    deadline = time.time() + 240
    while time.time() < deadline and not any((path / "trials").glob("trial_*/metrics.jsonl")):
        time.sleep(1)
    assert any((path / "trials").glob("trial_*/metrics.jsonl")), "the sweep never got going"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Tune saved its state on Ctrl-C and the sweep wrote what it had: not every trial had finished
    if (path / "trials.csv").exists():
        with (path / "trials.csv").open() as fh:
            assert len([r for r in csv.DictReader(fh) if r["status"] == "ok"]) < 2

    summary = run_sweep(load_config(SweepConfig, CONFIGS / "smoke.yaml", [*overrides, "resume=true"]))
    with (path / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert summary["trials"] == 2 and len(rows) == 2 and summary["failed"] == 0
    assert all(r["status"] == "ok" for r in rows), rows
    iterations = {float(r["config/reward.weights.dice"]): int(r["iterations"]) for r in rows}
    # the best ran to the end; the later trial was below the top third at the first rung, so ASHA stopped it
    assert iterations == {0.5: 2, 0.4: 1}
    best = load_config(TrainConfig, path / "best_config.yaml")
    assert best.reward.weights["dice"] == 0.5 and best.iterations == 2 and best.name == "smoke-best"
    assert (path / "sweep.png").stat().st_size > 1000 and (path / "trials.md").is_file()
    for r in rows:  # every trial wrote its own PPO run folder
        assert (path / "trials" / f"trial_{r['trial']}" / "metrics.jsonl").is_file()
