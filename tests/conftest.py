"""Shared test setup: loopback-only Ray, offline hubs, CPU DeepSpeed, bundled real data."""

from __future__ import annotations

import os

# One intra-op thread per process: CI has 2 cores shared by the test process, Ray workers and
# DeepSpeed ranks; more threads only oversubscribe them (measured: tiny steps 5x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

import pytest  # noqa: E402

from sepit.resources import DATA_DIR  # noqa: E402


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
