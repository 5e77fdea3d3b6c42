"""Entry point for `ray job submit --working-dir . -- python jobs/stage2.py --config stage2.yaml ...`.

Thin on purpose: everything is `sepit stage2` (sepit/train/stage2.py).  The repository root
(the job's working directory) goes first on sys.path so the submitted code is the code that runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

from sepit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["stage2", *sys.argv[1:]]))
