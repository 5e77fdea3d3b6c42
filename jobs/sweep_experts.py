"""Entry point for `ray job submit --working-dir . -- python jobs/sweep_experts.py --init STAGE1 --data DATA --out DIR [key=value ...]`.

Thin on purpose: everything is `sepit sweep-experts` (sepit/tune/sweep.py).  The repository root
(the job's working directory) goes first on sys.path so the submitted code is the code that runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

from sepit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep-experts", *sys.argv[1:]]))
