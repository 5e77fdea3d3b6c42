"""The one place that starts or joins Ray, with safe local defaults.

Local runs bind every listener to loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray
from advertising the machine's network address) and turn Ray's token auth off for the embedded
default.  Under ``ray job submit`` (``RAY_ADDRESS`` set by the job) we join the cluster as is.
"""

from __future__ import annotations

import os

_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", ""),
}


def set_local_defaults() -> None:
    """Set loopback/offline environment defaults; never overrides what the user set."""
    for k, v in _LOCAL_ENV.items():
        if k == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" and os.environ.get("RAY_ADDRESS"):
            continue  # joining a cluster: its nodes must see our real address
        if v:
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
    that a data pipeline and training workers do not starve each other (see ENVIRONMENT notes).
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
    address = address or os.environ.get("RAY_ADDRESS")
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
