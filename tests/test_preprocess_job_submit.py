"""`ray job submit --working-dir . -- python jobs/preprocess.py ...` against a real local head node.

The head node is started by this test (`ray start --head --block` on loopback, every port chosen
free, its own short temp dir) and stopped in a finally by signalling the process group it was
started in: `ray stop` would stop every Ray on the machine, including other people's.
"""

from __future__ import annotations

import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from sepit.structure import parse_file
from sepit.structure.store import ProteinStore

REPO = Path(__file__).resolve().parents[1]
INPUTS = ["sepit/resources/data/biotite_testdata", "sepit/resources/data/esm_examples"]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the head node's dashboard did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(head: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if head.poll() is not None:
            break
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # whatever Ray left in the process group we created (workers, agents)
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_ray_job_submit_runs_preprocess_on_a_local_head_node(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    gcs, dash, nm, om, agent_http, agent_grpc, runtime_env, metrics, client = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "head.log"
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
         "--object-store-memory=100000000", "--disable-usage-stats"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    out = tmp_path / "store"
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait_for_dashboard(address, head, log)
        job = subprocess.run(
            [ray_cli, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             "python", "jobs/preprocess.py", *INPUTS, "--out", str(out), "--workers", "2", "--summary"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=400,
        )
        output = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in output, output[-4000:]
        assert "Started a local Ray instance" not in output  # the job joined the head node
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    manifest = ProteinStore(out).manifest
    files = sorted(p for d in INPUTS for p in (REPO / d).iterdir())
    direct = [parse_file(p) for p in files]
    assert manifest["n_input_files"] == len(files)
    assert manifest["n_records"] == sum(len(r.records) for r in direct)
    assert manifest["n_rejected"] == sum(len(r.rejects) for r in direct)
    assert f"protein store: {manifest['n_records']} records" in output
    ProteinStore(out).verify()
