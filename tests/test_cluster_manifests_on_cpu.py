"""The cluster definitions (cluster/launcher, cluster/kuberay, cluster/Dockerfile) validate offline, and the
checker behind that (cluster/validate.py) rejects broken copies: missing token auth, an exposed dashboard, GPU
counts that do not match, a train config that cannot be placed, schema violations."""

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = sorted((CLUSTER / "launcher").glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))

_spec = importlib.util.spec_from_file_location("rl_seg_cluster_validate", CLUSTER / "validate.py")
validate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = validate  # dataclasses look their module up while the file executes
_spec.loader.exec_module(validate)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def problems(report) -> str:
    return " | ".join(report.problems)


# --- the shipped definitions --------------------------------------------------------------------------------------

def test_every_definition_is_found():
    names = {p.relative_to(REPO).as_posix() for p in validate.definition_files(REPO)}
    assert names == {"cluster/launcher/a100x4.yaml", "cluster/launcher/a100x2-zero2.yaml",
                     "cluster/kuberay/raycluster-a100x4.yaml", "cluster/kuberay/raycluster-a100x2-zero2.yaml",
                     "cluster/kuberay/rayjob-train.yaml", "cluster/Dockerfile"}


@pytest.mark.parametrize("path", LAUNCHERS + KUBERAY + [CLUSTER / "Dockerfile"], ids=lambda p: p.name)
def test_shipped_definition_is_valid(path):
    report = validate.validate_file(path)
    assert report.ok, report.line()


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_passes_rays_own_validation(path):
    # The same two steps `ray up` runs before any cloud call; prepare_config fills in the GCP defaults, after
    # which validate_config applies ray/autoscaler/ray-schema.json and Ray's cross-field rules.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(path)))


def test_ray_pin_matches_every_version_in_the_definitions():
    pin = validate.ray_pin(REPO)
    assert pin == "2.60.0"
    for path in KUBERAY:
        doc = load(path)
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["rayVersion"] == pin
    for path in LAUNCHERS:
        assert validate.image_tag(load(path)["docker"]["image"]).startswith(pin + "-")


@pytest.mark.parametrize("name,gpus", [("sa2va-26b-4xa100", 4), ("sa2va-26b-2xa100-zero2", 2)])
def test_cluster_train_configs_keep_the_plans_ppo_values(name, gpus):
    from rl_seg.config import load_config
    from rl_seg.ppo.config import TrainConfig

    base = load_config(TrainConfig, REPO / "rl_seg/configs/sa2va-26b.yaml")
    cfg = load_config(TrainConfig, REPO / f"rl_seg/configs/{name}.yaml", [])
    assert cfg.ppo == base.ppo and cfg.policy.lora == base.policy.lora
    assert cfg.optimizer_steps == base.optimizer_steps          # micro-batching changes memory, not the update
    assert cfg.learner.micro_batch_images * cfg.grad_accum_steps * cfg.learner.num_workers == \
        cfg.data.images_per_iteration
    assert cfg.learner.zero_stage == 2 and cfg.learner.use_gpu
    assert cfg.rollout.samples_per_image == base.rollout.samples_per_image
    demand = cfg.rollout.num_workers * cfg.rollout.num_gpus + cfg.learner.num_workers * cfg.learner.gpus_per_worker
    assert demand == gpus


# --- the placement replay -------------------------------------------------------------------------------------------

def _cfg(**overrides):
    from rl_seg.config import load_config
    from rl_seg.ppo.config import TrainConfig

    return load_config(TrainConfig, REPO / "rl_seg/configs/sa2va-26b.yaml", [f"{k}={v}" for k, v in overrides.items()])


def test_placement_replays_rays_best_fit_packing():
    # sa2va-26b.yaml: 4 rollouts x 0.25 + 4 learners x 0.75 = 4 GPUs in total, but the rollouts (created first)
    # all pack onto GPU 0, and the fourth learner bundle finds no GPU with 0.75 free. A local Ray with 4
    # logical GPUs behaves the same (rollout GPU ids [0, 0, 0, 0]; the learner placement group never ready).
    ok, message, _ = validate.place_gpu_demand([4], _cfg())
    assert not ok and "learner worker #4" in message
    # One rollout at 0.25 leaves 0.75 on its GPU: all four learners fit.
    ok, _, copies = validate.place_gpu_demand([4], _cfg(**{"rollout.num_workers": 1}))
    assert ok and copies == [[2, 1, 1, 1]]
    ok, _, copies = validate.place_gpu_demand([4], _cfg(**{"rollout.num_workers": 1, "rollout.num_gpus": 1.0,
                                                           "learner.num_workers": 3, "learner.gpus_per_worker": 1.0,
                                                           "data.images_per_iteration": 120}))
    assert ok and copies == [[1, 1, 1, 1]]
    ok, message, _ = validate.place_gpu_demand([4], _cfg(**{"rollout.num_workers": 1, "rollout.num_gpus": 1.5}))
    assert not ok and "whole number" in message


# --- the checker fails on broken copies: launcher --------------------------------------------------------------------

@pytest.fixture
def launcher():
    return load(CLUSTER / "launcher" / "a100x4.yaml")


def test_launcher_without_token_mode_on_a_worker_start_is_rejected(launcher):
    launcher["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "")
                                             for c in launcher["worker_start_ray_commands"]]
    report = validate.validate_launcher(launcher)
    assert not report.ok and "worker `ray start` runs without RAY_AUTH_MODE=token" in problems(report)


def test_launcher_token_mode_exported_in_an_earlier_command_does_not_count(launcher):
    # Each command runs in a fresh SSH shell: an export in the previous command is gone by `ray start`.
    launcher["head_start_ray_commands"] = ["export RAY_AUTH_MODE=token"] + [
        c.replace("RAY_AUTH_MODE=token ", "") for c in launcher["head_start_ray_commands"]]
    assert "head `ray start` runs without RAY_AUTH_MODE=token" in problems(validate.validate_launcher(launcher))


@pytest.mark.parametrize("command,accepted", [
    ("RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379", True),
    ("ulimit -n 65536; env RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379", True),
    ("export RAY_AUTH_MODE=token; ray start --address=$RAY_HEAD_IP:6379", True),
    ("RAY_AUTH_MODE=token; ray start --address=$RAY_HEAD_IP:6379", False),       # a shell variable, not exported
    ("ray start --address=$RAY_HEAD_IP:6379; export RAY_AUTH_MODE=token", False),  # too late
])
def test_launcher_token_mode_must_reach_the_ray_start_process(launcher, command, accepted):
    launcher["worker_start_ray_commands"] = ["ray stop", command]
    report = validate.validate_launcher(launcher)
    assert ("worker `ray start` runs without RAY_AUTH_MODE=token" not in problems(report)) == accepted


def test_launcher_without_the_token_file_mount_is_rejected(launcher):
    del launcher["file_mounts"]["~/.ray/auth_token"]
    assert "auth_token" in problems(validate.validate_launcher(launcher))


def test_launcher_reading_the_token_from_inside_the_repository_is_rejected(launcher):
    launcher["file_mounts"]["~/.ray/auth_token"] = "cluster/auth_token"
    assert "keep the token out of it" in problems(validate.validate_launcher(launcher))


def test_launcher_with_auth_disabled_is_rejected(launcher):
    launcher["docker"]["run_options"].append("--env RAY_AUTH_MODE=disabled")
    assert "other than token" in problems(validate.validate_launcher(launcher))


def test_launcher_with_a_public_dashboard_is_rejected(launcher):
    launcher["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                                           for c in launcher["head_start_ray_commands"]]
    assert "--dashboard-host=127.0.0.1" in problems(validate.validate_launcher(launcher))


def test_launcher_gpu_count_not_matching_the_machine_type_is_rejected(launcher):
    launcher["available_node_types"]["a100x4"]["resources"]["GPU"] = 2
    report = validate.validate_launcher(launcher)
    assert "a2-ultragpu-4g has 4 GPUs" in problems(report)
    assert "demands 4 GPUs" in problems(report) and "the cluster has 2" in problems(report)


def test_launcher_with_a_train_config_that_cannot_be_placed_is_rejected(launcher):
    launcher["metadata"]["rl_seg_train_config"] = "rl_seg/configs/sa2va-26b.yaml"
    report = validate.validate_launcher(launcher)
    assert "cannot be placed" in problems(report)


def test_launcher_with_two_policy_copies_on_one_gpu_is_rejected(launcher, tmp_path):
    # Deadlock-free (one rollout at 0.25 beside four learners at 0.75), but two 26B copies would share GPU 0.
    config = yaml.safe_load((REPO / "rl_seg/configs/sa2va-26b-4xa100.yaml").read_text())
    config["rollout"].update(num_workers=1, num_gpus=0.25)
    config["learner"].update(num_workers=4, gpus_per_worker=0.75)
    config["data"]["images_per_iteration"] = 128
    path = tmp_path / "colocated.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher["metadata"]["rl_seg_train_config"] = str(path)
    report = validate.validate_launcher(launcher)
    assert problems(report).endswith("puts 2 policy copies on one GPU (node 0, GPU 0); this cluster declares at "
                                     "most 1 per GPU")


def test_launcher_with_a_missing_train_config_is_rejected(launcher):
    launcher["metadata"]["rl_seg_train_config"] = "rl_seg/configs/no-such.yaml"
    assert "does not exist" in problems(validate.validate_launcher(launcher))


def test_launcher_run_dir_off_the_shared_mount_is_rejected(launcher):
    launcher["docker"]["run_options"] = [o for o in launcher["docker"]["run_options"] if "/mnt/rl-seg:" not in o]
    assert "not on a volume every node mounts" in problems(validate.validate_launcher(launcher))


def test_launcher_without_the_pinned_install_is_rejected(launcher):
    launcher["setup_commands"] = [c.replace("-c constraints.txt ", "") for c in launcher["setup_commands"]]
    assert "pip install -c constraints.txt -e ." in problems(validate.validate_launcher(launcher))


def test_launcher_with_another_ray_image_is_rejected(launcher):
    launcher["docker"]["image"] = "rayproject/ray:2.59.0-py312-gpu"
    assert "does not carry Ray 2.60.0" in problems(validate.validate_launcher(launcher))


@pytest.mark.parametrize("breakage", ["fractional_gpu_resource", "unknown_key", "head_type_missing"])
def test_launcher_schema_violations_are_rejected_by_ray(launcher, breakage):
    if breakage == "fractional_gpu_resource":
        launcher["available_node_types"]["a100x4"]["resources"]["GPU"] = 3.5   # ray-schema.json: integer
    elif breakage == "unknown_key":
        launcher["head_start_commands"] = ["ray start --head"]                  # misspelt key
    else:
        launcher["head_node_type"] = "no_such_type"
    assert "Ray's validation rejects it" in problems(validate.validate_launcher(launcher))


# --- the checker fails on broken copies: KubeRay ---------------------------------------------------------------------

@pytest.fixture
def raycluster():
    return load(CLUSTER / "kuberay" / "raycluster-a100x4.yaml")


@pytest.fixture
def rayjob():
    return load(CLUSTER / "kuberay" / "rayjob-train.yaml")


def _worker(doc):
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_raycluster_without_the_token_env_is_rejected(raycluster):
    worker = _worker(raycluster)
    worker["env"] = [e for e in worker["env"] if e["name"] != "RAY_AUTH_TOKEN"]
    assert "worker group a100x4: RAY_AUTH_TOKEN is not set" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_with_a_literal_token_is_rejected(raycluster):
    worker = _worker(raycluster)
    for e in worker["env"]:
        if e["name"] == "RAY_AUTH_TOKEN":
            e.pop("valueFrom")
            e["value"] = "hunter2"
    assert "must come from a Secret" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_without_token_mode_on_the_head_is_rejected(raycluster):
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [e for e in head["env"] if e["name"] != "RAY_AUTH_MODE"]
    assert "head: RAY_AUTH_MODE=token is not set" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_with_two_token_secrets_is_rejected(raycluster):
    for e in _worker(raycluster)["env"]:
        if e["name"] == "RAY_AUTH_TOKEN":
            e["valueFrom"]["secretKeyRef"]["name"] = "another-secret"
    assert "different token Secrets" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_gpu_mismatch_is_rejected(raycluster):
    resources = _worker(raycluster)["resources"]
    resources["limits"]["nvidia.com/gpu"] = 2
    report = validate.validate_kuberay(raycluster)
    assert "request 4 != limit 2" in problems(report) and "the cluster has 2" in problems(report)


def test_raycluster_gpu_as_string_or_fraction_fails_the_schema(raycluster):
    _worker(raycluster)["resources"]["limits"]["nvidia.com/gpu"] = "4"
    assert "schema" in problems(validate.validate_kuberay(raycluster))
    _worker(raycluster)["resources"]["limits"]["nvidia.com/gpu"] = 0.5
    assert "schema" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_replicas_outside_their_bounds_are_rejected(raycluster):
    raycluster["spec"]["workerGroupSpecs"][0]["replicas"] = 2
    assert "outside [minReplicas 1, maxReplicas 1]" in problems(validate.validate_kuberay(raycluster))


@pytest.mark.parametrize("field,value", [("serviceType", "LoadBalancer"), ("serviceType", "NodePort"),
                                         ("enableIngress", True)])
def test_raycluster_exposing_the_dashboard_fails_the_schema(raycluster, field, value):
    raycluster["spec"]["headGroupSpec"][field] = value
    assert f"schema: spec.headGroupSpec.{field}" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_host_port_is_rejected(raycluster):
    raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][1]["hostPort"] = 8265
    assert "hostPort" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_with_another_ray_version_is_rejected(raycluster):
    raycluster["spec"]["rayVersion"] = "2.59.0"
    assert "differs from constraints.txt" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_wrong_api_version_fails_the_schema(raycluster):
    raycluster["apiVersion"] = "ray.io/v1alpha1"
    assert "schema" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_without_the_shared_volume_on_the_workers_is_rejected(raycluster):
    worker = _worker(raycluster)
    worker["volumeMounts"] = [m for m in worker["volumeMounts"] if m["name"] != "shared"]
    assert "not on a volume every node mounts" in problems(validate.validate_kuberay(raycluster))


def test_raycluster_gpu_on_the_head_is_rejected(raycluster):
    raycluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = "1"
    assert "head must be a CPU node" in problems(validate.validate_kuberay(raycluster))


def test_rayjob_entrypoint_config_must_exist(rayjob):
    rayjob["spec"]["entrypoint"] = "rl-seg train --config rl_seg/configs/no-such.yaml"
    assert "does not exist in the repository" in problems(validate.validate_kuberay(rayjob))


def test_rayjob_entrypoint_overrides_are_applied(rayjob):
    rayjob["spec"]["entrypoint"] += " learner.num_workers=4 data.images_per_iteration=128"
    assert "demands 5 GPUs" in problems(validate.validate_kuberay(rayjob))   # 1 x 1.0 + 4 x 1.0 on 4 GPUs
    rayjob["spec"]["entrypoint"] = "python train.py"
    assert "is not `rl-seg train --config" in problems(validate.validate_kuberay(rayjob))


def test_rayjob_without_auth_options_is_rejected(rayjob):
    del rayjob["spec"]["rayClusterSpec"]["authOptions"]
    assert "authOptions.mode must be token" in problems(validate.validate_kuberay(rayjob))


def test_rayjob_submitter_without_the_token_is_rejected(rayjob):
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    submitter["env"] = []
    assert "submitter: RAY_AUTH_TOKEN is not set" in problems(validate.validate_kuberay(rayjob))


def test_rayjob_token_in_the_runtime_env_is_rejected(rayjob):
    rayjob["spec"]["runtimeEnvYAML"] += "  RAY_AUTH_TOKEN: hunter2\n"
    assert "token is in runtimeEnvYAML" in problems(validate.validate_kuberay(rayjob))


def test_rayjob_that_keeps_its_cluster_is_rejected(rayjob):
    rayjob["spec"]["shutdownAfterJobFinishes"] = False
    assert "shutdownAfterJobFinishes" in problems(validate.validate_kuberay(rayjob))


def test_dockerfile_with_another_ray_base_is_rejected():
    text = (CLUSTER / "Dockerfile").read_text().replace("rayproject/ray:2.60.0-", "rayproject/ray:2.59.0-")
    report = validate.validate_dockerfile(text)
    assert "is not Ray 2.60.0" in problems(report)


# --- the CLI -----------------------------------------------------------------------------------------------------------

def test_cli_validates_everything_and_prints_a_line_per_file():
    done = subprocess.run([sys.executable, str(CLUSTER / "validate.py")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len([line for line in lines if line.startswith("OK ")]) == 6
    assert lines[-1] == "6/6 cluster definitions valid"


def test_cli_fails_on_a_broken_copy(tmp_path):
    doc = load(CLUSTER / "kuberay" / "raycluster-a100x4.yaml")
    broken = copy.deepcopy(doc)
    _worker(broken)["env"] = [e for e in _worker(broken)["env"] if not e["name"].startswith("RAY_AUTH")]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    good = CLUSTER / "kuberay" / "raycluster-a100x4.yaml"
    done = subprocess.run([sys.executable, str(CLUSTER / "validate.py"), str(good), str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    ok_line, fail_line = done.stdout.strip().splitlines()[:2]
    assert ok_line.startswith("OK ") and fail_line.startswith("FAIL ") and "RAY_AUTH_MODE" in fail_line
