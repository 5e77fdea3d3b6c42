"""The one place that starts or joins Ray and sets Ray's environment, with safe local defaults.

Local runs bind every listener to loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray
from advertising the machine's network address) and turn Ray's token auth off for the embedded
default.  Under ``ray job submit`` (``RAY_ADDRESS`` set by the job) we join the cluster as is.
Only this module calls ``ray.init`` (``tests/test_one_place.py`` checks it); the ``RAY_*`` variables
sepit sets, for this process or for Ray's workers, are set here too.
"""

from __future__ import annotations

import os
from typing import Any

_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", ""),
}


#: Set (as defaults) while the console is quiet: a local Ray started then passes it to its workers.
_QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS`` (set by ``ray job submit``), else None."""
    return address or os.environ.get("RAY_ADDRESS")


def keep_local_ray_on_loopback() -> None:
    """Ray decides which address a local node advertises when ``ray`` is first imported: keep an
    embedded (local) Ray on loopback even when a library imports ray before sepit starts it.  When
    joining a cluster (``RAY_ADDRESS`` set) nothing is changed: its nodes must see our real address."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def set_local_defaults() -> None:
    """Set loopback/offline environment defaults; never overrides what the user set."""
    keep_local_ray_on_loopback()
    for k, v in _LOCAL_ENV.items():
        if v and k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":
            os.environ.setdefault(k, v)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:  # pragma: no cover
        pass


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join ``address`` (or ``RAY_ADDRESS``) if given, else start a small local Ray on loopback.

    ``num_cpus`` sets the *logical* CPU count of a local Ray; it may exceed the physical cores so
    that a data pipeline and training workers do not starve each other (docs/environment.md).
    """
    global _OWN_ADDRESS
    set_local_defaults()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if _OWN_ADDRESS and os.environ.get("RAY_ADDRESS") == _OWN_ADDRESS:
        # The local Ray we started earlier in this process is gone (ray.shutdown()).
        del os.environ["RAY_ADDRESS"]
        _OWN_ADDRESS = None
    address = cluster_address(address)
    if address:
        return ray.init(address=address, **kwargs)
    # One local node: there is no other node to drain, so Ray Train's preemption watcher (an
    # actor process per training run, seconds of CPU each) has nothing to watch.  Set before
    # ray.init so the raylet, and with it every training controller, inherits it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("object_store_memory", 256 * 1024 * 1024)
    kwargs.setdefault("log_to_driver", True)
    ctx = ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    # Processes Ray libraries spawn without an address (e.g. Ray Train's placement-group cleaner)
    # would otherwise refuse to pick among several local Ray instances on one machine.
    _OWN_ADDRESS = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = _OWN_ADDRESS
    return ctx


_OWN_ADDRESS: str | None = None


def set_quiet_worker_env() -> dict[str, str | None]:
    """Keep Ray Data's progress bars off in the workers of a local Ray started after this call
    (environment defaults they inherit); returns the previous values, for the caller to restore."""
    previous = {k: os.environ.get(k) for k in _QUIET_ENV}
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    return previous


def set_data_progress_bars(enabled: bool) -> bool:
    """Turn Ray Data's progress bars on or off in this process; returns the previous setting."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = ctx.enable_progress_bars
    ctx.enable_progress_bars = enabled
    return previous


def train_worker_runtime_env() -> dict[str, Any]:
    """Runtime environment of Ray Train's workers: its print patch, which tees every print to its
    logger, is off (progress lines would show twice)."""
    return {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
