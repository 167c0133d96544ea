"""Shared fixtures: a real Prefect server on a loopback port (one per session), and labs of
real masters (sshd + etcd 3.5 with TLS) on loopback addresses.

The environment is set before Prefect is imported anywhere: Prefect reads its settings once.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="nova-dr-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFECT_PORT = _free_port()
os.environ.update(
    PREFECT_HOME=str(_ROOT / "prefect"),
    PREFECT_API_URL=f"http://127.0.0.1:{PREFECT_PORT}/api",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    NOVA_DR_HOME=str(_ROOT / "nova-dr"),
)

from lab.lab import Lab  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_nets = itertools.count(100)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """`prefect server start` with SQLite in a temporary dir, stopped by PID at the end."""
    log = open(_ROOT / "prefect-server.log", "ab")
    p = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                          "--port", str(PREFECT_PORT)], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=dict(os.environ, PREFECT_SERVER_LOGGING_LEVEL="WARNING"))
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{PREFECT_PORT}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not start; see {_ROOT / 'prefect-server.log'}")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{PREFECT_PORT}/api"
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
    shutil.rmtree(_ROOT, ignore_errors=True)


def make_lab(masters: int) -> Lab:
    net = next(_nets)
    lab = Lab(_ROOT / f"lab-{net}")
    lab.up(masters=masters, net=net)
    return lab


@pytest.fixture
def lab3():
    lab = make_lab(3)
    yield lab
    lab.destroy()


@pytest.fixture
def lab_factory():
    labs = []

    def make(n: int) -> Lab:
        labs.append(make_lab(n))
        return labs[-1]

    yield make
    for lab in labs:
        lab.destroy()


def put_keys(lab: Lab, prefix: str, n: int) -> None:
    """Write n keys with etcdctl `txn` from the host, 100 puts per transaction."""
    lines = []
    for i in range(n):
        lines.append(f'put {prefix}{i:05d} "value-{i}"')
    for start in range(0, n, 100):
        body = "\n".join(lines[start:start + 100])
        p = subprocess.run([str(_etcdctl()), "txn"], input=f"\n{body}\n\n\n", env=lab.etcdctl_env(),
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr


def _etcdctl() -> Path:
    from lab.lab import etcd_bin_dir

    return etcd_bin_dir() / "etcdctl"


def keys_on(lab: Lab, member: str, prefix: str = "/") -> list[str]:
    """Keys as one member alone serves them (serializable read aimed at that member)."""
    m = lab.master(member)
    p = lab.etcdctl("get", prefix, "--prefix", "--keys-only", "--consistency=s",
                    endpoints=[f"https://{m.address}:2379"])
    return [k for k in p.stdout.splitlines() if k]


def snapshot(lab: Lab, path: Path, member: str = "etcd1") -> Path:
    m = lab.master(member)
    lab.etcdctl("snapshot", "save", str(path), endpoints=[f"https://{m.address}:2379"])
    return path
