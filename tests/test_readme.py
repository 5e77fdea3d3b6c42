"""The README's promises: its two commands, .ci/run, the job scripts and the CLI it names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_commands() -> list[str]:
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    return [l.strip() for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    main_job, tests = _first_commands()
    assert main_job.endswith("sepit pipeline --preset small")
    assert tests.endswith("python -m pytest -q -n 2")  # 2 xdist workers (tests/conftest.py schedules them)
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_every_job_script_named_in_the_readme_exists_and_is_thin():
    jobs = set(re.findall(r"jobs/(\w+)\.py", README))
    assert {"preprocess", "build_dataset", "stage0", "stage1", "stage2", "evaluate", "serve", "sweep_experts"} <= jobs
    for name in jobs:
        path = ROOT / "jobs" / f"{name}.py"
        assert path.is_file(), path
        assert len(path.read_text().splitlines()) < 40, f"{path} should stay a thin entry point"


def test_cli_lists_every_readme_command_and_rejects_unknown_ones():
    out = subprocess.run([sys.executable, "-m", "sepit.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for cmd in re.findall(r"`sepit ([a-z0-9-]+)", README):
        assert cmd in out.stdout, cmd
    bad = subprocess.run([sys.executable, "-m", "sepit.cli", "trian"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
