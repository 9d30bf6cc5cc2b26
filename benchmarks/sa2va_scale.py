"""Sa2VA-sized PPO through the Ray job on one GPU, next to the same PPO in one process (issue 18).

    python benchmarks/sa2va_scale.py --out DIR [--deadline-s 540] [--started EPOCH] [--tasks 4b,14b,...]
    python benchmarks/sa2va_scale.py --out DIR --dry-run          # CPU, tiny replica, a few iterations

benchmarks/sa2va_scale.sh is the one command for the GPU host. For each task, in order of value, until the deadline:
1. a random-weight checkpoint of the real shape is built on the GPU in bf16 from the replica of the public remote
   code (benchmarks/sa2va_checkpoints.py), in a worker process that then runs
2. the one-process loop: the same TrainConfig, the same policy and PPO code (``ppo_throughput.run_in_process``:
   sampling through the learner's engine as the hybrid ranks do, the reward scored in that process, ``learn``),
   warm-up iterations untimed, FLOPs counted with torch.utils.flop_counter in the first, the peak of
   torch.cuda.max_memory_allocated, the learn time with frozen-tower reuse switched off for comparison, and what
   handing the frozen features over would cost (copy out, serialize, copy back) against computing them;
3. ``rl-seg train`` on the same folder (the Ray job: placement hybrid where the plan says it fits, the CPU reward
   pool, Ray Train + DeepSpeed), joined to one Ray instance this script starts once (token auth, 127.0.0.1), with
   ``learner.count_flops=true``; phase times, peak memory per process and FLOPs come from its metrics.jsonl.
nvidia-smi is sampled every 200 ms throughout; each run's GPU busy is cut to its timed iterations' window. Learn MFU
is the counted learn FLOPs over the timed learn seconds, against the GPU's dense bf16 peak (spec) and against the
bf16 matmul rate measured on the host. Each task also records ``rl-seg plan``'s prediction for its config.

A task that would not finish before the deadline is skipped; one still running at the deadline is stopped, and
what finished stays. Files in --out, rewritten after every step (a call killed from outside keeps what finished):
results.json (every number), results.md (the table), log.txt (this script's progress) and runs.tar.gz (each run's
metrics, logs and the in-process records).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

#: task -> (checkpoint shape, placement); run in this order while time lasts (the 4B row carries the throughput
#: targets, 14B "runs on one H200", the 8B and 14B rows the MFU target, 1B the frozen-tower share; colocated 4B,
#: the placement comparison, and 26B only if a call has time left after the four rows the issue asks for)
TASKS = {"4b": ("4b", "hybrid"), "14b": ("14b", "hybrid"), "internvl3-8b": ("internvl3-8b", "hybrid"),
         "1b": ("1b", "hybrid"), "8b": ("8b", "hybrid"), "4b-colocated": ("4b", "colocated"),
         "26b": ("26b", "hybrid")}
DEFAULT_TASKS = "4b,14b,internvl3-8b,1b,8b,4b-colocated,26b"
#: dense bf16 peak per GPU (vendor spec sheets, SXM parts), for MFU against the spec
SPEC_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "B200": 2250e12}
#: rough seconds a task needs at this many billion parameters, refined from what earlier tasks took
PRIOR_S = {"fixed": 110.0, "per_b": 8.0}
MARGIN_S = 25.0  # left at the end for stopping Ray and writing the results


class Clock:
    def __init__(self, started: float, budget_s: float):
        self.deadline = started + budget_s - MARGIN_S
        self.started = started

    def left(self) -> float:
        return self.deadline - time.time()

    def elapsed(self) -> float:
        return time.time() - self.started


class Log:
    def __init__(self, path: Path, clock: Clock):
        self.file = path.open("a")
        self.clock = clock

    def __call__(self, msg: str) -> None:
        line = f"[{self.clock.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


# --- the TrainConfig both paths share ---------------------------------------------------------------------------

def train_overrides(task: str, ckpt: Path, run_dir: Path, placement: str, dry: bool, iterations: int,
                    ray_address: str | None) -> list[str]:
    gpu = not dry
    out = [f"name={task}", f"run_dir={run_dir}", f"policy.name={ckpt}", "policy.trust_remote_code=true",
           f"policy.dtype={'bfloat16' if gpu else 'float32'}",
           "policy.lora={r: 16, alpha: 32, dropout: 0.0, targets: llm}",  # the issue's measurements: LLM attention
           f"placement={placement}", f"iterations={iterations}", "seed=0",
           "data.datasets=[drive-sample,arcade-sample]", "data.image_size=null",
           f"data.images_per_iteration={8 if gpu else 2}", "data.val_limit=1", "val_every=0",
           "checkpoint_every=1000000", f"rollout.samples_per_image={8 if gpu else 2}", "rollout.num_workers=1",
           "rollout.num_cpus=1", f"rollout.num_gpus={0.5 if placement == 'colocated' and gpu else 0}",
           f"reward.num_actors={8 if gpu else 1}", f"reward.num_cpus={1 if gpu else 0.25}",
           "learner.num_workers=1", f"learner.use_gpu={'true' if gpu else 'false'}",
           f"learner.gpus_per_worker={0.5 if placement == 'colocated' else 1}",
           f"learner.cpus_per_worker={2 if gpu else 0.5}",
           f"learner.micro_batch_images={8 if gpu else 2}", "learner.count_flops=true", "ppo.epochs=2", "ppo.lr=1e-4",
           "ppo.warmup_steps=1", f"threads_per_worker={2 if gpu else 1}", "progress=true"]
    if ray_address:
        out.append(f"ray_address={ray_address}")
    return out


def load_cfg(overrides: list[str]):
    from rl_seg.config import load_config
    from rl_seg.ppo.config import TrainConfig

    return load_config(TrainConfig, None, overrides)


# --- worker: build the checkpoint, then the one-process loop ----------------------------------------------------

def worker(args) -> int:
    """Runs in its own process: the checkpoint (skipped when the folder exists) and the in-process loop."""
    from sa2va_replica.stubs import use_test_stubs

    use_test_stubs()
    import torch

    import ppo_throughput as pt
    from sa2va_checkpoints import build

    result: dict = {"task": args.task}
    out = Path(args.result)
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.dry_run else torch.device("cpu")
    if device.type == "cuda":
        result["device_rates"] = pt.measure_device(device)
        result["gpu_name"] = torch.cuda.get_device_name(device)
    if not (Path(args.ckpt) / "config.json").is_file():
        result["build"] = build(args.shape, Path(args.ckpt), device="cuda" if device.type == "cuda" else "cpu",
                                dtype="bfloat16" if device.type == "cuda" else None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(result, default=float) + "\n")
    if args.skip_inprocess:
        return 0
    cfg = load_cfg(json.loads(args.overrides))
    sampler = pt.GpuSampler(device.type == "cuda")
    try:
        res = pt.run_in_process(cfg, warmup=args.warmup, device=device, sampler=sampler, count_costs=False,
                                compare_reuse=args.compare_reuse, probe=frozen_handover,
                                count_flops=True)
    finally:
        sampler.stop()
    counted = res.records[0]
    result["inprocess"] = {**res.summary, "flops_rollout": counted.get("flops/rollout"),
                           "flops_learn": counted.get("flops/learn"), "records": res.records}
    result["frozen_handover"] = res.probe
    out.write_text(json.dumps(result, default=float) + "\n")
    return 0


def frozen_handover(policy, image, device) -> dict:
    """Per image: computing the frozen towers (``encode_frozen``) against handing their outputs over as a rollout
    actor would have to (to host memory, serialized, back to the device): which is cheaper on this machine."""
    import pickle

    import torch

    from rl_seg.policy.base import autocast_for

    inputs = policy.preprocess([image])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn, reps=3):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            out = fn()
        sync()
        return (time.perf_counter() - t) / reps, out

    with autocast_for(device):
        encode_s, frozen = timed(lambda: policy.encode_frozen(inputs))
    if frozen is None:
        return {"frozen_towers": []}

    def ship():
        blob = pickle.dumps(frozen.to("cpu"), protocol=5)
        return pickle.loads(blob).to(device)

    ship_s, _ = timed(ship)
    return {"frozen_towers": list(frozen.image_tokens is not None and ["vision"] or []) +
            (["grounding"] if frozen.grounding is not None else []),
            "bytes_per_image": frozen.nbytes(), "encode_s_per_image": encode_s, "handover_s_per_image": ship_s,
            "cheaper": "compute on the learner" if encode_s <= ship_s else "ship from the rollout"}


# --- the orchestrator ---------------------------------------------------------------------------------------------

#: the process groups started and not yet waited for: stopped when this script is (their own sessions would
#: otherwise outlive it, holding the GPU)
RUNNING: set[subprocess.Popen] = set()


def start_group(cmd: list[str], log_path: Path, env=None) -> tuple[subprocess.Popen, float]:
    """A command in a process group of its own, output to ``log_path``."""
    with log_path.open("ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
    RUNNING.add(proc)
    return proc, time.time()


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except ProcessLookupError:
        pass
    RUNNING.discard(proc)


def wait_group(started: tuple[subprocess.Popen, float], timeout: float) -> tuple[int | None, float]:
    """Its exit code, or None when the whole group had to be stopped at ``timeout``; and its seconds."""
    proc, start = started
    try:
        code = proc.wait(timeout=max(1.0, timeout))
        RUNNING.discard(proc)
        return code, time.time() - start
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return None, time.time() - start


def job_summary(run_path: Path, warmup: int, k: int, sampler) -> dict:
    """The Ray job's timed iterations from its metrics.jsonl (the first ``warmup`` are not timed)."""
    import numpy as np

    path = run_path / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    out = {"iterations_logged": len(rows)}
    if not rows:
        return out
    counted = rows[0]
    out.update({"flops_learn": counted.get("flops/learn"), "flops_rollout": counted.get("flops/rollout")})
    timed = rows[warmup:]
    if not timed:
        return out
    t0 = rows[warmup - 1]["time"] if warmup else rows[0]["time"] - rows[0]["time/iteration"]
    t1 = timed[-1]["time"]
    images = sum(len(r["batch_ids"]) for r in timed)

    def mean(key):
        vals = [r[key] for r in timed if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    out.update({
        "iterations_timed": len(timed), "seconds": t1 - t0, "images_per_s": images / (t1 - t0),
        "masks_per_s": images * k / (t1 - t0),
        "phases_s": {p: mean(f"time/{p}") for p in ("rollout", "reward", "learn", "sync", "export", "iteration")},
        "learner_peak_gib": max((r.get("memory/learner_peak_gib") or 0) for r in rows) or None,
        "rollout_peak_gib": max((r.get("memory/rollout_peak_gib") or 0) for r in rows) or None,
        "reward": [r["reward"] for r in rows], "kl_ref": [r.get("kl_ref") for r in rows],
    })
    per_iter = (t1 - t0) / len(timed)
    out["reward_share"] = (out["phases_s"]["reward"] or 0) / per_iter
    out["between_iterations_s"] = per_iter - (out["phases_s"]["iteration"] or 0)
    if sampler is not None and sampler.active:
        out["nvidia_smi"] = sampler.window(t0, t1)
    return out


def mfu(flops, seconds, peak) -> float | None:
    if not flops or not seconds or not peak:
        return None
    return flops / seconds / peak


def plan_for(cfg, gpu_name: str | None, gpu_gib: float | None) -> dict:
    """``rl-seg plan``'s prediction for this config on this GPU (the dry run's CPU config as if on a GPU)."""
    from rl_seg.config import from_dict, to_dict
    from rl_seg.plan import GpuSpec, plan_train_config
    from rl_seg.ppo.config import TrainConfig

    tree = to_dict(cfg)
    tree["learner"]["use_gpu"] = True
    try:
        plan = plan_train_config(from_dict(TrainConfig, tree), GpuSpec(1, gpu_name or "GPU", gpu_gib or 80.0))
        return {k: plan.get(k) for k in ("fits", "processes", "per_gpu", "problems", "max_micro_batch", "lines")}
    except Exception as exc:  # noqa: BLE001 - the plan is a side measurement; its failure is recorded
        return {"error": f"{type(exc).__name__}: {exc}"}


def start_ray(num_cpus: int, num_gpus: int) -> dict:
    """One local Ray instance for every job of this script (token auth, loopback). From the main thread only: Ray's
    processes die with the thread that started them (they are bound to it as their parent)."""
    try:
        from rl_seg.ray_env import init_ray

        t = time.time()
        ctx = init_ray(num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=False)
        return {"address": ctx.gcs_address, "seconds": time.time() - t}
    except Exception as exc:  # noqa: BLE001 - reported by the orchestrator, which then skips the jobs
        return {"error": f"{type(exc).__name__}: {exc}"}


def save(results: dict, out: Path, work: Path, elapsed: float) -> None:
    """results.json, results.md and runs.tar.gz as they stand (each written to a temporary name, then renamed: a
    kill in the middle leaves the previous complete file)."""
    results["seconds"] = elapsed

    def write(name: str, fill) -> None:
        tmp = out / f".{name}.tmp"
        fill(tmp)
        os.replace(tmp, out / name)

    write("results.json", lambda p: p.write_text(json.dumps(results, indent=1, default=float) + "\n"))
    write("results.md", lambda p: p.write_text(markdown(results)))

    def tar(path: Path) -> None:
        with tarfile.open(path, "w:gz") as t:
            for f in sorted((work / "logs").glob("*.log")) + sorted(work.glob("*.json")):
                t.add(f, arcname=f"{f.parent.name}/{f.name}" if f.parent != work else f.name)
            for metrics in sorted((work / "runs").glob("*/metrics.jsonl")):
                t.add(metrics, arcname=f"runs/{metrics.parent.name}/metrics.jsonl")

    write("runs.tar.gz", tar)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # through orchestrate's finally: Ray stopped, the results written


def orchestrate(args) -> int:
    from sa2va_replica.stubs import use_test_stubs

    started = args.started or time.time()
    clock = Clock(started, args.deadline_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    log = Log(out / "log.txt", clock)
    signal.signal(signal.SIGTERM, _terminate)
    stubbed = use_test_stubs()  # before Ray starts: its workers inherit PYTHONPATH
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p and p != str(REPO)]])
    dry = args.dry_run
    gpu = not dry and shutil.which("nvidia-smi") is not None
    import ppo_throughput as pt

    gpu_name, gpu_gib = None, None
    if gpu:
        info = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=name,memory.total,compute_cap",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout.strip()
        parts = [p.strip() for p in info.split(",")]
        gpu_name, gpu_gib = parts[0], float(parts[1]) / 1024
    log(f"sa2va_scale: {'dry run (CPU, tiny replica)' if dry else gpu_name}; deadline in {clock.left():.0f} s; "
        f"test stubs for {stubbed or 'nothing'}; tasks {args.tasks}")
    sampler = pt.GpuSampler(gpu)
    ray_box: dict = {}
    iterations = args.warmup + args.timed
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
    results: dict = {"gpu": gpu_name, "gpu_gib": gpu_gib, "dry_run": dry, "warmup": args.warmup, "timed": args.timed,
                     "tasks": {}, "stubbed": stubbed}
    spent_per_b: list[float] = []
    try:
        for n, task in enumerate(tasks):
            shape, placement = TASKS[task]
            if dry:
                shape = "tiny"
            ckpt = work / "ckpt" / shape
            params_b = {"1b": 1.2, "4b": 3.6, "internvl3-8b": 8.2, "14b": 15.4, "8b": 8.1, "26b": 25.8}.get(shape, 0.1)
            expect = PRIOR_S["fixed"] + (max(spent_per_b) if spent_per_b else PRIOR_S["per_b"]) * params_b
            if placement != "hybrid":
                expect *= 0.6  # no build, no in-process loop
            if clock.left() < expect:
                log(f"{task}: skipped, {clock.left():.0f} s left and ~{expect:.0f} s needed")
                results["tasks"][task] = {"skipped": f"{clock.left():.0f} s left, ~{expect:.0f} s needed"}
                save(results, out, work, clock.elapsed())
                continue
            t_task = time.time()
            entry = results["tasks"].setdefault(task, {"shape": shape, "placement": placement})
            overrides = train_overrides(task, ckpt, work / "runs", placement, dry, iterations, None)
            result_file = work / f"{task}.json"
            cmd = [sys.executable, str(Path(__file__)), "worker", "--task", task, "--shape", shape,
                   "--ckpt", str(ckpt), "--result", str(result_file), "--overrides", json.dumps(overrides),
                   "--warmup", str(args.warmup),
                   # learn without frozen-tower reuse, for comparison: in the first task only (device time)
                   "--compare-reuse", str(0 if n else 1 if dry else 2)] + (["--dry-run"] if dry else []) + (
                       ["--skip-inprocess"] if placement != "hybrid" else [])
            log(f"{task}: checkpoint {'ready' if (ckpt / 'config.json').is_file() else 'build'} + one-process loop")
            proc = start_group(cmd, work / "logs" / f"{task}.worker.log")
            if not ray_box:  # Ray starts (on CPUs) while the first worker builds on the GPU
                ray_box = start_ray(os.cpu_count() or 2, 1 if gpu else 0)
                results["ray_start_s"] = ray_box.get("seconds")
                log(f"Ray: {ray_box}")
            code, secs = wait_group(proc, clock.left())
            if result_file.is_file():
                entry.update(json.loads(result_file.read_text()))
            entry["worker_s"], entry["worker_exit"] = secs, code
            save(results, out, work, clock.elapsed())
            if code != 0:
                log(f"{task}: worker {'stopped at the deadline' if code is None else f'failed (exit {code})'}; "
                    f"log {task}.worker.log")
                if code is None or not (ckpt / "config.json").is_file():
                    break
            else:
                ip = entry.get("inprocess") or {}
                log(f"{task}: built in {entry.get('build', {}).get('seconds', 0):.0f} s; one process "
                    f"{ip.get('masks_per_s', 0) / (8 if not dry else 2):.2f} images/s" if ip else f"{task}: ready")
            gpu_name = gpu_name or entry.get("gpu_name")
            if "address" not in ray_box:
                log(f"Ray did not start: {ray_box.get('error')}")
                break
            overrides = train_overrides(task, ckpt, work / "runs", placement, dry, iterations, ray_box["address"])
            cfg = load_cfg(overrides)
            entry["plan"] = plan_for(cfg, gpu_name, gpu_gib)
            log(f"{task}: rl-seg train (placement {placement})")
            code, secs = wait_group(start_group([sys.executable, "-m", "rl_seg.cli", "train", *overrides],
                                                work / "logs" / f"{task}.train.log"), clock.left())
            entry["job_s"], entry["job_exit"] = secs, code
            entry["job"] = job_summary(cfg.run_path, args.warmup, cfg.rollout.samples_per_image, sampler)
            job = entry["job"]
            peak = SPEC_BF16_FLOPS.get(next((k for k in SPEC_BF16_FLOPS if k in (gpu_name or "")), ""), None)
            measured = (entry.get("device_rates") or {}).get("matmul_flops_per_s")
            for side, d in (("job", job), ("inprocess", entry.get("inprocess") or {})):
                learn_s = (d.get("phases_s") or {}).get("learn")
                d["learn_mfu_spec"] = mfu(d.get("flops_learn"), learn_s, peak)
                d["learn_mfu_measured_peak"] = mfu(d.get("flops_learn"), learn_s, measured)
            ip = entry.get("inprocess") or {}
            if job.get("images_per_s") and ip.get("masks_per_s"):
                entry["job_over_inprocess"] = job["masks_per_s"] / ip["masks_per_s"]
            log(f"{task}: job {'stopped at the deadline' if code is None else f'exit {code}'} after {secs:.0f} s; "
                f"{job.get('images_per_s') or 0:.2f} images/s over {job.get('iterations_timed', 0)} timed iterations"
                f", learner peak {job.get('learner_peak_gib')} GiB, learn MFU {job.get('learn_mfu_spec')}")
            save(results, out, work, clock.elapsed())
            if code is None:
                break
            spent = time.time() - t_task
            if placement == "hybrid" and params_b:
                spent_per_b.append(max(0.0, spent - PRIOR_S["fixed"]) / params_b)
            if shape not in {TASKS[t][0] for t in tasks[n + 1:]}:
                shutil.rmtree(ckpt, ignore_errors=True)  # the disk holds one or two real-shape folders at a time
    finally:
        for proc in list(RUNNING):
            stop_group(proc)
        sampler.stop()
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort at the deadline
            pass
        save(results, out, work, clock.elapsed())
        log(f"done: {out / 'results.md'}")
    return 0


def _f(v, spec=".2f", scale=1.0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v * scale, spec)


def markdown(results: dict) -> str:
    head = (f"# Sa2VA scale on one {results.get('gpu') or 'CPU (dry run)'}\n\nK=8 masks per image, 8 images per "
            f"iteration in one micro-batch (one forward for all of them, sizes mixed), 2 PPO epochs, actions at image "
            f"resolution, LoRA r16 on the language model's attention, "
            f"bf16; {results['warmup']} warm-up + {results['timed']} timed iterations. Job = `rl-seg train` (Ray); "
            "one process = the same config and code without Ray. MFU: counted learn FLOPs / learn seconds / dense "
            "bf16 peak (spec; in brackets: the measured bf16 matmul rate).\n\n")
    rows = ["| task | params | placement | job images/s | job masks/s | one-process images/s | job / one process | "
            "learn MFU job (meas.) | learn MFU one process | GPU busy job | peak GiB job learner (plan) | "
            "peak GiB one process | rollout / reward / learn s | sync ms | reward share | learn s w/o reuse |",
            "|" + "---|" * 16]
    for task, e in results["tasks"].items():
        if "skipped" in e:
            rows.append(f"| {task} | | | skipped: {e['skipped']} |" + " |" * 12)
            continue
        job, ip = e.get("job") or {}, e.get("inprocess") or {}
        k = 8 if not results.get("dry_run") else 2
        plan_gib = next((p["gib"] for p in (e.get("plan") or {}).get("processes") or [] if p["name"].startswith(
            "learner")), None)
        phases = job.get("phases_s") or {}
        params = (e.get("build") or {}).get("parameters")
        rows.append(
            f"| {task} | {_f(params, '.2f', 1e-9)}B | {e.get('placement')} | {_f(job.get('images_per_s'))} | "
            f"{_f(job.get('masks_per_s'), '.1f')} | {_f((ip.get('masks_per_s') or 0) / k or None)} | "
            f"{_f(e.get('job_over_inprocess'))} | {_f(job.get('learn_mfu_spec'), '.0%')} "
            f"({_f(job.get('learn_mfu_measured_peak'), '.0%')}) | {_f(ip.get('learn_mfu_spec'), '.0%')} | "
            f"{_f((job.get('nvidia_smi') or {}).get('gpu_busy'), '.0%')} | {_f(job.get('learner_peak_gib'), '.1f')} "
            f"({_f(plan_gib, '.1f')}) | {_f((ip.get('peak_memory_allocated_mib') or 0) / 1024 or None, '.1f')} | "
            f"{_f(phases.get('rollout'))} / {_f(phases.get('reward'))} / {_f(phases.get('learn'))} | "
            f"{_f(((phases.get('sync') or 0) + (phases.get('export') or 0)) * 1000, '.1f')} | "
            f"{_f(job.get('reward_share'), '.1%')} | {_f(ip.get('learn_s_without_reuse'))} vs "
            f"{_f((ip.get('phases_s') or {}).get('learn'))} |")
    handover = {t: e["frozen_handover"] for t, e in results["tasks"].items() if e.get("frozen_handover")}
    tail = ["", "Frozen towers, per image: computed on the learner vs handed over (to host, serialized, back):"]
    tail += [f"- {t}: encode {_f(h.get('encode_s_per_image'), '.4f')} s vs hand over "
             f"{_f(h.get('handover_s_per_image'), '.4f')} s for {_f(h.get('bytes_per_image'), '.1f', 2 ** -20)} MiB: "
             f"{h.get('cheaper')}" for t, h in handover.items()]
    return head + "\n".join(rows) + "\n" + "\n".join(tail) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode")
    w = sub.add_parser("worker", help="(internal) build a checkpoint and run the one-process loop")
    w.add_argument("--task", required=True)
    w.add_argument("--shape", required=True)
    w.add_argument("--ckpt", required=True)
    w.add_argument("--result", required=True)
    w.add_argument("--overrides", required=True)
    w.add_argument("--warmup", type=int, default=1)
    w.add_argument("--dry-run", action="store_true")
    w.add_argument("--skip-inprocess", action="store_true")
    w.add_argument("--compare-reuse", type=int, default=0, help="iterations with frozen-tower reuse off")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--work", default="/tmp/sa2va_scale")
    p.add_argument("--deadline-s", type=float, default=540.0, help="the whole call's budget, from --started")
    p.add_argument("--started", type=float, default=None, help="epoch seconds the call started (default: now)")
    p.add_argument("--tasks", default=None, help=f"comma-separated, in order (default {DEFAULT_TASKS}; dry run: 4b)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timed", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="CPU, the tiny replica, 1 + 2 iterations")
    a = p.parse_args(argv)
    if a.mode == "worker":
        return worker(a)
    if a.dry_run:
        a.tasks = a.tasks or "4b"
        a.timed = min(a.timed, 2)
    a.tasks = a.tasks or DEFAULT_TASKS
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
