"""Test helpers and the test environment, imported once (as tests.helpers) by conftest and tests.

The environment is set before Prefect is imported anywhere: Prefect reads its settings once.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="nova-dr-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFECT_PORT = _free_port()
os.environ.update(
    PREFECT_HOME=str(ROOT / "prefect"),
    PREFECT_API_URL=f"http://127.0.0.1:{PREFECT_PORT}/api",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    NOVA_DR_HOME=str(ROOT / "nova-dr"),
)

from lab.lab import Lab, etcd_bin_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_nets = itertools.count(int(os.environ.get("NOVA_DR_TEST_NET", "100")))  # 127.0.NET.x per lab


def make_lab(masters: int) -> Lab:
    """A fresh lab on its own 127.0.NET.x addresses."""
    net = next(_nets)
    lab = Lab(ROOT / f"lab-{net}")
    lab.up(masters=masters, net=net)
    return lab


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
