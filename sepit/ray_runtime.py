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
    set_local_defaults()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return ray.init(address=address, **kwargs)
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("object_store_memory", 256 * 1024 * 1024)
    kwargs.setdefault("log_to_driver", True)
    return ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
