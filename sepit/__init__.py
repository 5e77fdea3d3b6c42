"""sepit: build, train, sweep, evaluate and serve structure-enhanced protein language models."""

from sepit.ray_runtime import keep_local_ray_on_loopback as _keep_local_ray_on_loopback

__version__ = "0.1.0"

_keep_local_ray_on_loopback()  # before any library imports ray
