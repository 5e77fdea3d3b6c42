"""`ray job submit --working-dir . -- python jobs/preprocess.py ...` against a real local head node
(the session's ``ray_head_node``, see conftest.py and ``ray_head.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sepit.structure import parse_file
from sepit.structure.store import ProteinStore

from ray_head import RAY_CLI

REPO = Path(__file__).resolve().parents[1]
INPUTS = ["sepit/resources/data/biotite_testdata", "sepit/resources/data/esm_examples"]


@pytest.mark.slow
def test_ray_job_submit_runs_preprocess_on_a_local_head_node(ray_head_node, tmp_path):
    out = tmp_path / "store"
    job = subprocess.run(
        [RAY_CLI, "job", "submit", "--address", ray_head_node.address, "--working-dir", str(REPO), "--",
         "python", "jobs/preprocess.py", *INPUTS, "--out", str(out), "--workers", "2", "--summary"],
        env=ray_head_node.env, cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output, output[-4000:]
    assert "Started a local Ray instance" not in output  # the job joined the head node
    manifest = ProteinStore(out).manifest
    files = sorted(p for d in INPUTS for p in (REPO / d).iterdir())
    direct = [parse_file(p) for p in files]
    assert manifest["n_input_files"] == len(files)
    assert manifest["n_records"] == sum(len(r.records) for r in direct)
    assert manifest["n_rejected"] == sum(len(r.rejects) for r in direct)
    assert f"protein store: {manifest['n_records']} records" in output
    ProteinStore(out).verify()
