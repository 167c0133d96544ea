"""Full restore: restore-etcd-cluster against its floor, measured in one run on a lab.

The floor is the same work as a plain script would do it, over the same SSH connections and
in parallel per master: copy the snapshot, stop etcd (the followers, then the leader: all at
once often costs etcd a ~7 s leadership-transfer timeout, which would flatter the flow), move
the member dir aside, restore, start every member, wait until healthy. For each number of
masters and each snapshot size it prints medians, the ratio flow/floor, the flow's
orchestration overhead and the peak memory growth of this process; then how the flow scales
with the number of masters.

    .venv/bin/python bench/restore.py [--masters 3,7] [--mb 10,200] [--runs 3]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (BenchLab, FlowTimes, PeakRSS, fill, parse, report,  # noqa: E402  (sets up sys.path first)
                    report_prefect_costs)
from lab.lab import Lab  # noqa: E402
from tasks.remote import connect  # noqa: E402


def floor(lab: Lab, snap: Path) -> float:
    cluster = lab.cluster()
    conns = {m.etcd_member: connect(cluster, m) for m in cluster.masters}
    t0 = time.monotonic()

    def copy(m):
        conns[m.etcd_member].put_file(snap, "/var/lib/etcd/floor.db")

    def stop(m):
        conns[m.etcd_member].run(["systemctl", "stop", "etcd"])

    def restore(m):
        c = conns[m.etcd_member]
        c.run(["sh", "-c", "mkdir -p /var/lib/etcd/floor-old && rm -rf /var/lib/etcd/floor-old/member && "
                           "mv /var/lib/etcd/member /var/lib/etcd/floor-old/ && "
                           "/opt/etcd/etcdutl snapshot restore /var/lib/etcd/floor.db --data-dir /var/lib/etcd/floor-new "
                           f"--name {m.etcd_member} --initial-cluster {cluster.initial_cluster()} "
                           f"--initial-cluster-token {cluster.etcd_token} --initial-advertise-peer-urls {m.peer_url} "
                           ">/dev/null 2>&1 && mv /var/lib/etcd/floor-new/member /var/lib/etcd/ && "
                           "rm -rf /var/lib/etcd/floor-new /var/lib/etcd/floor.db"], timeout=1800)

    with ThreadPoolExecutor(len(cluster.masters)) as ex:
        status = json.loads(lab.etcdctl("endpoint", "status", "--cluster", "-w", "json").stdout)
        leader = next(s["Status"]["leader"] for s in status)
        lead = [m for m in cluster.masters if any(s["Endpoint"] == m.client_url and s["Status"]["header"]["member_id"]
                                                  == leader for s in status)]
        list(ex.map(copy, cluster.masters))
        list(ex.map(stop, [m for m in cluster.masters if m not in lead]))
        list(ex.map(stop, lead))
        list(ex.map(restore, cluster.masters))
        list(ex.map(lambda m: conns[m.etcd_member].run(["systemctl", "start", "etcd"]), cluster.masters))
    lab.wait_healthy(120)
    took = time.monotonic() - t0
    for c in conns.values():
        c.close()
    return took


def flow_run(lab: Lab, snap: Path) -> None:
    from flows.restore import restore_etcd_cluster

    restore_etcd_cluster(inventory=str(lab.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True)


def main() -> None:
    a = parse(net=90, masters="3,7", mb="10,200")
    results = {}  # (masters, mb) -> median flow seconds
    for n in (int(x) for x in a.masters.split(",")):
        with BenchLab(n, a.net) as lab:
            filled = 0
            for mb in (int(x) for x in a.mb.split(",")):
                fill(lab, mb - filled, start=filled)
                filled = mb
                snap = Path(tempfile.mkdtemp()) / "snapshot.db"
                lab.etcdctl("snapshot", "save", str(snap), endpoints=[f"https://{lab.master('etcd1').address}:2379"])
                floors, flows = [], FlowTimes()
                with PeakRSS() as mem:
                    for _ in range(a.runs):
                        floors.append(floor(lab, snap))
                        flows.run(flow_run, lab, snap)
                report(f"full restore, {n} masters, snapshot {snap.stat().st_size / 1e6:.0f} MB",
                       "floor (plain SSH, parallel)", "restore-etcd-cluster", floors, flows, "1.3x at 200 MB")
                print(f"{'peak RSS growth':32} {mem.growth / 2**20:7.1f} MiB (goal: flat in the snapshot size)")
                results[n, mb] = statistics.median(flows.walls)
                snap.unlink()
    counts = sorted({n for n, _ in results})
    if len(counts) > 1:
        print("\nscaling with the number of masters (goal: 7 masters within 1.25x of 3)")
        for mb in sorted({mb for _, mb in results}):
            row = ", ".join(f"{n}: {results[n, mb]:.2f} s" for n in counts)
            print(f"  {mb} MB: {row}; {counts[-1]}/{counts[0]} = {results[counts[-1], mb] / results[counts[0], mb]:.2f}x")
    report_prefect_costs()


if __name__ == "__main__":
    main()
