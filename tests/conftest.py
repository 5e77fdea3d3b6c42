"""Shared test setup: loopback-only Ray, offline hubs, CPU DeepSpeed, bundled real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# One intra-op thread per process: CI has 2 cores shared by the test process, Ray workers and
# DeepSpeed ranks; more threads only oversubscribe them (measured: tiny steps 5x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

import pytest  # noqa: E402

from sepit.resources import DATA_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir():
    """The real public data bundled with the package (gzipped; see PROVENANCE.md)."""
    return DATA_DIR


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session (loopback only, 4 logical CPUs)."""
    import ray

    from sepit.ray_runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is ~5x faster than two spinning against busy cores
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as DeepSpeed's engine would set up (MoE layers need expert groups)."""
    import socket

    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 20 s CPU op build
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", LOCAL_SIZE="1")
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    yield dist
    if created:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- shared slow fixtures
# The expensive things are made once per session and shared: the tiny pipeline (README command 1
# on the tiny preset: store, dataset, stages 0-2, evaluation), a `ray start --head` node for the
# `ray job submit` tests. Tests that use them run in one xdist group (see
# pytest_collection_modifyitems below), so under `pytest -n 2` each is made once, by one worker.

# Stages 1 and 2 on 2 DeepSpeed ranks under ZeRO-2 (what the stage tests check: a rank whose batch
# has no structure still gives the bias a zero gradient; MoE across ranks), and a validation
# before the first step so the tests can show each stage learned.
TINY_PIPELINE_OVERRIDES = [
    "stage1.train.num_workers=2", "stage1.train.zero_stage=2",
    "stage2.train.num_workers=2", "stage2.train.zero_stage=2",
    *(f"stage{n}.train.eval_at_start=true" for n in range(3)),
]


@dataclass
class PipelineRun:
    out: Path  # the run folder (store/, dataset/, stage0-2/, eval/, logs/, mlflow.db)
    stdout: str
    stderr: str

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{(self.out / 'mlflow.db').resolve()}"

    def run_id(self, stage: str) -> str:
        return json.loads((self.out / stage / "mlflow_run.json").read_text())["run_id"]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> PipelineRun:
    """`sepit pipeline --preset tiny` as a user runs it: a fresh process that starts its own local
    Ray (not the test session's) and its own MLflow store."""
    out = tmp_path_factory.mktemp("tiny_pipeline") / "run"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sepit.cli", "pipeline", "--preset", "tiny", "--out", str(out),
         *TINY_PIPELINE_OVERRIDES],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return PipelineRun(out=out, stdout=proc.stdout, stderr=proc.stderr)


@pytest.fixture(scope="session")
def ray_head_node(tmp_path_factory):
    """One real `ray start --head` node on loopback for every `ray job submit` test."""
    from ray_head import ray_head

    log = tmp_path_factory.mktemp("ray_head") / "head.log"
    with ray_head(log, num_cpus=4, object_store_bytes=200_000_000) as head:
        yield head


# Session fixtures made once per worker; the modules that use one share an xdist group (the first
# listed that a module uses), so under `pytest -n 2` each is made by one worker only.
SHARED_FIXTURES = {"tiny_pipeline": "tiny_pipeline", "ray_head_node": "tiny_pipeline", "mlflow_server": "mlflow_server"}


def pytest_collection_modifyitems(config, items):
    """xdist groups (`--dist loadgroup --no-loadscope-reorder`): a module's tests stay on one
    worker (its module fixtures are made once) and modules that use the same expensive session
    fixture share a group. Longest first: the tiny-pipeline group (pipeline -> stage job ->
    sweeps) starts at once, then the groups holding slow tests, then the rest."""
    def module(item) -> str:
        return item.module.__name__.rsplit(".", 1)[-1]

    group: dict[str, str] = {}
    for item in items:
        for fixture, shared in SHARED_FIXTURES.items():
            if fixture in item.fixturenames and group.get(module(item), shared) == shared:
                group[module(item)] = shared
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group.get(module(item), module(item))))
    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (group.get(module(item)) != "tiny_pipeline", module(item) not in slow))
