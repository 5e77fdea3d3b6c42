"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests' required fields,
the Serve configs against Ray Serve's schema, one place for storage + MLflow, the size of the
working directory Ray would upload, and every job the manifests and the guide name accepting the
arguments they are given (``--help`` and argument parsing; no Ray is started)."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
#: Ray refuses working directories whose zip reaches this (ray._private.runtime_env.packaging).
RAY_PACKAGE_LIMIT = 100 * 1024 * 1024


def cluster_env() -> dict[str, str]:
    """KEY=VALUE lines of cluster/cluster.env (comments and blanks skipped)."""
    out = {}
    for line in (CLUSTER / "cluster.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------- launcher
def ray_launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "cluster_launcher.yaml")
    jsonschema.validate(config, ray_launcher_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own check, defaults filled in
    # A wrong type in the same file is caught (the schema check is not vacuous).
    broken = copy.deepcopy(config)
    broken["setup_commands"].append({"pip install": "x"})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_launcher_schema())


def test_launcher_has_gpu_workers_autoscaling_bounds_and_a_cuda_torch_install():
    config = load(CLUSTER / "cluster_launcher.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu and all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in gpu)
    setup = " && ".join(config["setup_commands"])
    assert re.search(r"pip install .*torch==[\d.]+.*--index-url https://download\.pytorch\.org/whl/cu\d+", setup)
    assert "pip install -q -e /home/ray/sepit" in setup and "requirements-cpu.txt" not in setup
    assert config["file_mounts"]["/home/ray/sepit"] == "."


# ---------------------------------------------------------------------------------- KubeRay
def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """The fields the ray.io/v1 CRDs require (older KubeRay also requires rayStartParams, and
    rayStartParams is a map of strings)."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams values must be strings"
    assert head["template"]["spec"]["containers"][0]["image"], where
    assert spec["workerGroupSpecs"], where
    for group in spec["workerGroupSpecs"]:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in group, f"{where}: worker group lacks {key}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), where
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and container["name"], where
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{where}: GPU workers"
    assert spec.get("rayVersion") == _installed_ray_version(), f"{where}: rayVersion must match the image's Ray"


def _installed_ray_version() -> str:
    import ray

    return ray.__version__


def test_kuberay_manifests_parse_and_carry_required_fields():
    kinds = {}
    for path in MANIFESTS:
        doc = load(path)
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"], path.name
        kinds[doc["kind"]] = doc
    assert set(kinds) == {"RayCluster", "RayJob", "RayService"}
    check_ray_cluster_spec(kinds["RayCluster"]["spec"], "RayCluster")

    job = kinds["RayJob"]["spec"]
    assert job["entrypoint"].strip() and ("rayClusterSpec" in job or "clusterSelector" in job)
    check_ray_cluster_spec(job["rayClusterSpec"], "RayJob")
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(job["runtimeEnvYAML"]))  # Ray validates the fields

    service = kinds["RayService"]["spec"]
    check_ray_cluster_spec(service["rayClusterConfig"], "RayService")
    validate_serve_config(yaml.safe_load(service["serveConfigV2"]))


def validate_serve_config(config: dict) -> None:
    """Ray Serve's deploy schema, then sepit's own ServeConfig from each app's args."""
    from ray.serve.schema import ServeDeploySchema

    from sepit.serve.app import config_from_args

    from sepit.serve.app import INGRESS_NAME, RUNNER_NAME

    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        assert app.import_path == "sepit.serve.app:app_builder"
        serve_config = config_from_args(app.args)  # unknown or ill-typed fields raise ConfigError naming them
        for deployment in app.deployments:  # overrides must name a real deployment; user_config must apply
            assert deployment.name in (RUNNER_NAME, INGRESS_NAME), deployment.name
            user_config = deployment.model_dump(exclude_unset=True).get("user_config")
            if user_config is not None:
                assert deployment.name == RUNNER_NAME, "only the model runner takes a user_config"
                serve_config.with_user_config(user_config)


def test_serve_config_validates():
    validate_serve_config(load(CLUSTER / "serve_config.yaml"))


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    specs = [spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec]
    out = []
    for s in specs:
        for group in [s["headGroupSpec"], *s["workerGroupSpecs"]]:
            out.append((group["template"]["spec"], group["template"]["spec"]["containers"][0]))
    return out


def test_storage_and_mlflow_come_from_cluster_env():
    env = cluster_env()
    storage = env["SEPIT_STORAGE"]
    assert storage.startswith("/") and env["MLFLOW_TRACKING_URI"]
    for path in MANIFESTS:
        doc = load(path)
        for pod, container in _containers(doc):
            assert {"configMapRef": {"name": "sepit-cluster-env"}} in container.get("envFrom", []), path.name
            names = {e["name"] for e in container.get("env", [])}
            assert not names & set(env), f"{path.name} sets {names & set(env)} itself"
            shared = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            for mount in container.get("volumeMounts", []):
                if mount["name"] in shared:
                    assert mount["mountPath"] == storage, path.name
        text = path.read_text()
        for value in re.findall(r"(?:--data|--init|--out|model_dir:)\s+(\S+)", text):
            assert value.startswith(storage + "/"), f"{path.name}: {value} is not under SEPIT_STORAGE"
        assert "MLFLOW_TRACKING_URI" not in text.split("spec:", 1)[1], f"{path.name} hard-codes the MLflow URI"
    launcher = load(CLUSTER / "cluster_launcher.yaml")
    for cmd in launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:]:
        assert cmd.startswith("set -a && . /home/ray/sepit/cluster/cluster.env && set +a && ray start")
    assert f"-v {storage}:{storage}" in launcher["docker"]["run_options"]
    runtime_env = load(CLUSTER / "runtime_env.yaml")
    assert not set(runtime_env.get("env_vars", {})) & set(env)
    # The value reaches the jobs: sourcing the file the way the start commands do exports it.
    shown = subprocess.run(["bash", "-c", f"set -a && . {CLUSTER / 'cluster.env'} && set +a && env"],
                           capture_output=True, text=True, check=True).stdout
    assert f"SEPIT_STORAGE={storage}" in shown.splitlines()


# ---------------------------------------------------------------------------------- runtime_env
def test_runtime_env_keeps_the_working_directory_far_below_rays_limit(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    runtime_env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(working_dir=str(REPO), **runtime_env)
    target = tmp_path / "pkg.zip"
    # include_gitignore=False: the excludes alone must do it (a copy outside git has no .gitignore).
    create_package(str(REPO), target, include_gitignore=False, excludes=runtime_env["excludes"])
    size = target.stat().st_size
    names = zipfile.ZipFile(target).namelist()
    print(f"working-dir package: {size / 2**20:.1f} MiB, {len(names)} entries")
    assert size < RAY_PACKAGE_LIMIT / 4  # a quarter: far from the limit and from Ray's 50 MiB warning
    assert "jobs/stage2.py" in names and "sepit/data/build.py" in names
    assert any(n.startswith("sepit/resources/data/") for n in names)  # bundled data the jobs read
    for dropped in (".git/", ".venv/", "runs/", "sepit.egg-info/"):
        assert not any(n.startswith(dropped) for n in names), dropped
    assert not any("__pycache__" in n for n in names)


# ---------------------------------------------------------------------------------- jobs
def job_commands() -> list[list[str]]:
    """Every `python jobs/X.py ...` command: the RayJob entrypoints and the guide's commands."""
    env = cluster_env()
    lines = [load(p)["spec"]["entrypoint"] for p in MANIFESTS if load(p)["kind"] == "RayJob"]
    guide = re.sub(r"\\\n\s*", " ", (CLUSTER / "README.md").read_text())  # shell line continuations
    lines += [ln for ln in guide.splitlines() if re.search(r"-- python \S*jobs/\w+\.py", ln)]
    commands = []
    for line in lines:
        cmd = line[line.index("python "):]
        for key, value in env.items():
            cmd = cmd.replace(f"${key}", value).replace(f"${{{key}}}", value)
        words = shlex.split(cmd)
        words[1] = "jobs/" + Path(words[1]).name  # /opt/sepit/jobs/x.py in the image
        commands.append(words[1:])
    return commands


def test_every_named_job_exists_and_answers_help_quickly(tmp_path):
    """``--help`` of each job returns without starting Ray.  Timed in CPU seconds of the child
    (os.wait4), not wall time: the shared box's load must not decide the verdict."""
    commands = job_commands()
    scripts = sorted({c[0] for c in commands})
    assert {"jobs/stage0.py", "jobs/stage1.py", "jobs/stage2.py", "jobs/serve.py"} <= set(scripts), scripts
    procs = {}
    for s in scripts:
        out, err = (tmp_path / f"{Path(s).stem}.out").open("w"), (tmp_path / f"{Path(s).stem}.err").open("w")
        procs[s] = (subprocess.Popen([sys.executable, str(REPO / s), "--help"], cwd=REPO, stdout=out, stderr=err), out, err)
    for script, (proc, out, err) in procs.items():
        _, status, usage = os.wait4(proc.pid, 0)
        out.close(), err.close()
        cpu = usage.ru_utime + usage.ru_stime
        stdout, stderr = Path(out.name).read_text(), Path(err.name).read_text()
        assert os.waitstatus_to_exitcode(status) == 0, f"{script} --help: {stderr[-500:]}"
        assert stdout.startswith("usage: sepit "), script
        assert "Started a local Ray instance" not in stderr + stdout, f"{script} --help started Ray"
        assert cpu < 20, f"{script} --help used {cpu:.1f} CPU s"
        print(f"{script} --help: {cpu:.1f} CPU s")


def test_every_named_job_accepts_its_arguments():
    """Each command's arguments parse with the job's own parser; a stage's dotted overrides and
    preset load into its typed config (unknown fields and broken rules fail here, not on the cluster)."""
    from sepit.cli import COMMANDS

    checked = 0
    for words in job_commands():
        source = (REPO / words[0]).read_text()
        command = re.search(r'main\(\["([\w-]+)"', source).group(1)
        module = importlib.import_module(COMMANDS[command][0])
        parser = argparse.ArgumentParser(prog=f"sepit {command}", exit_on_error=False)
        module.add_arguments(parser)
        args = parser.parse_args(words[1:])
        if command.startswith("stage"):
            from sepit.train.stage_common import config_from_args

            stage = module.__name__.rsplit(".", 1)[1]
            config = config_from_args(args, stage)
            assert config.train.output_dir == args.out
        checked += 1
    assert checked >= 5
