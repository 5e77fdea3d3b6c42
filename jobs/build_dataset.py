"""Entry point for `ray job submit --working-dir . -- python jobs/build_dataset.py --proteins STORE --out DIR`.

Thin on purpose: everything is `sepit build-dataset` (sepit/data/build.py).  The repository root
(the job's working directory) goes first on sys.path so the submitted code is the code that runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sepit.ray_runtime import set_local_defaults  # noqa: E402

set_local_defaults()

from sepit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["build-dataset", *sys.argv[1:]]))
