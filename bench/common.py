"""What the benchmarks share: a lab filled quickly, and the peak memory of this process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("NOVA_DR_HOME", tempfile.mkdtemp(prefix="nova-dr-bench-"))

from lab.lab import Lab, etcd_bin_dir  # noqa: E402


def fill(lab: Lab, mb: int) -> None:
    """1 MiB values (under etcd's 1.5 MiB request limit), so filling is quick."""
    value = Path(tempfile.mkstemp()[1])
    value.write_bytes(os.urandom(1 << 20))
    for i in range(mb):
        with open(value, "rb") as f:
            subprocess.run([str(etcd_bin_dir() / "etcdctl"), "put", f"/registry/bench/{i:05d}"], stdin=f,
                           env=lab.etcdctl_env(), check=True, capture_output=True)
    value.unlink()


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class PeakRSS:
    """This process's resident memory, sampled every 20 ms while the block runs: the peak
    above where it started (what a run costs, not what the interpreter already held)."""

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, rss())

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.start


def timed(fn, *args, **kw) -> float:
    t0 = time.monotonic()
    fn(*args, **kw)
    return time.monotonic() - t0
