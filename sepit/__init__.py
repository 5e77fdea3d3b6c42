"""sepit: build, train, sweep, evaluate and serve structure-enhanced protein language models."""

import os as _os

__version__ = "0.1.0"

# Ray decides which address a local node advertises when `ray` is first imported; keep an
# embedded (local) Ray on loopback even when a library imports ray before sepit starts it.
# Under `ray job submit` / an explicit cluster (RAY_ADDRESS set) nothing is changed.
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
