"""Entry point for `ray job submit --working-dir . -- python jobs/serve.py --model DIR [--detach]`.

Thin on purpose: everything is `sepit serve` (sepit/serve/app.py).  Under `ray job submit` the
job joins the cluster (RAY_ADDRESS); with `--detach` it deploys and exits while the Serve
application keeps running on the cluster.  The repository root (the job's working directory)
goes first on sys.path so the submitted code is the code that runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

from sepit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
