"""Full restore: restore-etcd-cluster against its floor, measured in one run on a lab.

The floor is the same work as a plain script would do it, over the same SSH connections and
in parallel per master: copy the snapshot, stop etcd, move the member dir aside, restore,
start every member, wait until healthy. Prints medians and the ratio flow/floor.

    .venv/bin/python bench/restore.py [--masters 3] [--mb 10] [--runs 3]
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import BenchLab, fill, parse, report  # noqa: E402  (sets up sys.path and the environment first)
from lab.lab import Lab  # noqa: E402
from tasks.remote import connect  # noqa: E402


def floor(lab: Lab, snap: Path) -> float:
    cluster = lab.cluster()
    conns = {m.etcd_member: connect(cluster, m) for m in cluster.masters}
    t0 = time.monotonic()

    def per_master(m):
        c = conns[m.etcd_member]
        c.put_file(snap, "/var/lib/etcd/floor.db")
        c.run(["systemctl", "stop", "etcd"])
        c.run(["sh", "-c", "mkdir -p /var/lib/etcd/floor-old && rm -rf /var/lib/etcd/floor-old/member && "
                           "mv /var/lib/etcd/member /var/lib/etcd/floor-old/ && "
                           "/opt/etcd/etcdutl snapshot restore /var/lib/etcd/floor.db --data-dir /var/lib/etcd/floor-new "
                           f"--name {m.etcd_member} --initial-cluster {cluster.initial_cluster()} "
                           f"--initial-cluster-token {cluster.etcd_token} --initial-advertise-peer-urls {m.peer_url} "
                           ">/dev/null 2>&1 && mv /var/lib/etcd/floor-new/member /var/lib/etcd/ && "
                           "rm -rf /var/lib/etcd/floor-new /var/lib/etcd/floor.db"])

    with ThreadPoolExecutor(len(cluster.masters)) as ex:
        list(ex.map(per_master, cluster.masters))
        list(ex.map(lambda m: conns[m.etcd_member].run(["systemctl", "start", "etcd"]), cluster.masters))
    lab.wait_healthy(60)
    took = time.monotonic() - t0
    for c in conns.values():
        c.close()
    return took


def flow_run(lab: Lab, snap: Path) -> float:
    from flows.restore import restore_etcd_cluster

    t0 = time.monotonic()
    restore_etcd_cluster(inventory=str(lab.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True)
    return time.monotonic() - t0


def main() -> None:
    a = parse(net=90)
    with BenchLab(a.masters, a.net) as lab:
        fill(lab, a.mb)
        snap = Path(tempfile.mkdtemp()) / "snapshot.db"
        m1 = lab.master("etcd1")
        lab.etcdctl("snapshot", "save", str(snap), endpoints=[f"https://{m1.address}:2379"])
        floors, flows = [], []
        for _ in range(a.runs):
            floors.append(floor(lab, snap))
            flows.append(flow_run(lab, snap))
        report(f"full restore, {a.masters} masters, snapshot {snap.stat().st_size / 1e6:.0f} MB",
               "floor (plain SSH, parallel)", "restore-etcd-cluster", floors, flows, "1.3x at 200 MB")


if __name__ == "__main__":
    main()
