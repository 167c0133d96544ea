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
if "NOVA_DR_HOME" not in os.environ:  # the runs' checkpoints and locks: this run's own, gone with it
    import atexit
    import shutil

    os.environ["NOVA_DR_HOME"] = tempfile.mkdtemp(prefix="nova-dr-bench-")
    atexit.register(shutil.rmtree, os.environ["NOVA_DR_HOME"], True)

from lab.lab import Lab, etcd_bin_dir, free_port  # noqa: E402


def value(seed: int) -> bytes:
    """About 1 MiB (under etcd's 1.5 MiB request limit) of what Kubernetes keeps in etcd:
    small JSON objects with random names, uids, versions and tokens. It compresses about 4x
    with gzip, as real control-plane data does; random bytes would not compress at all and
    would hide what sending compressed bytes saves on a slow link."""
    import base64
    import json
    import random

    r, out, size = random.Random(seed), [], 0
    while size < (1 << 20) - 4096:
        uid = "%08x-%04x-%04x-%04x-%012x" % tuple(r.getrandbits(b) for b in (32, 16, 16, 16, 48))
        obj = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": f"app-{r.getrandbits(24):06x}", "uid": uid,
                            "namespace": r.choice(["default", "kube-system", "payments", "web"]),
                            "resourceVersion": str(r.randrange(10**6, 10**8)),
                            "labels": {"app": r.choice(["web", "api", "db"]), "tier": "backend"}},
               "data": {"token": base64.b64encode(r.randbytes(18)).decode(),
                        "config": f"replicas={r.randrange(1, 9)}\nport={r.randrange(1000, 9999)}\n"}}
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()


def fill(lab: Lab, mb: int, start: int = 0) -> None:
    """`mb` values of about 1 MiB each (see `value`), so filling is quick. `start` numbers the
    keys on from an earlier fill."""
    values = []
    for seed in range(8):
        p = Path(tempfile.mkstemp()[1])
        p.write_bytes(value(seed))
        values.append(p)
    for i in range(start, start + mb):
        with open(values[i % 8], "rb") as f:
            subprocess.run([str(etcd_bin_dir() / "etcdctl"), "put", f"/registry/bench/{i:05d}"], stdin=f,
                           env=lab.etcdctl_env(), check=True, capture_output=True)
    for p in values:
        p.unlink()


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


def busy(intervals) -> float:
    """Seconds during which at least one command was running (the union of the intervals)."""
    total, end = 0.0, float("-inf")
    for a, b, *_ in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _pools_keep_context() -> None:
    """Count the SSH commands of a step's own fan-out (a thread pool inside it) as the step's:
    the stdlib's pools do not carry contextvars (Prefect's task context) into their threads.
    For the benchmarks' accounting only."""
    import concurrent.futures
    import contextvars

    submit = concurrent.futures.ThreadPoolExecutor.submit
    if getattr(submit, "_keeps_context", False):
        return

    def keeping(self, fn, /, *args, **kwargs):
        return submit(self, contextvars.copy_context().run, fn, *args, **kwargs)

    keeping._keeps_context = True
    concurrent.futures.ThreadPoolExecutor.submit = keeping


_pools_keep_context()


def step_kind(name: str) -> str:
    """A step's kind, without its master ("copy-snapshot@etcd2" -> "copy-snapshot") or the
    suffix Prefect gives a task run of a plain task ("preflight-3f2" -> "preflight")."""
    import re

    if not name:
        return "(flow: lock, outside steps)"
    return name.split("@", 1)[0] if "@" in name else re.sub(r"-[0-9a-f]{3}$", "", name)


def cpu_seconds(net: int) -> dict[str, float]:
    """CPU seconds used so far: this process (the flow, its SSH and hashing), its children by
    kind (Prefect's server, the delaying forwarders) and every lab master (its cgroup: etcd,
    sshd, the commands run there)."""
    tick = os.sysconf("SC_CLK_TCK")
    t = os.times()
    out = {"flow process": t.user + t.system, "Prefect server": 0.0, "forwarders": 0.0, "masters": 0.0}
    me = str(os.getpid())
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[1] != me:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        kind = "forwarders" if "lab.links" in cmd else "Prefect server" if "prefect" in cmd or "uvicorn" in cmd else None
        if kind:
            out[kind] += (int(stat[11]) + int(stat[12])) / tick
    for g in Path("/sys/fs/cgroup/cpuacct").glob(f"lab-n{net}-*"):
        out["masters"] += int((g / "cpuacct.usage").read_text()) / 1e9
    return out


class FlowTimes:
    """Wall time of each flow run, its orchestration overhead (the wall time during which no
    SSH command was running anywhere: Prefect, planning, Python, local hashing), the bytes
    that crossed the link, and the SSH commands of each kind of step (each costs at least two
    round trips: the channel's open and the command's end)."""

    def __init__(self, link: "Link | None" = None):
        self.link = link
        self.walls: list[float] = []
        self.overheads: list[float] = []
        self.bytes: list[int] = []
        self.commands: dict[str, int] = {}
        self.step_seconds: dict[str, float] = {}
        self.slowest: list[tuple[float, str, str]] = []  # of the last run: (seconds, step, command)
        self.cpu: list[dict[str, float]] = []

    def run(self, fn, *args, **kw) -> float:
        from tasks.remote import record_commands

        b0 = self.link.bytes() if self.link else 0
        c0 = cpu_seconds(self.link.lab.state()["net"]) if self.link else {}
        with record_commands() as log:
            wall = timed(fn, *args, **kw)
        if self.link:
            c1 = cpu_seconds(self.link.lab.state()["net"])
            self.cpu.append({k: c1[k] - c0[k] for k in c1})
        self.walls.append(wall)
        self.overheads.append(wall - busy(log))
        self.bytes.append(self.link.bytes() - b0 if self.link else 0)
        self.commands, by_kind = {}, {}
        for t0, t1, step, _ in log:
            self.commands[step_kind(step)] = self.commands.get(step_kind(step), 0) + 1
            by_kind.setdefault(step_kind(step), []).append((t0, t1))
        # The wall time during which some command of each kind ran (overlapping ones once).
        self.step_seconds = {k: busy(v) for k, v in by_kind.items()}
        self.slowest = sorted(((t1 - t0, step_kind(step), what) for t0, t1, step, what in log), reverse=True)[:6]
        return wall


class Timed:
    """Wall times and link bytes of a floor's runs."""

    def __init__(self, link: "Link | None" = None):
        self.link = link
        self.walls: list[float] = []
        self.bytes: list[int] = []

    def run(self, fn, *args, **kw) -> float:
        b0 = self.link.bytes() if self.link else 0
        wall = timed(fn, *args, **kw)
        self.walls.append(wall)
        self.bytes.append(self.link.bytes() - b0 if self.link else 0)
        return wall


def prefect_costs(tasks: int = 20) -> tuple[float, float]:
    """Prefect's own costs on this machine, measured in this process: an empty flow's run, and
    each task of a chain of no-op tasks (created, run, result kept, as our steps are)."""
    import statistics

    from prefect import flow, task

    @task(persist_result=False)
    def noop(x):
        return x

    @flow(name="bench-empty")
    def empty():
        return None

    @flow(name="bench-chain")
    def chain():
        x = 0
        for _ in range(tasks):
            x = noop.submit(x).result()
        return x

    base = statistics.median(timed(empty) for _ in range(3))
    per_task = (statistics.median(timed(chain) for _ in range(3)) - base) / tasks
    return base, per_task


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

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.lab.destroy()
        else:  # keep the masters' logs for a look
            self.lab.down()
            print(f"benchmark failed; the lab's files are kept in {self.lab.dir}")


def report(title: str, floors: dict[str, "Timed"], flow_name: str, flows: FlowTimes, goal: str) -> dict:
    """Medians of every floor and of the flow, the flow's ratio to each floor, and where the
    flow's time and round trips went. Returns the medians by name."""
    import statistics

    med = {name: statistics.median(t.walls) for name, t in floors.items()}
    g = med[flow_name] = statistics.median(flows.walls)
    print(f"\n{title}, median of {len(flows.walls)}")
    for name, t in [*floors.items(), (flow_name, flows)]:
        mb = f"{statistics.median(t.bytes) / 1e6:8.1f} MB on the link" if any(t.bytes) else ""
        print(f"{name:34} {med[name]:7.2f} s  {mb}   runs: {', '.join(f'{x:.2f}' for x in t.walls)}")
    for name in floors:
        print(f"{'ratio flow / ' + name:34} {g / med[name]:7.2f} x")
    print(f"{'goal':34} {goal}")
    o = statistics.median(flows.overheads)
    print(f"{'orchestration overhead':34} {o:7.2f} s  (no SSH command running: {100 * o / g:.0f}% of the flow)")
    print(f"{'SSH commands per kind of step':34} " + ", ".join(f"{k} {v}" for k, v in sorted(flows.commands.items())))
    print(f"{'seconds in commands, by step':34} " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(flows.step_seconds.items(), key=lambda kv: -kv[1])))
    print(f"{'slowest commands (last run)':34} " + ", ".join(f"{w or '?'} ({k}) {d:.2f}" for d, k, w in flows.slowest))
    if flows.cpu:
        print(f"{'CPU seconds of a flow run':34} " + ", ".join(
            f"{k} {statistics.median(c[k] for c in flows.cpu):.1f}" for k in flows.cpu[0]))
    return med


def report_prefect_costs() -> None:
    base, per_task = prefect_costs()
    print(f"{'Prefect: an empty flow run':34} {base:7.2f} s")
    print(f"{'Prefect: each task in a chain':34} {per_task * 1000:7.1f} ms")


# -- links like real ones, and the OpenSSH floors -----------------------------------------
FLOORS = Path(__file__).resolve().parent / "floors"


class Link:
    """The flow machine's link to the lab shaped to a profile of lab/links.py (bandwidth by tc
    on the lab's bridge, a round-trip time through delaying forwarders). Inside, `inventory`
    reaches the masters through it, and `floor(script, *args)` runs an OpenSSH floor the same
    way; `bytes()` counts what crossed the link."""

    def __init__(self, lab: Lab, profile: str):
        self.lab, self.profile = lab, profile
        self.forwarders = []

    def __enter__(self) -> "Link":
        import yaml

        from lab.links import PROFILES, DelayForwarder, shape

        mbit, rtt = PROFILES[self.profile]
        net = self.lab.state()["net"]
        if mbit:
            shape(net, mbit)
        inv = yaml.safe_load((self.lab.dir / "inventory.yaml").read_text())
        known = (self.lab.dir / "known_hosts").read_text().splitlines()
        self.ssh = {}  # member -> (host, port) the floor and the flow use
        for m in inv["masters"]:
            self.ssh[m["etcd_member"]] = (m["address"], 22)
            if rtt:
                fwd = DelayForwarder(free_port(), m["address"], 22, rtt / 2).__enter__()
                self.forwarders.append(fwd)
                key = next(line.split(" ", 1)[1] for line in known if line.split()[0] == m["address"])
                known.append(f"[127.0.0.1]:{fwd.listen_port} {key}")
                m.update(peer_url=f"https://{m['address']}:2380", client_url=f"https://{m['address']}:2379",
                         address="127.0.0.1", ssh_port=fwd.listen_port)
                self.ssh[m["etcd_member"]] = ("127.0.0.1", fwd.listen_port)
        (self.lab.dir / f"known_hosts-{self.profile}").write_text("\n".join(known) + "\n")
        inv["ssh"]["known_hosts_file"] = f"known_hosts-{self.profile}"
        self.inventory = self.lab.dir / f"inventory-{self.profile}.yaml"
        self.inventory.write_text(yaml.safe_dump(inv, sort_keys=False))
        self.masters = inv["masters"]
        return self

    def __exit__(self, *exc) -> None:
        from lab.links import unshape

        for f in self.forwarders:
            f.__exit__()
        unshape(self.lab.state()["net"])

    def bytes(self) -> int:
        from lab.links import link_bytes

        return link_bytes(self.lab.state()["net"])

    def floor(self, script: str, *args: str) -> None:
        from lab.accounts import USER

        lines = [f"{m['etcd_member']} {self.ssh[m['etcd_member']][0]} {self.ssh[m['etcd_member']][1]} "
                 f"{m.get('peer_url') or 'https://' + m['address'] + ':2380'} "
                 f"{m.get('client_url') or 'https://' + m['address'] + ':2379'}" for m in self.masters]
        env = {**os.environ, "FLOOR_KEY": str(self.lab.dir / "ssh/id_ed25519"),
               "FLOOR_KNOWN_HOSTS": str(self.lab.dir / f"known_hosts-{self.profile}"), "FLOOR_USER": USER,
               "FLOOR_MASTERS": "\n".join(lines)}
        p = subprocess.run(["bash", str(FLOORS / script), *args], env=env, capture_output=True, text=True,
                           timeout=3600)
        if p.returncode:
            raise RuntimeError(f"{script} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
