"""Offline checks of rl-seg's cluster definitions: nothing is started, no cloud or Kubernetes API is called.

    python cluster/validate.py [FILE ...]     one line per file (all definitions under cluster/ by default);
                                              exit status 1 when any file fails

What is checked, and why:

- Ray cluster-launcher YAML (cluster/launcher/): Ray's own pipeline that `ray up` runs before it touches a cloud,
  i.e. ``prepare_config`` (merge with the provider's defaults) and ``validate_config`` (Ray's JSON schema,
  ray/autoscaler/ray-schema.json, plus its cross-field rules); then rl-seg's rules: token authentication on
  every `ray start` line, the token shipped by a file mount (from outside the repository), the dashboard on
  127.0.0.1, the project installed with the pinned constraints, the container's Ray equal to the pin, the node
  types' GPU counts equal to their machine types', and the train config that the file names (``metadata``).
- KubeRay manifests (cluster/kuberay/): a minimal JSON schema of the fields used (written here: no KubeRay CRD
  ships with this project), then the same rules in Kubernetes terms: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from
  one Secret on every Ray container, the dashboard kept inside the pod network, integer GPU limits, replica
  bounds, rayVersion and image tags equal to the pin, and the train config (annotation, or the RayJob's
  entrypoint).
- The train config a cluster names must load as a TrainConfig, its paths must lie on a volume that every node
  mounts (the driver on the head and learner rank 0 on a GPU node both write the run folder), and its GPU demand
  must actually schedule: the total (rollout.num_workers x rollout.num_gpus + learner.num_workers x
  learner.gpus_per_worker) must fit, and so must the order in which Ray places it. Ray assigns a fractional GPU
  request to the device that it fits most tightly (best fit), rollout actors are created before the learner
  group's placement group, so a demand that fits in total can still leave the learners waiting forever (4 x 0.25
  rollouts all land on GPU 0, then only 3 of 4 learner bundles of 0.75 fit). ``place_gpu_demand`` replays that.
- cluster/Dockerfile: its base image's Ray version equals the pin.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python cluster/validate.py` puts cluster/ on the path, not the repository
    sys.path.insert(0, str(REPO))

__all__ = ["Report", "validate_launcher", "validate_kuberay", "validate_dockerfile", "validate_file",
           "validate_all", "place_gpu_demand", "ray_pin", "KUBERAY_SCHEMA", "main"]

TOKEN_SECRET_KEY = "auth_token"
# GPUs per machine type, for the types a definition here may name; an unknown type is reported, not guessed.
MACHINE_GPUS = {
    # GCP A2: "ultragpu" = A100 80GB, "highgpu"/"megagpu" = A100 40GB; A3 = H100 80GB.
    "a2-ultragpu-1g": 1, "a2-ultragpu-2g": 2, "a2-ultragpu-4g": 4, "a2-ultragpu-8g": 8,
    "a2-highgpu-1g": 1, "a2-highgpu-2g": 2, "a2-highgpu-4g": 4, "a2-highgpu-8g": 8, "a2-megagpu-16g": 16,
    "a3-highgpu-8g": 8,
    # AWS: p4d = 8 x A100 40GB, p4de = 8 x A100 80GB, p5 = 8 x H100.
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8,
}
ANNOTATION_TRAIN_CONFIG = "rl-seg.io/train-config"
ANNOTATION_MAX_COPIES = "rl-seg.io/max-policy-copies-per-gpu"


@dataclass
class Report:
    path: str
    kind: str
    problems: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            return f"OK    {self.path}: {self.kind}; {self.summary}"
        return f"FAIL  {self.path}: {self.kind}; " + " | ".join(self.problems)


# ---------------------------------------------------------------------------------------------------------------
# shared pieces

def ray_pin(repo: Path = REPO) -> str:
    """The Ray version pinned in constraints.txt (the version every image and manifest must carry)."""
    for line in (Path(repo) / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"\s*ray==([0-9][0-9A-Za-z.+-]*)\s*(#.*)?", line)
        if m:
            return m.group(1)
    raise ValueError(f"{repo}/constraints.txt pins no ray version")


def image_tag(image: str) -> str | None:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def _tag_carries(tag: str | None, version: str) -> bool:
    # rayproject/ray tags read <version>[-pyXY][-gpu|-cpu|-cuXYZ]; rl-seg's image repeats its base image's tag.
    return tag is not None and (tag == version or tag.startswith(version + "-"))


def _under(path: str, roots: set[str]) -> bool:
    p = Path(path)
    return any(p == Path(r) or Path(r) in p.parents for r in roots)


def _quantity(value) -> float:
    """A Kubernetes CPU quantity ("14", "500m", 2) in cores."""
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def place_gpu_demand(node_gpus: list[int], cfg) -> tuple[bool, str, list[list[int]]]:
    """Replay how Ray places the job's GPU requests: rollout actors first (train.py creates them before the
    learner group), then one placement-group bundle per learner worker.

    Ray's rules, as implemented in its raylet (NodeResourceInstanceSet::TryAllocate): a request below one GPU must
    fit in a single device and goes to the device that it leaves with the least room (best fit); a request of one
    or more must be a whole number of entirely free devices. Nodes are tried in order (the clusters here have
    one GPU node; on several, Ray may pick another node, so this is the common case, not a proof).

    Returns (ok, message, copies) where copies[n][g] counts the processes (each holding a policy copy) on GPU g
    of node n.
    """
    free = [[1.0] * n for n in node_gpus]
    copies = [[0] * n for n in node_gpus]
    demands = [("rollout actor", cfg.rollout.num_gpus)] * cfg.rollout.num_workers
    if cfg.learner.use_gpu:
        demands += [("learner worker", cfg.learner.gpus_per_worker)] * cfg.learner.num_workers
    eps = 1e-9
    for i, (who, gpus) in enumerate(demands):
        if gpus <= 0:
            continue
        if gpus > 1 and abs(gpus - round(gpus)) > eps:
            return False, f"{who} asks for {gpus} GPUs: Ray needs a whole number above 1", copies
        placed = False
        for n, devices in enumerate(free):
            if gpus < 1:
                fits = [g for g, room in enumerate(devices) if room + eps >= gpus]
                if fits:
                    g = min(fits, key=lambda d: devices[d] - gpus)
                    devices[g] -= gpus
                    copies[n][g] += 1
                    placed = True
            else:
                whole = [g for g, room in enumerate(devices) if room > 1 - eps][: int(round(gpus))]
                if len(whole) == int(round(gpus)):
                    for g in whole:
                        devices[g] = 0.0
                        copies[n][g] += 1
                    placed = True
            if placed:
                break
        if not placed:
            number = i + 1 - (cfg.rollout.num_workers if who.startswith("learner") else 0)
            left = [[round(x, 3) for x in d] for d in free]
            return False, (f"{who} #{number} ({gpus:g} GPU) cannot be placed after {i} earlier request(s): GPU "
                           f"left per device {left} (Ray packs fractions best-fit; the job would wait forever)"), copies
    return True, "placed", copies


def check_train_config(ref: str, overrides: list[str], *, repo: Path, node_gpus: list[int], total_cpus: float,
                       shared_roots: set[str], env: dict[str, str], max_copies: int | None,
                       problems: list[str]) -> str:
    """Load the named train config and check it against the cluster; returns a summary for the report line."""
    from rl_seg.config import ConfigError, load_config
    from rl_seg.ppo.config import TrainConfig

    path = (Path(repo) / ref) if not Path(ref).is_absolute() else Path(ref)
    if not path.is_file():
        problems.append(f"train config {ref} does not exist in the repository")
        return ""
    try:
        cfg = load_config(TrainConfig, path, overrides)
    except ConfigError as exc:
        problems.append(f"train config {ref} does not load as a TrainConfig: {exc}")
        return ""
    demand = cfg.rollout.num_workers * cfg.rollout.num_gpus
    if cfg.learner.use_gpu:
        demand += cfg.learner.num_workers * cfg.learner.gpus_per_worker
    total = sum(node_gpus)
    placed = False
    if demand > total + 1e-9:
        problems.append(f"{ref} demands {demand:g} GPUs (rollout {cfg.rollout.num_workers} x "
                        f"{cfg.rollout.num_gpus:g} + learner {cfg.learner.num_workers} x "
                        f"{cfg.learner.gpus_per_worker:g}), the cluster has {total}")
    else:
        placed, message, copies = place_gpu_demand(node_gpus, cfg)
        if not placed:
            problems.append(f"{ref}: {message}")
        elif max_copies is not None:
            crowded = [(n, g, c) for n, node in enumerate(copies) for g, c in enumerate(node) if c > max_copies]
            if crowded:
                placed = False
                problems.append(f"{ref} puts {crowded[0][2]} policy copies on one GPU (node {crowded[0][0]}, GPU "
                                f"{crowded[0][1]}); this cluster declares at most {max_copies} per GPU")
    cpus = (cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.reward.num_actors * cfg.reward.num_cpus
            + cfg.learner.num_workers * cfg.learner.cpus_per_worker)
    if cpus > total_cpus + 1e-9:
        problems.append(f"{ref} reserves {cpus:g} CPUs, the cluster has {total_cpus:g}")
    # Shared storage: paths written or read by processes on different nodes.
    if not Path(cfg.run_dir).is_absolute() or not _under(str(cfg.run_dir), shared_roots):
        problems.append(f"{ref}: run_dir {cfg.run_dir} is not on a volume every node mounts ({sorted(shared_roots)})")
    if Path(cfg.policy.name).is_absolute() and not _under(cfg.policy.name, shared_roots):
        problems.append(f"{ref}: policy.name {cfg.policy.name} is not on a volume every node mounts")
    data_dir = env.get("RL_SEG_DATA_DIR")
    if data_dir is not None and not _under(data_dir, shared_roots):
        problems.append(f"RL_SEG_DATA_DIR={data_dir} is not on a volume every node mounts")
    return f"{ref} demands {demand:g}/{total} GPU" + (", placed" if placed else "")


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher

_RAY_START = re.compile(r"\bray\s+start\b")
_ASSIGNMENTS = r"(?:\w+=\S*\s+)*"
# Token mode reaches `ray start` as an assignment prefixing that command (`RAY_AUTH_MODE=token ray start`, also
# after `env`), or exported earlier in the same shell. A bare `RAY_AUTH_MODE=token;` would stay unexported.
_TOKEN_PREFIX = re.compile(r"(?:^|[\s;&|(])(?:env\s+)?" + _ASSIGNMENTS
                           + r"RAY_AUTH_MODE=(['\"]?)token\1\s+" + _ASSIGNMENTS + r"ray\s+start\b")
_TOKEN_EXPORT = re.compile(r"\bexport\s+" + _ASSIGNMENTS + r"RAY_AUTH_MODE=(['\"]?)token\1(?=[\s;]|$)")


def _ray_validated(config: dict, problems: list[str]) -> dict | None:
    """Ray's own steps of `ray up` before any cloud call: merge with the provider's defaults, then validate."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is imported; rl-seg never runs without it
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # "setting max workers ..." per file
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        problems.append(f"Ray's cluster-launcher validation is unavailable: {exc}")
        return None
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as exc:  # jsonschema.ValidationError, ValueError, RuntimeError, KeyError: all mean invalid
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.append(f"Ray's validation rejects it: {type(exc).__name__}: {first}")
        return None
    return prepared


def _docker_mounts_and_env(options: list[str]) -> tuple[set[str], dict[str, str]]:
    mounts, env = set(), {}
    for option in options:
        parts = shlex.split(str(option))
        for i, part in enumerate(parts):
            value = None
            if part in ("-v", "--volume", "-e", "--env") and i + 1 < len(parts):
                value = parts[i + 1]
            elif part.startswith(("--volume=", "--env=")):
                value = part.split("=", 1)[1]
            if value is None:
                continue
            if part.startswith(("-v", "--volume")):
                host, _, rest = value.partition(":")
                container = rest.split(":", 1)[0]
                if host == container:  # the same path on the host (shared mount) and in the container
                    mounts.add(container)
            else:
                key, _, val = value.partition("=")
                env[key] = val
    return mounts, env


def validate_launcher(config: dict, *, repo: Path = REPO) -> Report:
    """Check a Ray cluster-launcher config (a mapping as loaded from YAML)."""
    report = Report(path="", kind=f"launcher ({(config.get('provider') or {}).get('type', '?')})")
    problems = report.problems
    prepared = _ray_validated(config, problems)
    if prepared is None:
        return report
    pin = ray_pin(repo)
    text = yaml.safe_dump(config)

    # Token authentication: on every `ray start`, in that very command (each command is its own SSH shell).
    starts = {"head": prepared.get("head_start_ray_commands") or [],
              "worker": prepared.get("worker_start_ray_commands") or []}
    for role, commands in starts.items():
        lines = [c for c in commands if _RAY_START.search(c)]
        if not lines:
            problems.append(f"{role}_start_ray_commands has no `ray start`")
        for command in lines:
            before = command[: _RAY_START.search(command).start()]
            if not (_TOKEN_PREFIX.search(command) or _TOKEN_EXPORT.search(before)):
                problems.append(f"a {role} `ray start` runs without RAY_AUTH_MODE=token in its own command")
    if not any("--head" in c for c in starts["head"] if _RAY_START.search(c)):
        problems.append("head_start_ray_commands never runs `ray start --head`")
    if re.search(r"RAY_AUTH_MODE=(['\"]?)(?!token\b)\w+", text):
        problems.append("RAY_AUTH_MODE is set to something other than token")
    if re.search(r"RAY_AUTH_TOKEN=(?!\$)\S", text):
        problems.append("a literal RAY_AUTH_TOKEN value is written in the cluster YAML (ship it as a file mount)")
    # The token reaches the nodes as a file mount, from outside the repository (never committed).
    mounts = prepared.get("file_mounts") or {}
    token_mounts = {r: l for r, l in mounts.items() if str(r).rstrip("/").endswith(".ray/auth_token")}
    if not token_mounts:
        problems.append("no file mount delivers ~/.ray/auth_token (Ray's token file) to the nodes")
    for local in token_mounts.values():
        local_path = Path(os.path.expanduser(str(local)))
        local_path = local_path if local_path.is_absolute() else (Path(repo) / local_path)
        if Path(repo).resolve() in local_path.resolve().parents:
            problems.append(f"the token file mount reads {local} inside the repository: keep the token out of it")

    # Dashboard: loopback only; users come in through `ray dashboard` (SSH port-forward).
    for command in starts["head"]:
        if not _RAY_START.search(command):
            continue
        hosts = re.findall(r"--dashboard-host[=\s]+(\S+)", command)
        if hosts != ["127.0.0.1"]:
            problems.append(f"the head's `ray start` must pass --dashboard-host=127.0.0.1 (has {hosts or 'none'})")

    # The project, mounted and installed with the pinned set.
    project_mounts = [r for r, l in mounts.items()
                      if (Path(repo) / os.path.expanduser(str(l))).resolve() == Path(repo).resolve()]
    if not project_mounts:
        problems.append("no file mount carries the project (local path: the repository root, `ray up` run there)")
    setup = prepared.get("setup_commands") or []
    if not any(re.search(r"pip install\b.*(?:-c|--constraint)[=\s]+\S*constraints\.txt", c)
               and re.search(r"(?:-e|--editable)[=\s]+\.(?:\s|$)", c) for c in setup):
        problems.append("setup_commands never runs `pip install -c constraints.txt -e .`")

    # Ray version: the container's tag, or the constraints (which pin ray) when there is no container.
    docker = prepared.get("docker") or {}
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for node_type in prepared["available_node_types"].values():
        images += [v for k, v in (node_type.get("docker") or {}).items() if k == "worker_image" and v]
    for image in images:
        if not _tag_carries(image_tag(image), pin):
            problems.append(f"image {image} does not carry Ray {pin} (constraints.txt) in its tag")

    # GPUs per node type, and the cluster the train config will see.
    node_gpus, total_cpus, gpu_summary = [], 0.0, []
    head = prepared["head_node_type"]
    for name, node_type in prepared["available_node_types"].items():
        resources = node_type.get("resources") or {}
        node_config = node_type.get("node_config") or {}
        machine = node_config.get("machineType") or node_config.get("InstanceType")
        declared = resources.get("GPU", 0)
        accelerators = sum(int(a.get("acceleratorCount", 0)) for a in node_config.get("guestAccelerators") or [])
        expected = MACHINE_GPUS.get(machine, 0) + accelerators if machine in MACHINE_GPUS or accelerators else None
        if expected is not None and declared != expected:
            problems.append(f"node type {name}: resources GPU={declared}, but {machine} has {expected} GPUs")
        count = 1 if name == head else int(node_type.get("min_workers", 0))
        node_gpus += [int(declared)] * count if declared else []
        total_cpus += resources.get("CPU", 0) * count
        if declared:
            gpu_summary.append(f"{count} x {declared} GPU ({machine})")

    # The train config this cluster is for.
    meta = prepared.get("metadata") or {}
    ref = meta.get("rl_seg_train_config")
    train = ""
    if not ref:
        problems.append("metadata.rl_seg_train_config names no train config")
    else:
        shared, env = set(), {}
        if docker:
            shared, env = _docker_mounts_and_env(list(docker.get("run_options") or []))
        max_copies = meta.get("rl_seg_max_policy_copies_per_gpu")
        train = check_train_config(ref, [], repo=repo, node_gpus=node_gpus, total_cpus=total_cpus,
                                   shared_roots=shared, env=env,
                                   max_copies=int(max_copies) if max_copies is not None else None,
                                   problems=problems)
    report.summary = f"{', '.join(gpu_summary) or 'no GPU'}; {train}"
    return report


# ---------------------------------------------------------------------------------------------------------------
# KubeRay

_DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_RESOURCE_LIST = {
    "type": "object",
    # Extended resources are whole units; written as YAML integers here so that "4" vs 4.5 mistakes show.
    "properties": {"nvidia.com/gpu": {"type": "integer", "minimum": 0}},
    "additionalProperties": {"type": ["string", "integer", "number"]},
}
_ENV_VAR = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "value": {"type": "string"},
        "valueFrom": {
            "type": "object",
            "properties": {"secretKeyRef": {"type": "object", "required": ["name", "key"],
                                            "properties": {"name": {"type": "string", "minLength": 1},
                                                           "key": {"type": "string", "minLength": 1}}}},
        },
    },
    "not": {"required": ["value", "valueFrom"]},
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "image": {"type": "string", "minLength": 1},
        "env": {"type": "array", "items": _ENV_VAR},
        "resources": {"type": "object", "properties": {"limits": _RESOURCE_LIST, "requests": _RESOURCE_LIST}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                             "properties": {"containerPort": {"type": "integer"}}}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
        "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "hostNetwork": {"type": "boolean"},
    }}},
}
_RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # KubeRay: map[string]string
_RAYCLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": {"type": "object", "properties": {"mode": {"enum": ["token", "disabled"]},
                                                          "secretName": {"type": "string"}}},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "properties": {
                "rayStartParams": _RAY_START_PARAMS,
                "template": _POD_TEMPLATE,
                "serviceType": {"enum": ["ClusterIP"]},   # never NodePort / LoadBalancer: see checks below
                "enableIngress": {"const": False},
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                "properties": {
                    "groupName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _RAY_START_PARAMS,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "maxLength": 63, "pattern": _DNS1123},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
}
KUBERAY_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "The fields of KubeRay's ray.io/v1 RayCluster and RayJob that rl-seg's manifests use",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"enum": ["RayCluster", "RayJob"]},
                   "metadata": _METADATA},
    "oneOf": [
        {"properties": {"kind": {"const": "RayCluster"}, "spec": _RAYCLUSTER_SPEC}},
        {"properties": {"kind": {"const": "RayJob"}, "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "submitterPodTemplate": _POD_TEMPLATE,
                "rayClusterSpec": _RAYCLUSTER_SPEC,
            },
        }}},
    ],
}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def _check_token_env(where: str, container: dict, secrets: set, problems: list[str]) -> None:
    env = _env(container)
    mode = env.get("RAY_AUTH_MODE", {})
    if mode.get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE=token is not set")
    token = env.get("RAY_AUTH_TOKEN")
    ref = ((token or {}).get("valueFrom") or {}).get("secretKeyRef")
    if token is None:
        problems.append(f"{where}: RAY_AUTH_TOKEN is not set")
    elif "value" in token or not ref:
        problems.append(f"{where}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef), not a literal")
    else:
        secrets.add((ref["name"], ref["key"]))


def validate_kuberay(doc: dict, *, repo: Path = REPO) -> Report:
    """Check a KubeRay RayCluster or RayJob manifest (a mapping as loaded from YAML)."""
    import jsonschema

    report = Report(path="", kind=f"KubeRay {doc.get('kind', '?') if isinstance(doc, dict) else '?'}")
    problems = report.problems
    errors = sorted(jsonschema.Draft202012Validator(KUBERAY_SCHEMA).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        for error in errors[:3]:
            # oneOf hides the useful message: report the deepest cause.
            leaf = min(error.context or [error], key=lambda e: -len(e.absolute_path))
            problems.append(f"schema: {'.'.join(map(str, leaf.absolute_path)) or '(top)'}: {leaf.message}")
        return report
    pin = ray_pin(repo)
    is_job = doc["kind"] == "RayJob"
    spec = doc["spec"]["rayClusterSpec"] if is_job else doc["spec"]
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]

    if spec["rayVersion"] != pin:
        problems.append(f"rayVersion {spec['rayVersion']} differs from constraints.txt's ray=={pin}")

    # Every Ray container (the first of each Pod, KubeRay's convention) and the submitter: token env, image.
    secrets: set = set()
    pods = [("head", head["template"])] + [(f"worker group {g['groupName']}", g["template"]) for g in groups]
    if is_job and "submitterPodTemplate" in doc["spec"]:
        pods.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    for where, template in pods:
        pod = template["spec"]
        if pod.get("hostNetwork"):
            problems.append(f"{where}: hostNetwork exposes Ray's ports on the node's address")
        for i, container in enumerate(pod["containers"]):
            if not _tag_carries(image_tag(container["image"]), pin):
                problems.append(f"{where}: image {container['image']} does not carry Ray {pin} in its tag")
            if any("hostPort" in p for p in container.get("ports") or []):
                problems.append(f"{where}: a hostPort exposes a Ray port on the node's address")
            if i == 0:
                _check_token_env(where, container, secrets, problems)
            for name, var in _env(container).items():
                if name == "RAY_AUTH_MODE" and var.get("value") != "token":
                    problems.append(f"{where}: RAY_AUTH_MODE={var.get('value')}")
    if len(secrets) > 1:
        problems.append(f"the Ray containers read different token Secrets {sorted(secrets)}: one cluster, one token")
    auth = spec.get("authOptions")
    if is_job:
        # The operator calls the job API of the cluster it created; only authOptions gives it the token.
        if not auth or auth.get("mode") != "token":
            problems.append("RayJob: rayClusterSpec.authOptions.mode must be token (the operator polls the job API)")
        elif secrets and auth.get("secretName") not in {s[0] for s in secrets}:
            problems.append(f"authOptions.secretName {auth.get('secretName')} is not the containers' Secret")
    elif auth and auth.get("mode") != "token":
        problems.append("authOptions.mode is not token")
    if any(s[1] != TOKEN_SECRET_KEY for s in secrets) and auth:
        problems.append(f"authOptions expects the token under the Secret key {TOKEN_SECRET_KEY}")

    # Dashboard: inside the pod network only (ClusterIP, no Ingress, no host ports: schema and checks above).
    dash = head["rayStartParams"].get("dashboard-host", "0.0.0.0")
    if dash not in ("127.0.0.1", "0.0.0.0"):
        problems.append(f"dashboard-host {dash}: use 127.0.0.1 or the Pod's own addresses (0.0.0.0)")
    head_service = (head.get("headService") or {}).get("spec") or {}
    if head_service.get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"headService type {head_service.get('type')} exposes the dashboard outside the cluster")

    # GPUs: none on the head; whole, consistent counts on the workers.
    head_ray = head["template"]["spec"]["containers"][0]
    head_gpus = ((head_ray.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)
    if head_gpus or head["rayStartParams"].get("num-gpus", "0") != "0":
        problems.append("the head must be a CPU node (num-gpus \"0\", no nvidia.com/gpu limit)")
    node_gpus, total_cpus, summary = [], _quantity(
        head["rayStartParams"].get("num-cpus") or ((head_ray.get("resources") or {}).get("limits") or {}).get("cpu", 0)
    ), []
    for group in groups:
        name = group["groupName"]
        if not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            problems.append(f"worker group {name}: replicas {group['replicas']} outside "
                            f"[minReplicas {group['minReplicas']}, maxReplicas {group['maxReplicas']}]")
        ray_container = group["template"]["spec"]["containers"][0]
        resources = ray_container.get("resources") or {}
        limit = (resources.get("limits") or {}).get("nvidia.com/gpu", 0)
        request = (resources.get("requests") or {}).get("nvidia.com/gpu")
        if request is not None and request != limit:
            problems.append(f"worker group {name}: nvidia.com/gpu request {request} != limit {limit}")
        param = group["rayStartParams"].get("num-gpus")
        if param is not None and param != str(limit):
            problems.append(f"worker group {name}: rayStartParams num-gpus {param} != nvidia.com/gpu limit {limit}")
        cpus = group["rayStartParams"].get("num-cpus") or (resources.get("limits") or {}).get("cpu", 0)
        node_gpus += [int(limit)] * group["replicas"] if limit else []
        total_cpus += _quantity(cpus) * group["replicas"]
        if limit:
            summary.append(f"{group['replicas']} x {limit} GPU ({name})")

    # Shared volume: a PVC mounted at the same path in every Ray container.
    def pvc_mounts(template: dict) -> set[tuple[str, str]]:
        pod = template["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes") or []
                  if "persistentVolumeClaim" in v}
        return {(m["mountPath"], claims[m["name"]]) for m in pod["containers"][0].get("volumeMounts") or []
                if m["name"] in claims}

    common = pvc_mounts(head["template"])
    for group in groups:
        common &= pvc_mounts(group["template"])
    shared = {path for path, _ in common}
    env = {k: v.get("value") for k, v in _env(head_ray).items() if "value" in v}

    # The train config: the annotation, or the RayJob's entrypoint.
    annotations = doc["metadata"].get("annotations") or {}
    max_copies = annotations.get(ANNOTATION_MAX_COPIES)
    ref, overrides = annotations.get(ANNOTATION_TRAIN_CONFIG), []
    if is_job:
        words = shlex.split(doc["spec"]["entrypoint"])
        if words[:2] != ["rl-seg", "train"] or "--config" not in words[:-1]:
            problems.append(f"entrypoint {doc['spec']['entrypoint']!r} is not `rl-seg train --config FILE ...`")
        else:
            i = words.index("--config")
            ref, overrides = words[i + 1], [w for w in words[i + 2:] if "=" in w and not w.startswith("-")]
        runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "") or {}
        if not isinstance(runtime_env, dict) or "working_dir" not in runtime_env:
            problems.append("runtimeEnvYAML names no working_dir")
        job_env = (runtime_env or {}).get("env_vars") or {} if isinstance(runtime_env, dict) else {}
        if any(k.startswith("RAY_AUTH_TOKEN") for k in job_env):
            problems.append("the token is in runtimeEnvYAML (runtime environments are logged): use the Secret")
        env.update({k: str(v) for k, v in job_env.items()})
        if doc["spec"].get("shutdownAfterJobFinishes") is not True:
            problems.append("shutdownAfterJobFinishes is not true: the GPUs would stay allocated after the job")
    train = ""
    if not ref:
        problems.append(f"no train config: annotate metadata.annotations[{ANNOTATION_TRAIN_CONFIG!r}]")
    else:
        train = check_train_config(ref, overrides, repo=repo, node_gpus=node_gpus, total_cpus=total_cpus,
                                   shared_roots=shared, env=env,
                                   max_copies=int(max_copies) if max_copies is not None else None,
                                   problems=problems)
    report.summary = f"{', '.join(summary) or 'no GPU'}; {train}"
    return report


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile, files, CLI

def validate_dockerfile(text: str, *, repo: Path = REPO) -> Report:
    report = Report(path="", kind="Dockerfile")
    pin = ray_pin(repo)
    bases = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", text, flags=re.M)
    if not bases:
        report.problems.append("no FROM line")
    for base in bases:
        if base.split(":")[0].endswith("rayproject/ray") and not _tag_carries(image_tag(base), pin):
            report.problems.append(f"base image {base} is not Ray {pin} (constraints.txt)")
    for version in re.findall(r"ray\.__version__\s*==\s*['\"]([^'\"]+)['\"]", text):
        if version != pin:
            report.problems.append(f"asserts Ray {version}, constraints.txt pins {pin}")
    if not re.search(r"pip install\b[^\n]*-c\s+constraints\.txt", text):
        report.problems.append("never installs with `-c constraints.txt`")
    report.summary = f"base {', '.join(bases)}"
    return report


def validate_file(path: str | Path, *, repo: Path = REPO) -> Report:
    path = Path(path)
    shown = str(path.resolve().relative_to(Path(repo).resolve())) if Path(repo).resolve() in path.resolve().parents \
        else str(path)
    if path.name == "Dockerfile":
        report = validate_dockerfile(path.read_text(), repo=repo)
    else:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as exc:
            return Report(shown, "YAML", [f"not valid YAML: {exc}"])
        if len(docs) != 1 or not isinstance(docs[0], dict):
            return Report(shown, "YAML", ["expected exactly one mapping (one cluster definition per file)"])
        doc = docs[0]
        report = validate_kuberay(doc, repo=repo) if "apiVersion" in doc else validate_launcher(doc, repo=repo)
    report.path = shown
    return report


def definition_files(repo: Path = REPO) -> list[Path]:
    cluster = Path(repo) / "cluster"
    return (sorted((cluster / "launcher").glob("*.yaml")) + sorted((cluster / "kuberay").glob("*.yaml"))
            + [p for p in [cluster / "Dockerfile"] if p.is_file()])


def validate_all(repo: Path = REPO) -> list[Report]:
    return [validate_file(p, repo=repo) for p in definition_files(repo)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    reports = [validate_file(p) for p in args] if args else validate_all()
    for report in reports:
        print(report.line())
    failed = sum(not r.ok for r in reports)
    print(f"{len(reports) - failed}/{len(reports)} cluster definitions valid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
