"""Ray Tune sweeps whose trials are PPO training runs (`rl-seg tune` / `python -m tune`).

Each trial is a Tune function trainable that runs the full PPO job (its own rollout actors, reward-pool share and
Ray Train learner group); Ray Train V2 reports reach Tune through ``TuneReportCallback``, the pattern Ray 2.60
documents for Train inside Tune. Train V2 asks for its worker resources on its own, outside the trial's, so the
number of trials running at once is capped from the cluster's CPUs and GPUs and what one trial needs: no trial
can oversubscribe the cluster or wait forever for actors another trial holds.

The objective is a validation metric (``val_dice`` by default), optionally subject to a floor on another
(``val_recall >= 0.85``): the test split is never looked at. Results: ``trials.csv`` / ``trials.md`` (config,
best objective, iterations, status), ``best_config.yaml`` (a ready-to-run ``rl-seg train`` config) and
``sweep.png`` (the metric over iterations for every trial).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rl_seg.config import ConfigError, load_config, save_config
from rl_seg.ppo.config import TrainConfig
from rl_seg.run_metrics import read_metrics
from rl_seg.validation import validate_search_space

__all__ = ["SweepConfig", "run_sweep", "search_space", "trial_resources", "trial_bundles"]

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
SPACE_TYPES = ("loguniform", "uniform", "choice", "grid", "randint")
#: The trial function itself only waits on its PPO job.
TRIAL_DRIVER_CPUS = 0.25
#: What population-based training may perturb between segments: nothing that changes a weight's shape.
PBT_STATE = "pbt.json"
SEGMENT_PREFIX = "segment_"
PBT_MUTABLE = ("ppo.lr", "ppo.loss.", "reward.weights.", "rollout.temperature", "rollout.samples_per_image")


@dataclass
class SweepConfig:
    name: str = field(default="sweep", metadata={"help": "experiment name: results go to out_dir/name"})
    out_dir: Path = field(default=Path("runs/sweeps"), metadata={"help": "parent folder of sweep folders"})
    train_config: str | None = field(default=None, metadata={
        "help": "base rl-seg train YAML for every trial (null: the training defaults)"})
    train_overrides: list[str] = field(default_factory=list, metadata={
        "help": "key=value overrides applied to every trial, e.g. [iterations=20, data.image_size=128]"})
    space: dict[str, dict] = field(default_factory=dict, metadata={
        "help": "dotted train-config key -> {type: loguniform|uniform|randint, low, high} or "
                "{type: choice|grid, values: [...]}; e.g. ppo.lr, reward.weights.recall, policy.lora.r"})
    search: str = field(default="random", metadata={"help": "random (grid keys are crossed) or optuna",
                                                    "choices": ["random", "optuna"]})
    num_samples: int = field(default=4, metadata={"help": "trials (per grid point for random search)", "min": 1})
    metric: str = field(default="val_dice", metadata={"help": "validation metric to optimize"})
    mode: str = field(default="max", metadata={"help": "max or min", "choices": ["max", "min"]})
    constraint_metric: str | None = field(default=None, metadata={
        "help": "optional second metric that must reach constraint_min (e.g. val_recall)"})
    constraint_min: float = field(default=0.85, metadata={"help": "floor for constraint_metric"})
    scheduler: str = field(default="asha", metadata={"help": "asha (early stopping), fifo or pbt",
                                                      "choices": ["asha", "fifo", "pbt"]})
    grace_period: int = field(default=1, metadata={"help": "ASHA: iterations before a trial can be stopped",
                                                   "min": 1})
    perturbation_interval: int = field(default=5, metadata={
        "help": "PBT: PPO iterations per segment; after each, the worst trials copy the adapter of the best and "
                "perturb their hyperparameters (the space's keys; only those that can change mid-run)", "min": 1})
    quantile_fraction: float = field(default=0.25, metadata={
        "help": "PBT: fraction of trials that exploit (bottom) and are exploited (top)", "gt": 0, "max": 0.5})
    reduction_factor: float = field(default=2.0, metadata={"help": "ASHA reduction factor", "gt": 1})
    max_concurrent_trials: int | None = field(default=None, metadata={
        "help": "trials at once (null: as many as the cluster's CPUs/GPUs hold)", "min": 1})
    max_failures: int = field(default=1, metadata={"help": "retries of a failed trial before it is reported",
                                                   "min": 0})
    resume: bool = field(default=False, metadata={"help": "restore an interrupted sweep (Tuner.restore)"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray address (default: local instance)"})
    ray_num_cpus: float | None = field(default=None, metadata={"help": "logical CPUs of a local Ray instance",
                                                                 "gt": 0})

    def __post_init__(self):
        if self.scheduler == "pbt":
            if self.search != "random":
                raise ConfigError("scheduler=pbt samples its own population: it needs search=random")
            fixed = [k for k in self.space if not k.startswith(PBT_MUTABLE)]
            if fixed:
                raise ConfigError(f"space: {fixed} cannot change during a run; with scheduler=pbt the space may "
                                  f"only hold keys under {list(PBT_MUTABLE)}")
        for key, spec in self.space.items():
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind not in SPACE_TYPES:
                raise ConfigError(f"space.{key}: type must be one of {list(SPACE_TYPES)}, got {spec!r}")
            if kind in ("choice", "grid") and not spec.get("values"):
                raise ConfigError(f"space.{key}: {kind} needs a non-empty 'values' list")
            if kind not in ("choice", "grid") and not ("low" in spec and "high" in spec):
                raise ConfigError(f"space.{key}: {kind} needs 'low' and 'high'")
            if kind == "grid" and self.search == "optuna":
                raise ConfigError(f"space.{key}: grid keys need search=random")

    @property
    def path(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def objective(self) -> str:
        return "objective" if self.constraint_metric else self.metric


def search_space(space: dict[str, dict]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "loguniform":
            out[key] = tune.loguniform(float(spec["low"]), float(spec["high"]))
        elif kind == "uniform":
            out[key] = tune.uniform(float(spec["low"]), float(spec["high"]))
        elif kind == "randint":
            out[key] = tune.randint(int(spec["low"]), int(spec["high"]))
        elif kind == "choice":
            out[key] = tune.choice(list(spec["values"]))
        else:
            out[key] = tune.grid_search(list(spec["values"]))
    return out


def trial_resources(train: TrainConfig) -> tuple[float, float]:
    """CPUs and GPUs one trial's PPO job asks for (its driver, rollouts, reward pool and learners)."""
    cpus = (TRIAL_DRIVER_CPUS + train.rollout.num_workers * train.rollout.num_cpus + train.reward.num_actors * train.reward.num_cpus
            + train.learner.num_workers * train.learner.cpus_per_worker)
    gpus = train.rollout.num_workers * train.rollout.num_gpus + (
        train.learner.num_workers * train.learner.gpus_per_worker if train.learner.use_gpu else 0.0)
    return cpus, gpus


def trial_bundles(train: TrainConfig):
    """The trial's placement group: its driver, then one bundle per rollout actor and reward actor, which Tune
    captures when the trial creates them. The learner group is placed by Ray Train V2 itself, outside it."""
    from ray.tune import PlacementGroupFactory

    rollout = {"CPU": train.rollout.num_cpus, **({"GPU": train.rollout.num_gpus} if train.rollout.num_gpus else {})}
    return PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPUS}] + [rollout] * train.rollout.num_workers
                                 + [{"CPU": train.reward.num_cpus}] * train.reward.num_actors)


def _base_train_config(cfg: SweepConfig) -> TrainConfig:
    return load_config(TrainConfig, cfg.train_config, cfg.train_overrides)


def _trial(params: dict, *, sweep: dict) -> None:
    """One Tune trial: a PPO run with the sampled overrides, reporting through Ray Train to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rl_seg.run_checkpoints import latest_checkpoint
    from rl_seg.train import run_training

    trial_id = tune.get_context().get_trial_id()
    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    if sweep.get("pbt"):
        return _pbt_trial(trial_id, overrides, sweep)
    run_dir = Path(sweep["runs_dir"])
    name = f"trial_{trial_id}"
    extra = [f"name={name}", f"run_dir={run_dir}", "progress=false"]
    run_path = run_dir / name
    if run_path.exists():  # a retried or restored trial: continue from its checkpoint, or start clean
        if latest_checkpoint(run_path) is not None:
            extra.append("resume=true")
        else:
            shutil.rmtree(run_path)
    cfg = load_config(TrainConfig, sweep["train_config"], [*sweep["train_overrides"], *overrides, *extra])
    constraint = sweep.get("constraint")
    run_training(cfg, callbacks=[TuneReportCallback()], objective=constraint)


def _pbt_trial(trial_id: str, overrides: list[str], sweep: dict) -> None:
    """A PBT trial: PPO in segments of ``interval`` iterations, each a run of its own that starts from the
    previous segment's adapter, reporting its validation metrics and its adapter to Tune after each segment.

    When Tune's PBT makes this trial exploit a better one, it restarts the function with perturbed
    hyperparameters and the better trial's last adapter as the checkpoint: the next segment starts from that
    adapter. Optimizer moments start fresh every segment (they belong to the old hyperparameters), and the
    learning rate is held constant after warm-up so that no segment decays to zero.
    """
    from ray import tune

    from rl_seg.train import run_training

    base = load_config(TrainConfig, sweep["train_config"], sweep["train_overrides"])
    trial_dir = Path(sweep["runs_dir"]) / f"trial_{trial_id}"
    done, init_adapter = 0, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            origin = json.loads((Path(folder) / PBT_STATE).read_text())
            done = int(origin["iteration"])
            init_adapter = trial_dir / f"adapter_{done:05d}_from_trial_{origin['trial']}"
            if not init_adapter.exists():
                shutil.copytree(folder, init_adapter)
    while done < base.iterations:
        steps = min(sweep["pbt"]["interval"], base.iterations - done)
        name = f"{SEGMENT_PREFIX}{done:05d}"
        shutil.rmtree(trial_dir / name, ignore_errors=True)  # a retried segment starts clean
        cfg = load_config(TrainConfig, sweep["train_config"], [
            *sweep["train_overrides"], *overrides, f"name={name}", f"run_dir={trial_dir}", f"iterations={steps}",
            "ppo.lr_schedule=constant", "progress=false", "resume=false", "stop_after_iterations=null",
            *([f"policy.init_adapter={init_adapter}"] if init_adapter else [])])
        run_training(cfg)
        done += steps
        adapter = trial_dir / name / "final_adapter"
        (adapter / PBT_STATE).write_text(json.dumps({"iteration": done, "trial": trial_id}) + "\n")
        report = _segment_report(trial_dir / name, done, sweep.get("constraint"))
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(adapter)))
        init_adapter = adapter


def _segment_report(run: Path, iteration: int, constraint: dict | None) -> dict:
    """What one segment reports to Tune: the validation metrics of its last iteration, under Tune's names."""
    records = read_metrics(run)
    val = next(r for r in reversed(records) if "val/dice" in r)
    report = {"iteration": iteration, **{k.replace("/", "_"): v for k, v in val.items() if k.startswith("val/")},
              "reward": records[-1].get("reward")}
    if constraint:
        from rl_seg.roles.learner import constrained_objective

        report["objective"] = constrained_objective(report, constraint)
    return report


def run_sweep(cfg: SweepConfig) -> dict:
    from rl_seg.console import LOG_DIR, driver_session, is_verbose
    from rl_seg.ray_env import init_ray

    # The base config and every value the space can draw, before Ray starts and before the sweep folder is made.
    base = validate_search_space(cfg.train_config, cfg.train_overrides, cfg.space)
    path = cfg.path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / "sweep.yaml")
    # The console: a line per trial report (Tune's own status tables off); trials' output in their logs/.
    if not is_verbose():  # Tune's INFO records ("wrote the result files") are not for the console
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    with driver_session(path / LOG_DIR):
        init_ray(cfg.ray_address, num_cpus=cfg.ray_num_cpus)
        results = _fit(cfg, base, path)
    return summarize(cfg, results, path)


def _fit(cfg: SweepConfig, base: TrainConfig, path: Path):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


    cpus, gpus = trial_resources(base)
    available = ray.cluster_resources()
    fits = [math.floor(available.get("CPU", 0) / cpus)]
    if gpus:
        fits.append(math.floor(available.get("GPU", 0) / gpus))
    concurrent = max(1, min(fits))  # what fits; a configured cap may only lower it
    if cfg.max_concurrent_trials:
        concurrent = min(concurrent, cfg.max_concurrent_trials)
    log.info("each trial needs %.2f CPU and %.2f GPU: running %d trials at once", cpus, gpus, concurrent)

    sweep = {"runs_dir": str(path / "trials"), "train_config": cfg.train_config,
             "train_overrides": list(cfg.train_overrides),
             "constraint": {"metric": cfg.constraint_metric, "min": cfg.constraint_min, "objective": cfg.metric}
             if cfg.constraint_metric else None,
             "pbt": {"interval": cfg.perturbation_interval} if cfg.scheduler == "pbt" else None}
    trainable = tune.with_resources(tune.with_parameters(_trial, sweep=sweep), trial_bundles(base))
    if cfg.resume and tune.Tuner.can_restore(str(path / "tune")):
        tuner = tune.Tuner.restore(str(path / "tune"), trainable=trainable, restart_errored=True)
    else:
        search_alg = None
        if cfg.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(metric=cfg.objective, mode=cfg.mode)
        if cfg.scheduler == "asha":
            scheduler = ASHAScheduler(metric=cfg.objective, mode=cfg.mode, max_t=base.iterations,
                                      grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
        elif cfg.scheduler == "pbt":
            from ray.tune.schedulers import PopulationBasedTraining

            # Each report is one segment, so Tune's clock (training_iteration) counts segments; synchronous
            # PBT compares the whole population at every segment boundary, as the original paper does.
            scheduler = PopulationBasedTraining(
                time_attr="training_iteration", metric=cfg.objective, mode=cfg.mode, perturbation_interval=1,
                hyperparam_mutations=search_space(cfg.space), quantile_fraction=cfg.quantile_fraction,
                synch=True)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg.space),
            tune_config=tune.TuneConfig(num_samples=cfg.num_samples, search_alg=search_alg, scheduler=scheduler,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name="tune", storage_path=str(path), verbose=0, callbacks=[trial_lines(cfg)],
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
        )
    return tuner.fit()


def trial_lines(cfg: SweepConfig):
    """A Tune callback (it runs in the driver) that prints a line per trial event and report."""
    from ray import tune

    from rl_seg.console import describe_error

    shown = (cfg.objective, cfg.metric, *([cfg.constraint_metric] if cfg.constraint_metric else []))

    class TrialLines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            params = "  ".join(f"{k}={_fmt(v)}" for k, v in (trial.config or {}).items())
            print(f"trial {trial.trial_id} started: {params}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            values = "  ".join(f"{k} {result[k]:.4f}" for k in dict.fromkeys(shown) if isinstance(result.get(k),
                                                                                                    (int, float)))
            print(f"[trial {trial.trial_id} iter {result.get('iteration', result.get('training_iteration'))}] "
                  f"{values}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} ended", flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"warning: trial {trial.trial_id} failed and is retried: {self._error(trial)}", file=sys.stderr,
                  flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} failed: {self._error(trial)}", file=sys.stderr, flush=True)

        @staticmethod
        def _error(trial) -> str:
            error = trial.get_pickled_error()
            return describe_error(error) if error is not None else f"see {trial.error_file}"

    return TrialLines()


def summarize(cfg: SweepConfig, results, path: Path) -> dict:
    """Trials table, the best trial's config as a ready-to-run train config, and the sweep plot."""
    rows = []
    objective, better = cfg.objective, (max if cfg.mode == "max" else min)
    for result in results:
        history = result.metrics_dataframe
        values = [] if history is None or objective not in history else [
            float(v) for v in history[objective].tolist() if v == v]
        config = {k: v for k, v in (result.config or {}).items()}
        trial_id = (result.metrics or {}).get("trial_id") or "_".join(Path(result.path).name.split("_")[2:4])
        iterations = int((result.metrics or {}).get("iteration", 0))
        if not values:  # Tune lost this trial's reports (cut off mid-report): read what the run itself wrote
            values, iterations = _from_run_folder(path / "trials" / f"trial_{trial_id}", objective)
        rows.append({"trial": trial_id, **{f"config/{k}": v for k, v in config.items()},
                     f"best_{objective}": better(values) if values else float("nan"),
                     "iterations": iterations,
                     "status": _error_line(result.error) if result.error else "ok"})
    keys = sorted({k for r in rows for k in r}, key=lambda k: (not k.startswith("trial"), k))
    with (path / "trials.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    (path / "trials.md").write_text("\n".join(lines) + "\n")

    finished = [r for r in rows if r["status"] == "ok" and r[f"best_{objective}"] == r[f"best_{objective}"]]
    best = better(finished, key=lambda r: r[f"best_{objective}"]) if finished else None
    summary = {"path": str(path), "trials": len(rows), "failed": sum(r["status"] != "ok" for r in rows),
               "best": best}
    if best is not None:
        trial = path / "trials" / f"trial_{best['trial']}"
        segments = sorted(trial.glob(f"{SEGMENT_PREFIX}*/config.yaml"))
        best_cfg = yaml.safe_load((segments[-1] if segments else trial / "config.yaml").read_text())
        best_cfg.update({"name": f"{cfg.name}-best", "resume": False, "stop_after_iterations": None})
        if segments:  # PBT: the hyperparameters it ended with, over the whole run, from the start
            best_cfg["iterations"] = _base_train_config(cfg).iterations
            best_cfg["policy"]["init_adapter"] = None
        (path / "best_config.yaml").write_text(yaml.safe_dump(best_cfg, sort_keys=False))
        load_config(TrainConfig, path / "best_config.yaml")  # it must load as a train config
        summary["best_config"] = str(path / "best_config.yaml")
    summary["plot"] = str(plot_sweep(path, cfg.metric))
    (path / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _metric_key(metric: str) -> str:
    """Tune reports use ``val_dice``; metrics.jsonl keeps Ray Train's ``val/dice``."""
    return "val/" + metric[4:] if metric.startswith("val_") else metric


def trial_records(run: Path) -> list[dict]:
    """A trial's metrics.jsonl records: its run folder's, or its PBT segments' with iterations made global."""
    if (run / "metrics.jsonl").is_file():
        return read_metrics(run)
    records = []
    for segment in sorted(run.glob(f"{SEGMENT_PREFIX}*")):
        offset = int(segment.name.removeprefix(SEGMENT_PREFIX))
        records += [{**r, "iteration": r["iteration"] + offset} for r in read_metrics(segment)]
    return records


def _from_run_folder(run: Path, objective: str) -> tuple[list[float], int]:
    records = trial_records(run)
    key = _metric_key(objective)
    return [float(r[key]) for r in records if key in r], max((int(r["iteration"]) for r in records), default=0)


def _error_line(error) -> str:
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return "ERROR: " + (lines[-1] if lines else type(error).__name__)[:200].replace("|", "/")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_sweep(path: Path, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = _metric_key(metric)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for run in sorted((path / "trials").glob("trial_*")):
        pts = [(r["iteration"], r[key]) for r in trial_records(run) if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=run.name.removeprefix("trial_"), markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"{path.name}: {key} per trial")
    fig.tight_layout()
    fig.savefig(path / "sweep.png")
    plt.close(fig)
    return path / "sweep.png"
