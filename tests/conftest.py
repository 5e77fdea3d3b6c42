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
def lm():
    """A seeded tiny SEPIT model (eval mode) and its processor, one per test module, built as
    stage 1 builds them (``lm_support.build_lm``)."""
    import torch
    from lm_support import build_lm

    torch.manual_seed(0)
    model, processor = build_lm()
    return model.eval(), processor


@pytest.fixture(scope="module")
def model(lm):
    return lm[0]


@pytest.fixture(scope="module")
def processor(lm):
    return lm[1]


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group, as DeepSpeed's engine would set up (MoE layers need expert groups).

    One per session: DeepSpeed caches the groups it made (expert groups, its comm backend), so a
    group destroyed and made again in the same process leaves it pointing at a dead one."""
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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (tracking + model registry + proxied artifacts) on a free loopback
    port with a sqlite store, for the whole session; yields its URI."""
    import signal
    import time

    import httpx
    from ray_head import free_ports

    root = tmp_path_factory.mktemp("mlflow_server")
    (port,) = free_ports(1)
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        # no GenAI job runner (its Huey consumers are a dozen processes sepit never uses)
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.25)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)  # the server runs in its own process group (its workers too)
    try:
        proc.wait(timeout=3)  # a throw-away store: no need to wait out a graceful shutdown
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


# --------------------------------------------------------------------------- shared slow fixtures
# The expensive things are made once per session and shared: the tiny pipeline (README command 1
# on the tiny preset: store, dataset, stages 0-2, evaluation), a `ray start --head` node for the
# `ray job submit` tests. The modules that use them are scheduled on one xdist worker (see
# pytest_xdist_make_scheduler below), so under `pytest -n 2` each is made once.

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


# Under `pytest -n 2` (xdist) every worker is its own session: a session fixture is made once per
# worker that needs it. So the modules using one of the expensive fixtures run on one worker, as
# one scheduling unit (below); every other module is a unit of its own (its module fixtures are
# made once). The units are handed out longest first: the tiny-pipeline unit (pipeline -> stage
# job -> sweeps) at once, then modules holding slow tests, then the rest.
MODULE_GROUPS = {
    "test_pipeline.py": "tiny_pipeline", "test_train_stages.py": "tiny_pipeline", "test_sweep.py": "tiny_pipeline",
    "test_train_fault_tolerance.py": "mlflow_server", "test_mlflow_models.py": "mlflow_server",
}
SHARED_FIXTURES = {"tiny_pipeline": "tiny_pipeline", "ray_head_node": "tiny_pipeline", "mlflow_server": "mlflow_server"}


def _module_file(item_or_nodeid) -> str:
    nodeid = getattr(item_or_nodeid, "nodeid", item_or_nodeid)
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def pytest_collection_modifyitems(config, items):
    """Check every module using a shared fixture is in its group (a new one must be added to
    ``MODULE_GROUPS``, or it would make the fixture again on another worker), and order the
    tests longest unit first."""
    for item in items:
        for fixture, group in SHARED_FIXTURES.items():
            if fixture in item.fixturenames and MODULE_GROUPS.get(_module_file(item)) not in (group, "tiny_pipeline"):
                raise pytest.UsageError(f"{_module_file(item)} uses the session fixture {fixture!r}: add it to "
                                        f"MODULE_GROUPS in tests/conftest.py as {group!r}")
    slow = {_module_file(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (MODULE_GROUPS.get(_module_file(item)) != "tiny_pipeline", _module_file(item) not in slow))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduler by scope (a unit stays on one worker), with the scopes above; units in
    collection order (longest first), not reordered by test count."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module_file(nodeid)
            return MODULE_GROUPS.get(module, module)

    config.option.loadscopereorder = False
    return SharedFixtureScheduling(config, log)
