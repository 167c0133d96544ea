"""Prefect as the distributed engine, for the fleet tests: a real PostgreSQL (Debian's, run as
its own user in a private directory, as LAB.md measured), a `prefect server` on it, and
process workers. Every process is ours, started here and stopped by pid."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("no PostgreSQL here: the Makefile installs postgresql-15 (make deps)")
    return found[-1]


class Postgres:
    """initdb and pg_ctl as the `postgres` user (it refuses to run as root), listening on
    loopback only, its socket in its own directory."""

    def __init__(self):
        # Its own top-level directory: the tests' folders are 0700 root, which `postgres` cannot enter.
        root = Path(tempfile.mkdtemp(prefix="nova-dr-pg-"))
        shutil.chown(root, "postgres", "postgres")
        self.root, self.port = root, free_port()
        self._as_postgres(_pg_bin("initdb"), "-D", f"{root}/data", "-A", "trust", "-U", "postgres")
        self._as_postgres(_pg_bin("pg_ctl"), "-D", f"{root}/data", "-o",
                          f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1", "-l", f"{root}/log", "-w", "start")
        self._as_postgres(_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "prefect")
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def _as_postgres(self, *argv: str) -> None:
        # runuser, not su: no PAM session, no login shell; the argv is passed as it is
        p = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=120,
                           cwd=self.root)
        if p.returncode:
            raise RuntimeError(f"{Path(argv[0]).name}: exit {p.returncode}: {p.stderr[-2000:]}")

    def stop(self) -> None:
        try:
            self._as_postgres(_pg_bin("pg_ctl"), "-D", f"{self.root}/data", "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


def stop_group(p: subprocess.Popen, grace: float = 30) -> None:
    """TERM to the process group we started (start_new_session), then KILL."""
    if p.poll() is not None:
        return
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


class Server:
    """`prefect server start` on the given database, on a free loopback port."""

    def __init__(self, root: Path, database_url: str):
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_SERVER_API"))}
        self.env.update(PREFECT_HOME=str(root / "home"), PREFECT_API_DATABASE_CONNECTION_URL=database_url,
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=self.api)
        self.proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=self.env, stdout=open(root / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not _alive(self.proc) or time.monotonic() > deadline:
                raise RuntimeError((root / "server.log").read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        stop_group(self.proc)


def start_worker(server: Server, pool: str, name: str, home: Path, log: Path, **env: str) -> subprocess.Popen:
    """A process worker, one flow run at a time, with a disk of its own (NOVA_DR_HOME, cwd)."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name",
                             name, "--limit", "1"], cwd=home,
                            env={**server.env, "NOVA_DR_HOME": str(home / "nova-dr"), **env},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def runs_on(worker: subprocess.Popen) -> set[str]:
    """The flow runs a worker's processes run now: PREFECT__FLOW_RUN_ID in their environment
    (its log is no witness: a worker that lost the race for a run logs that run's id too)."""
    out = set()
    for pid in descendants(worker.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        out |= {e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"PREFECT__FLOW_RUN_ID=")}
    return out
