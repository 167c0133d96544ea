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


def parse(net: int, **defaults):
    """The options every benchmark takes (--masters, --mb, --runs, --net) plus its own."""
    import argparse

    ap = argparse.ArgumentParser()
    for name, value in {"masters": 3, "mb": 10, "runs": 3, "net": net, **defaults}.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return ap.parse_args()


class BenchLab:
    """A fresh lab for one benchmark, and Prefect's embedded server already started (its start
    is not what is measured)."""

    def __init__(self, masters: int, net: int):
        self.masters, self.net = masters, net

    def __enter__(self) -> Lab:
        from prefect import flow

        self.lab = Lab(Path(tempfile.mkdtemp(prefix="nova-dr-bench-lab-")))
        self.lab.up(masters=self.masters, net=self.net)
        flow(lambda: None, name="warm-up")()
        return self.lab

    def __exit__(self, *exc):
        self.lab.destroy()


def report(title: str, floor_name: str, flow_name: str, floors: list[float], flows: list[float], goal: str) -> None:
    import statistics

    f, g = statistics.median(floors), statistics.median(flows)
    print(f"\n{title}, median of {len(floors)}")
    print(f"{floor_name:32} {f:7.2f} s   runs: {', '.join(f'{x:.2f}' for x in floors)}")
    print(f"{flow_name:32} {g:7.2f} s   runs: {', '.join(f'{x:.2f}' for x in flows)}")
    print(f"{'ratio flow/floor':32} {g / f:7.2f} x   (goal: {goal})")
