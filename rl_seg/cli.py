"""The `rl-seg` command: one entry point, a subcommand per job.

Each subcommand's module is imported only when it runs, so `rl-seg score` does not pay for torch or Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError
from .guards import NonFiniteError
from .data import DataError
from .merge import MergeError
from .run_lock import RunFolderError
from .run_outcome import DiskFull


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"thresholds must lie in [0, 1), got {text!r}")
    return values


def cmd_score(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .score import format_report, plot_sweep, score_predictions, write_json

    dataset = load_dataset(args.data, args.split)
    report = score_predictions(args.pred, dataset, args.thresholds, progress=not args.quiet)
    print(format_report(report, per_image=not args.summary))
    if args.out:
        print(f"wrote {write_json(report, args.out)}")
    if args.plot:
        print(f"wrote {plot_sweep(report, args.plot)}")
    return 0


def _run_config(args: argparse.Namespace, cls):
    from .config import describe, load_config

    if args.help_config:
        print(describe(cls))
        return None
    # --resume is the flag form of the config's own `resume` field (train and tune have one)
    overrides = [*args.overrides, *(["resume=true"] if getattr(args, "resume", False) else [])]
    cfg = load_config(cls, args.config, overrides)
    if args.command == "train" and cfg.resume:  # a resumed run continues with its own saved config
        from .validation import resume_config

        cfg = resume_config(args.config, args.overrides)
    return cfg


def cmd_sft(args: argparse.Namespace) -> int:
    from .console import LOG_DIR, driver_session
    from .sft import SFTConfig, run_sft

    cfg = _run_config(args, SFTConfig)
    if cfg is None:
        return 0
    with driver_session(Path(cfg.out) / LOG_DIR):  # library warnings to out/logs/driver.log
        result = run_sft(cfg)
    print(f"best mean validation Dice {result['best_mean_val_dice']:.4f} after {result['steps']} steps "
          f"({result['seconds']:.0f} s): {result['best']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .plots import plot_run_curves
    from .ppo.config import TrainConfig
    from .run_outcome import RunFailed, RunInterrupted, exit_now
    from .train import run_training

    cfg = _run_config(args, TrainConfig)
    if cfg is None:
        return 0
    print(f"rl-seg train: {cfg.name}, {cfg.iterations} iterations on {', '.join(cfg.data.datasets)} -> "
          f"{cfg.run_path}", flush=True)
    try:
        summary = run_training(cfg)
    except RunInterrupted as exc:  # recorded with the resume command; no traceback for a signal
        print(f"rl-seg train: {exc}", file=sys.stderr, flush=True)
        exit_now(exc.exit_code)
    except RunFailed as exc:
        print(f"rl-seg train: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        curves = plot_run_curves(summary["run_path"])
    except ImportError as exc:  # a GPU image without matplotlib: the metrics are in metrics.jsonl regardless
        curves = f"not drawn ({exc})"
    print(f"{summary['outcome']}\n  {summary['completed']} iterations in {summary['seconds']:.0f} s; adapter "
          f"{summary['final_adapter'] or 'not written (the run did not reach its last iteration)'}; curves {curves}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from tune.sweep import SweepConfig, run_sweep

    cfg = _run_config(args, SweepConfig)
    if cfg is None:
        return 0
    summary = run_sweep(cfg)
    print((Path(summary["path"]) / "trials.md").read_text())
    print(f"{summary['trials']} trials, {summary['failed']} failed; best config: {summary.get('best_config')}; "
          f"plot: {summary['plot']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .adapters import resolve_adapter
    from .data import load_dataset
    from .evaluate import evaluate_policy, report_text
    from .policy import load_policy
    from .merge import adapter_base
    from .policy.lora import load_adapter
    from .score import plot_sweep, write_json

    adapter = resolve_adapter(args.adapter) if args.adapter else None
    policy_name = args.policy
    if policy_name is None:  # an adapter knows its base; without one, the shipped default
        policy_name = adapter_base(adapter) if adapter else "default"
    policy = load_policy(policy_name, trust_remote_code=args.trust_remote_code, device=args.device)
    if adapter:
        policy = load_adapter(policy, adapter)
    dataset = load_dataset(args.data, args.split, limit=args.limit)
    report = evaluate_policy(policy, dataset, args.thresholds, overlays=args.overlays, progress=not args.quiet)
    if adapter:
        report["adapter"] = str(args.adapter)
        report["adapter_path"] = str(adapter)
    print(report_text(report))
    if args.out:
        print(f"wrote {write_json(report, args.out)}")
        plot = Path(args.out).with_suffix(".sweep.png")
        if len(report["thresholds"]) > 1:
            print(f"wrote {plot_sweep(report, plot)}")
    if args.overlays:
        print(f"wrote {len(dataset)} overlays to {args.overlays} (white: found, red: missed, blue: false)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .adapters import resolve_adapter
    from .merge import MergeError, merge_adapter_dir

    try:
        adapter = resolve_adapter(args.adapter)
    except FileNotFoundError:  # merge_adapter_dir names what is wrong with the folder
        adapter = args.adapter
    try:
        out = merge_adapter_dir(adapter, args.out, policy=args.policy, trust_remote_code=args.trust_remote_code)
    except (MergeError, FileNotFoundError) as exc:
        print(f"rl-seg merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the merged policy to {out} (load it with --policy {out})")
    return 0


def _plan(cfg, gpus: str | None) -> dict:
    from .plan import parse_gpus, plan_train_config

    try:
        spec = parse_gpus(gpus) if gpus else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    result = plan_train_config(cfg, spec)
    if result.get("checked") and gpus is None:
        result["lines"].append("  (GPUs assumed: as many as the config asks for, 80 GiB each; name yours with --gpus)")
    return result


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .ppo.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    result = _plan(cfg, args.gpus)
    print("\n".join(result["lines"]))
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in result.items() if k != "lines"}, indent=1) + "\n")
    return 0 if result["fits"] else 2


def cmd_submit(args: argparse.Namespace) -> int:
    from .config import load_config
    from .ppo.config import TrainConfig
    from .service.jobs import dashboard_url, job_client, submit_training

    cfg = load_config(TrainConfig, args.config, args.overrides)  # bad configs fail here, not on the cluster
    if not args.no_plan:  # and configs that cannot fit fail here too, before the cluster is contacted
        result = _plan(cfg, args.gpus)
        if not result["fits"]:
            print("\n".join(result["lines"][:-1]), file=sys.stderr)
            print(f"rl-seg submit: error: {args.config} does not fit: {'; '.join(result['problems'])} "
                  f"(rl-seg plan --config {args.config} shows the parts; --no-plan submits anyway)", file=sys.stderr)
            return 2
    name = args.name or cfg.name
    run_dir = (args.run_dir or cfg.run_dir).resolve()
    working_dir = None if args.no_working_dir else args.working_dir.resolve()
    config_path = args.config.resolve()
    if working_dir is not None and config_path.is_relative_to(working_dir):
        config_path = config_path.relative_to(working_dir)  # the job runs inside the uploaded copy
    client = job_client(args.address)
    submission_id = submit_training(client, config_path, run_dir=run_dir, name=name, overrides=args.overrides,
                                    working_dir=working_dir, python=args.python, verbose=args.verbose)
    dashboard = dashboard_url(args.address)
    print(f"submitted job {submission_id}\n  run folder: {run_dir / name}\n  dashboard:  {dashboard}/#/jobs/"
          f"{submission_id}\n  logs:       ray job logs --address {dashboard} -f {submission_id}", flush=True)
    if not args.follow:
        return 0
    return _follow(client, submission_id)


def _follow(client, submission_id: str) -> int:
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(submission_id)
    print(f"job {submission_id}: {status.value}")
    return 0 if status.value == "SUCCEEDED" else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import ServiceSettings, load_or_create_token, serve
    from .service.server import TOKEN_ENV, start_in_cluster

    token_file = args.token_file or args.runs / ".service_token"
    token = load_or_create_token(token_file)
    settings = ServiceSettings(runs_root=args.runs.resolve(), sweeps_root=args.sweeps.resolve() if args.sweeps
                               else None, token=token, ray_address=args.ray_address, python=args.python,
                               allowed_policies=[p.resolve() for p in args.allow_policy])
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the read endpoints are open to anyone who reaches it",
              file=sys.stderr)
    where = f"${TOKEN_ENV}" if os.environ.get(TOKEN_ENV) else token_file
    if args.in_cluster:
        from .ray_env import init_ray

        init_ray(args.cluster_address)
        _, url = start_in_cluster(settings, args.host, args.port)
        print(f"status service running in the cluster at {url} (docs {url}/docs); control token in {where}")
        return 0
    print(f"status service on http://{args.host}:{args.port} (docs /docs); control token in {where}", flush=True)
    serve(settings, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl-seg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="print everything: the workers' output "
                        "and Ray's messages, which otherwise go to the run folder's logs/, and DEBUG records")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = sub.add_parser("score", help="score saved predictions against a dataset",
                           description="Score saved predictions (binary masks or probability maps) against a "
                                       "dataset, per image and mean, inside the FOV where there is one.")
    score.add_argument("--pred", type=Path, required=True, help="folder of predictions; a file matches a sample "
                       "when its stem is the sample id or starts with the id and an underscore")
    score.add_argument("--data", required=True, help="dataset name (drive, arcade, drive-sample, arcade-sample) "
                       "or a dataset folder")
    score.add_argument("--split", default="test", help="split to score (default: test)")
    score.add_argument("--thresholds", type=_thresholds, default=[0.5],
                       help="comma-separated thresholds for the sweep, e.g. 0.1,0.3,0.5,0.7 (0.5 is always in)")
    score.add_argument("--out", type=Path, help="write the JSON report here")
    score.add_argument("--plot", type=Path, help="write a PNG of the threshold sweep here")
    score.add_argument("--summary", action="store_true", help="print only the means, not every image")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=cmd_score)

    sft = sub.add_parser("sft", help="supervised warm start (2.0 x BCE + 0.5 x Dice)",
                         description="Train a policy with Sa2VA's mask recipe; config from YAML and key=value "
                                     "overrides (see --help-config).")
    _config_args(sft)
    sft.set_defaults(func=cmd_sft)

    train = sub.add_parser("train", help="PPO on Ray: rollout actors, reward pool, Ray Train + DeepSpeed learners",
                           description="The PPO training job. Runs the same under `ray job submit --working-dir . "
                                       "-- rl-seg train ...` and locally (a local Ray instance when no address is "
                                       "given). Config from YAML and key=value overrides (see --help-config).")
    _config_args(train)
    train.add_argument("--resume", action="store_true", help="continue the run (located by name and run_dir) from its "
                       "latest checkpoint with its saved config; overrides may change only iterations, "
                       "stop_after_iterations, progress, ray_address and ray_num_cpus")
    train.set_defaults(func=cmd_train)

    tn = sub.add_parser("tune", help="Ray Tune sweep whose trials are PPO runs",
                        description="A Ray Tune sweep over reward weights, learning rate and PPO settings; config "
                                    "from YAML and key=value overrides (see --help-config).")
    _config_args(tn)
    tn.add_argument("--resume", action="store_true", help="restore an interrupted sweep")
    tn.set_defaults(func=cmd_tune)

    sb = sub.add_parser("submit", help="submit `rl-seg train` to a Ray cluster as a job",
                        description="Wraps `ray job submit`: validates the config here, uploads the working dir "
                                    "(without .venv, runs, .git), sets the entry point, runtime env and token "
                                    "authentication, and prints the job id and the dashboard URL.")
    _verbose_arg(sb)
    sb.add_argument("--config", type=Path, required=True, help="train config YAML")
    sb.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    sb.add_argument("--address", default=None, help="dashboard address (default: $RAY_API_SERVER_ADDRESS, else "
                    "$RAY_ADDRESS if http, else http://127.0.0.1:8265)")
    sb.add_argument("--name", default=None, help="run name (default: the config's name)")
    sb.add_argument("--run-dir", type=Path, default=None, help="parent of the run folder, as the cluster sees it "
                    "(default: the config's run_dir, made absolute; shared storage on a multi-node cluster)")
    sb.add_argument("--working-dir", type=Path, default=Path("."), help="uploaded as the job's working dir")
    sb.add_argument("--no-working-dir", action="store_true", help="upload nothing (rl-seg is installed there)")
    sb.add_argument("--python", default="python", help="python on the cluster that has rl-seg installed")
    sb.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 1 unless "
                    "it SUCCEEDED")
    sb.add_argument("--gpus", default=None, help="the cluster's GPUs for the memory plan run first, e.g. 4xA100-80GB "
                    "(default: as many as the config asks for, 80 GiB each)")
    sb.add_argument("--no-plan", action="store_true", help="submit without checking the memory plan")
    sb.set_defaults(func=cmd_submit)

    pl = sub.add_parser("plan", help="whether a train config fits its GPUs: GiB per process, largest micro-batch",
                        description="The GPU memory plan of a train config (rl_seg/plan.py): per GPU the processes "
                                    "Ray would place there (learner ranks, rollout actors) and the GiB each holds, "
                                    "whether it fits, and each learner's largest micro-batch. Exit 2 when it does "
                                    "not fit. Sa2VA checkpoints only; nothing is loaded (config.json and the "
                                    "safetensors headers are read).")
    pl.add_argument("--config", type=Path, required=True, help="train config YAML")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    pl.add_argument("--gpus", default=None, help="e.g. 4xA100-80GB, 1xH200, 2x80GB (default: as many as the config "
                    "asks for, 80 GiB each)")
    pl.add_argument("--json", type=Path, default=None, help="also write every number here")
    pl.set_defaults(func=cmd_plan)

    sv = sub.add_parser("serve", help="the status service (FastAPI): runs, metrics, health, sweeps; stop/submit",
                        description="Serve run and sweep status over HTTP (OpenAPI docs at /docs). Binds "
                                    "127.0.0.1 by default; stop/submit need the bearer token.")
    sv.add_argument("--runs", type=Path, default=Path("runs"), help="runs root (the train config's run_dir)")
    sv.add_argument("--sweeps", type=Path, default=None, help="sweeps root (the sweep config's out_dir)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--ray-address", default=None, help="Ray dashboard address for job status/submit/stop, e.g. "
                    "http://127.0.0.1:8265")
    sv.add_argument("--token-file", type=Path, default=None, help="control token file (default: RUNS/.service_"
                    "token, created owner-only; $RL_SEG_SERVICE_TOKEN wins)")
    sv.add_argument("--python", default="python", help="python on the cluster for submitted runs")
    sv.add_argument("--allow-policy", type=Path, action="append", default=[], metavar="DIR",
                    help="a policy folder (or a folder of them) whose remote code submitted runs may run "
                    "(policy.trust_remote_code=true); repeatable. Without it, POST /runs refuses remote code")
    sv.add_argument("--in-cluster", action="store_true", help="run as a detached Ray actor in the cluster (on "
                    "the node it lands on; named rl-seg-status, restarted by Ray if it dies)")
    sv.add_argument("--cluster-address", default=os.environ.get("RL_SEG_GCS_ADDRESS"),
                    help="with --in-cluster: the cluster's GCS address (default: $RL_SEG_GCS_ADDRESS, which "
                    "cluster/local.sh sets, else $RAY_ADDRESS)")
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluate a policy: metrics, threshold sweep, overlays",
                        description="Evaluate a policy's logits on a dataset split, per image and mean, with a "
                                    "threshold sweep and overlay pictures.")
    ev.add_argument("--policy", default=None, help="'default' (the shipped model), a registered policy name, or a "
                    "checkpoint folder (rl-seg or Hugging Face Sa2VA); default: the adapter's recorded base, else "
                    "'default'")
    ev.add_argument("--adapter", help="a PEFT LoRA adapter folder to apply, or the name of a shipped adapter "
                    "(rl_seg/assets/adapters/<name>, each with its model card)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the split's first N images only")
    ev.add_argument("--data", required=True, help="dataset name or folder")
    ev.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ev.add_argument("--thresholds", type=_thresholds, default=[0.5], help="comma-separated sweep thresholds")
    ev.add_argument("--overlays", type=Path, help="write overlay PNGs here (white TP, red FN, blue FP)")
    ev.add_argument("--out", type=Path, help="write the JSON report here (and the sweep plot beside it)")
    ev.add_argument("--device", default=None, help="torch device (default: cpu)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint folder with remote code "
                    "(config.json auto_map, as Sa2VA ships) to run its own Python")
    ev.set_defaults(func=cmd_eval)

    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base policy",
                           description="Apply a PEFT LoRA adapter to its base policy, merge the weights and save a "
                                       "plain checkpoint that loads with --policy OUT (no peft needed).")
    merge.add_argument("--adapter", type=Path, required=True, help="the PEFT adapter folder (adapter_config.json), "
                       "or the name of a shipped adapter")
    merge.add_argument("--out", type=Path, required=True, help="folder to write the merged policy to")
    merge.add_argument("--policy", default=None, help="base policy (registered name or checkpoint folder); default: "
                       "the adapter's base_model_name_or_path")
    merge.add_argument("--trust-remote-code", action="store_true", help="allow a base checkpoint folder with "
                       "remote code (config.json auto_map) to run its own Python")
    merge.set_defaults(func=cmd_merge)
    return parser


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: unless given after the subcommand, the top-level flag's value stands
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also print what goes to the run folder's logs/ (worker output, Ray Train reports)")


def _config_args(p: argparse.ArgumentParser) -> None:
    _verbose_arg(p)
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--help-config", action="store_true", help="list every config field with its help and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=2000 lr=3e-4")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .console import configure_cli_logging

    configure_cli_logging(args.verbose)
    try:
        return args.func(args)
    except (DataError, ConfigError, MergeError, FileNotFoundError, FileExistsError, RunFolderError, DiskFull,
            NonFiniteError) as exc:
        print(f"rl-seg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a run took its folder: nothing to record
        print(f"rl-seg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.command not in JOB_COMMANDS or args.verbose:
            raise
        return report_job_error(f"rl-seg {args.command}", exc)


#: Commands whose failures happen in Ray actors: their console gets one line, the traceback is in the logs.
JOB_COMMANDS = ("train", "tune")


def report_job_error(prog: str, exc: BaseException) -> int:
    from .console import describe_error, last_log_dir

    where = last_log_dir()
    print(f"{prog}: {describe_error(exc)}" + (f"\n  traceback and the workers' logs: {where}" if where else ""),
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
