"""continuous-backup under load, and a restore to a point an hour after a full snapshot.

Part `rpo`: a steady stream of single-key puts (about --rate per second, from threads on
this machine through etcd's own HTTPS gateway on the lab's masters) while continuous-backup
runs in its own process with its defaults (a segment every 10 s). Printed: the writes per
second reached, the recovery point (the age of the newest stored revision, sampled four
times a second) against the 10 s goal, and the capture process's CPU and memory over the run
(flat in the history's length?) beside the masters' own CPU in the same time.

Part `restore`: a full snapshot of --mb MB (a backup set), then an hour of history at 1,000
writes/s (--hour-revisions, 3.6 million by default) written to the store as the capture
writes it (signed segments of 10 s), but generated here: a real hour of load would take an
hour. Kubernetes-like: a working set of keys overwritten again and again, some deleted and
made again. Then restore-etcd-cluster twice: from the set (the baseline), and to the
revision an hour later. Printed: both times, their ratio, and where the point's time went.

    .venv/bin/python bench/history.py --part rpo [--seconds 300] [--rate 1000]
    .venv/bin/python bench/history.py --part restore [--mb 200] [--hour-revisions 3600000]
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from common import cpu_seconds, fill, free_port, parse  # noqa: E402  (sets up sys.path first)
from lab.lab import Lab  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NO_STARVAULT = {"INCLUDE_STARVAULT_DB_BACKUP": False}


def prefect_server(home: Path) -> subprocess.Popen:
    """Prefect's own server (SQLite), for this process and the capture's."""
    port = free_port()
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    log = open(home / "prefect-server.log", "ab")
    p = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                          "--port", str(port)], stdout=log, stderr=log, start_new_session=True,
                         env=dict(os.environ, PREFECT_HOME=str(home / "prefect")))
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("prefect server did not start")
        time.sleep(0.5)


def signing_block(home: Path) -> tuple[str, str]:
    from blocks.storage import BackupSigningKey

    key = home / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    BackupSigningKey(private_key=key.read_text()).save("bench-signing", overwrite=True)
    return "bench-signing", Path(f"{key}.pub").read_text().strip()


class Writer:
    """Single-key puts at about `rate` per second, through etcd's JSON gateway (one HTTPS
    connection per thread); every answer's revision and when it came."""

    def __init__(self, lab: Lab, rate: float, threads: int = 8):
        env = lab.etcdctl_env()
        self.ctx = ssl.create_default_context(cafile=env["ETCDCTL_CACERT"])
        self.ctx.load_cert_chain(env["ETCDCTL_CERT"], env["ETCDCTL_KEY"])
        self.endpoints = [urlsplit(e) for e in env["ETCDCTL_ENDPOINTS"].split(",")]
        self.rate, self.threads = rate, threads
        self.at: dict[int, float] = {}
        self.stop = threading.Event()
        self.errors = 0
        self.ts = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def start(self):
        self.t0 = time.time()
        for t in self.ts:
            t.start()

    def run(self, i: int):
        ep = self.endpoints[i % len(self.endpoints)]
        conn = http.client.HTTPSConnection(ep.hostname, ep.port, context=self.ctx, timeout=30)
        r = random.Random(i)
        n, every = 0, self.threads / self.rate
        while not self.stop.is_set():
            wait = self.t0 + n * every - time.time()
            if wait > 0:
                time.sleep(wait)
            n += 1
            key = f"/registry/{r.choice(['pods', 'leases', 'events', 'configmaps'])}/ns{r.randrange(50)}/o{r.randrange(5000)}"
            body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                               "value": base64.b64encode(os.urandom(150).hex().encode()).decode()})
            try:
                conn.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
                doc = json.loads(conn.getresponse().read())
                self.at[int(doc["header"]["revision"])] = time.time()
            except (OSError, http.client.HTTPException, KeyError, ValueError):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPSConnection(ep.hostname, ep.port, context=self.ctx, timeout=30)

    def halt(self):
        self.stop.set()
        for t in self.ts:
            t.join(30)


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), rss


def newest_stored(store: Path) -> int:
    from core.history import parse_segment_name

    lasts = [s.last for s in map(parse_segment_name, os.listdir(store)) if s]
    return max(lasts, default=0)


def part_rpo(lab: Lab, inv: str, store: Path, seconds: float, rate: float) -> None:
    from flows.backup import backup_master_nodes

    backup_master_nodes(inventory=inv, store=str(store), **NO_STARVAULT)
    code = ("from flows.continuous import continuous_backup as c; "
            f"c(inventory={inv!r}, store={str(store)!r}, run_minutes={(seconds + 60) / 60!r}, "
            f"backup_parameters={NO_STARVAULT!r})")
    log = open(store.parent / "capture.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True, stdout=log, stderr=log)
    writer = Writer(lab, rate)
    try:
        deadline = time.monotonic() + 90
        while newest_stored(store) == 0 and time.monotonic() < deadline:  # the capture is running
            lab.etcdctl("put", "/bench/warm", "x")
            time.sleep(1)
        net = lab.state()["net"]
        c0, m0, t0 = proc_cpu_rss(proc.pid)[0], cpu_seconds(net)["masters"], time.monotonic()
        writer.start()
        rpo, mem = [], []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.25)
            last = newest_stored(store)
            if last in writer.at and time.monotonic() - t0 > 15:  # after the first segment of the load
                rpo.append(time.time() - writer.at[last])
            mem.append((time.monotonic() - t0, proc_cpu_rss(proc.pid)[1]))
        c1, m1, t1 = proc_cpu_rss(proc.pid)[0], cpu_seconds(net)["masters"], time.monotonic()
        writes = len(writer.at)
    finally:
        writer.halt()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    rpo.sort()
    wall = t1 - t0
    print(f"\ncontinuous-backup under load, {wall:.0f} s, 3 masters")
    print(f"{'writes per second reached':34} {writes / wall:8.0f}   (asked {rate:g}; {writer.errors} failed)")
    print(f"{'recovery point p50 / p95 / max':34} {rpo[len(rpo) // 2]:5.2f} / {rpo[int(len(rpo) * .95)]:5.2f} / "
          f"{rpo[-1]:5.2f} s   ({len(rpo)} samples)")
    print(f"{'ratio max / goal (10 s)':34} {rpo[-1] / 10:8.2f} x")
    cpu = c1 - c0
    print(f"{'capture process CPU':34} {cpu:8.1f} s  = {100 * cpu / wall:.0f}% of a core; "
          f"{1000 * cpu / max(1, writes):.2f} s per 1000 revisions")
    print(f"{'ratio capture CPU / masters CPU':34} {cpu / max(1e-9, m1 - m0):8.2f} x  (3 masters: {m1 - m0:.0f} s)")
    at = lambda f: next(r for t, r in mem if t >= f * wall)  # noqa: E731
    print(f"{'capture RSS at 20% / 50% / end':34} {at(.2) >> 20} / {at(.5) >> 20} / {mem[-1][1] >> 20} MiB "
          f"(ratio end / 20%: {mem[-1][1] / at(.2):.2f} x)")
    print(f"{'stored':34} {sum(p.stat().st_size for p in store.iterdir() if p.name.startswith('etcd-history_')) / 1e6:8.1f} "
          f"MB in {sum(1 for p in store.iterdir() if p.name.startswith('etcd-history_'))} segments")


def synthetic_history(store: Path, base_rev: int, base_at: float, revisions: int, seal, per_segment: int = 10_000):
    """An hour of Kubernetes-like history after `base_rev`, stored as the capture stores it."""
    from core.history import DELETE, PUT, Event, Revision, encode_segment

    r = random.Random(1)
    keys = [f"/registry/{kind}/ns{i % 50}/o{i}" for kind in ("pods", "leases", "events", "configmaps")
            for i in range(5000)]
    last: dict[str, int] = {}
    rev, made = base_rev, 0
    while made < revisions:
        revs = []
        for _ in range(min(per_segment, revisions - made)):
            rev += 1
            key = r.choice(keys)
            kb = base64.b64encode(key.encode()).decode()
            prev = last.get(key, 0)
            if prev and r.random() < 0.05:
                ev, last[key] = Event(DELETE, kb, "", 0, prev), 0
            else:
                value = base64.b64encode(r.randbytes(150).hex().encode()).decode()
                ev, last[key] = Event(PUT, kb, value, 0, prev), rev
            revs.append(Revision(rev, base_at + (rev - base_rev) / 1000, (ev,)))
            made += 1
        name, data = encode_segment(revs, {}, seal)
        (store / name).write_bytes(data)
    return rev


def home_of(store: Path) -> Path:
    return store.parent


def part_restore(lab: Lab, inv: str, store: Path, mb: int, revisions: int, key_file: Path) -> None:
    from core.signing import private_key, seal_segment
    from flows.backup import backup_master_nodes
    from flows.restore import restore_etcd_cluster

    fill(lab, mb)
    out = backup_master_nodes(inventory=inv, store=str(store), **NO_STARVAULT)
    etcd = next(f for f in out["files"] if f["kind"] == "etcd")
    t = time.monotonic()
    target = synthetic_history(store, etcd["status"]["revision"], etcd["saved_at"], revisions,
                               seal_segment(private_key(key_file.read_text(), None, "bench")))
    print(f"(an hour of history, {revisions} revisions, generated in {time.monotonic() - t:.0f} s)")
    t = time.monotonic()
    restore_etcd_cluster(inventory=inv, store=str(store), backup="latest", auto_approve=True)
    full = time.monotonic() - t
    from core.inventory import load_inventory_file
    from tasks.point import build_point
    from tasks.storage import open_store

    t = time.monotonic()  # what the restore below does first, on its own: where its time goes
    build_point(open_store(str(store)), load_inventory_file(Path(inv)), home_of(store) / "built", revision=target)
    build = time.monotonic() - t
    t = time.monotonic()
    restore_etcd_cluster(inventory=inv, store=str(store), revision=target, auto_approve=True)
    to_point = time.monotonic() - t
    print(f"\nrestore-etcd-cluster, {mb} MB full snapshot, 3 masters")
    print(f"{'from the full snapshot (baseline)':34} {full:7.1f} s")
    print(f"{'to a revision one hour later':34} {to_point:7.1f} s   (building the point alone: {build:.1f} s)")
    print(f"{'ratio point / full':34} {to_point / full:7.2f} x")


def main():
    args = parse(203, part="rpo", seconds=300.0, rate=1000.0, hour_revisions=3_600_000, mb=200)
    home = Path(tempfile.mkdtemp(prefix="nova-dr-bench-history-"))
    server = prefect_server(home)
    lab = Lab(home / "lab")
    done = False
    try:
        block, pub = signing_block(home)
        lab.up(masters=args.masters, net=args.net, signer=(block, pub))
        store = home / "store"
        store.mkdir()
        inv = str(lab.dir / "inventory.yaml")
        if args.part == "rpo":
            part_rpo(lab, inv, store, args.seconds, args.rate)
        else:
            part_restore(lab, inv, store, args.mb, args.hour_revisions, home / "id_ed25519")
        lab.destroy()
        done = True
    except BaseException:
        lab.down()
        print(f"benchmark failed; its files are kept in {home}")
        raise
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # the runs' last logs reach the server before it stops
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    if done:
        shutil.rmtree(home, ignore_errors=True)  # its own temporary dir: the store, the server's files


if __name__ == "__main__":
    main()
