"""`ray job submit --working-dir . -- python jobs/preprocess.py ...` against a real local head node
(a head node of its own, started and stopped by this test, see ``ray_head.py``: so it can run on the
other xdist worker than the tiny-pipeline tests, which share the session head node)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sepit.structure import parse_file
from sepit.structure.store import ProteinStore

from ray_head import RAY_CLI, ray_head

REPO = Path(__file__).resolve().parents[1]
INPUTS = ["sepit/resources/data/biotite_testdata", "sepit/resources/data/esm_examples"]


@pytest.mark.slow
def test_ray_job_submit_runs_preprocess_on_a_local_head_node(tmp_path):
    out = tmp_path / "store"
    with ray_head(tmp_path / "head.log", num_cpus=2, object_store_bytes=100_000_000) as head:
        job = subprocess.run(
            [RAY_CLI, "job", "submit", "--address", head.address, "--working-dir", str(REPO), "--",
             "python", "jobs/preprocess.py", *INPUTS, "--out", str(out), "--workers", "2", "--summary"],
            env=head.env, cwd=REPO, capture_output=True, text=True, timeout=400,
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
