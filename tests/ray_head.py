"""A real Ray head node for `ray job submit` tests: `ray start --head --block` on loopback.

Every port is chosen free, the node gets its own short temp dir (Ray's socket paths must fit in
107 bytes), and it is stopped by signalling the process group it was started in: `ray stop`
would stop every Ray on the machine, including other people's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN_DIR = Path(sys.executable).parent
RAY_CLI = str(BIN_DIR / "ray")


@dataclass
class Head:
    address: str  # the dashboard / job-submission address
    env: dict[str, str]  # environment for `ray job submit` (no RAY_ADDRESS, loopback only)


def free_ports(n: int) -> list[int]:
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


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
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


def wait_for_agent(port: int, head: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """The job agent (in the dashboard agent, on its HTTP port) comes up after the dashboard; a
    job submitted before it is refused with "No available agent to submit job"."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            return
        time.sleep(1.0)
    raise AgentNotUp(f"the head node's dashboard agent did not listen on {port} within {timeout} s")


class AgentNotUp(RuntimeError):
    pass


def stop(head: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
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


def _start(log: Path, num_cpus: int, object_store_bytes: int) -> tuple[subprocess.Popen, str, dict[str, str], str]:
    gcs, dash, nm, om, agent_http, agent_grpc, runtime_env, metrics, client = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
         f"--object-store-memory={object_store_bytes}", "--disable-usage-stats"],
        env=env, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(address, head, log)
        wait_for_agent(agent_http, head, log)
    except BaseException:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return head, address, env, temp_dir


@contextlib.contextmanager
def ray_head(log: Path, num_cpus: int, object_store_bytes: int, attempts: int = 3) -> Iterator[Head]:
    """Start a head node (its output goes to ``log``), yield its address, stop it.

    The ports are chosen free but bound only when Ray starts: another process on the machine
    (another Ray, under ``pytest -n``) can take one in between, and the agent then never comes
    up; such a start is retried on new ports."""
    for attempt in range(1, attempts + 1):
        try:
            head, address, env, temp_dir = _start(log, num_cpus, object_store_bytes)
            break
        except AgentNotUp:
            if attempt == attempts:
                raise
    try:
        yield Head(address=address, env=env)
    finally:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
