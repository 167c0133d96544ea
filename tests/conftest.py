"""Shared fixtures: a real Prefect server on a loopback port (one per session), and labs of
real masters (sshd + etcd 3.5 with TLS) on loopback addresses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import PREFECT_PORT, ROOT, make_lab, stop_shared_s3


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """`prefect server start` with SQLite in a temporary dir, stopped by PID at the end."""
    log = open(ROOT / "prefect-server.log", "ab")
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
            raise RuntimeError(f"prefect server did not start; see {ROOT / 'prefect-server.log'}")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{PREFECT_PORT}/api"
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the last run logs reach the server before it stops
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
    stop_shared_s3()
    shutil.rmtree(ROOT, ignore_errors=True)


@pytest.fixture
def lab3():
    lab = make_lab(3)
    yield lab
    lab.destroy()


@pytest.fixture
def lab_factory():
    labs = []

    def make(n: int, sudo_password: bool = False, bastion: bool = False, real_hosts: bool | None = None):
        labs.append(make_lab(n, sudo_password, bastion, real_hosts))
        return labs[-1]

    yield make
    for lab in labs:
        lab.destroy()


@pytest.fixture
def fake_kube():
    """The wire-level fake API server (tests/fakekube), with the real Velero and Flux CRDs."""
    from tests.fakekube import FakeKube
    from tests.helpers import register_crds

    fake = FakeKube().start()
    register_crds(fake)  # none where ../shared is absent: tests that need them skip
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    """The session's real S3 server (SeaweedFS), for the tests that act as Velero's bucket."""
    from tests.helpers import shared_s3

    return shared_s3()
