"""Entry point for `ray job submit --working-dir . -- python jobs/evaluate.py --model DIR --data DATA --out DIR`.

Thin on purpose: everything is `sepit evaluate` (sepit/evaluation/run.py).  Under `ray job
submit` the job joins the cluster (RAY_ADDRESS) and the model replicas are spread over it
(`--replicas N --gpus-per-replica 1`).  The repository root (the job's working directory) goes
first on sys.path so the submitted code is the code that runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

from sepit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
