"""Full restore: restore-etcd-cluster against two floors, measured side by side in one run.

- The OpenSSH floor (bench/floors/restore.sh): the runbook as an operator would script it
  with ssh and scp, in parallel per master: copy the snapshot, stop etcd (the followers, then
  the leader: all at once often costs etcd a ~7 s leadership-transfer timeout, which would
  flatter the flow), move the member dir aside, restore, start every member, wait until
  healthy.
- Our own connector's floor: the same steps over the flow's own SSH connections, so the cost
  of the transport shows.

Each runs over every link profile asked for (lab/links.py: loopback; datacenter, 1 Gbit/s;
dr-site, 100 Mbit/s and a 20 ms round trip). The floors get the plain .db; the flow gets the
backup set's etcd archive (.db.tar.gz), as a restore from a store does. For each it prints
medians, the bytes that crossed the flow machine's link, the ratios, the flow's orchestration
overhead and SSH commands per kind of step, and the peak memory growth of this process.

    .venv/bin/python bench/restore.py [--masters 3,7] [--mb 10,200] [--runs 3] [--links loopback,dr-site]
                                      [--own-floor loopback]  (the profiles with the own-connector floor)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (BenchLab, FlowTimes, Link, PeakRSS, Timed, fill, parse, report,  # noqa: E402  (sets up sys.path first)
                    report_prefect_costs)
from lab.lab import Lab  # noqa: E402
from tasks.remote import connect  # noqa: E402


def own_floor(lab: Lab, inventory: Path, snap: Path) -> None:
    from core.inventory import load_inventory_file

    cluster = load_inventory_file(inventory)
    conns = {m.etcd_member: connect(cluster, m) for m in cluster.masters}

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
                           "chown -R etcd: /var/lib/etcd/member && rm -rf /var/lib/etcd/floor-new /var/lib/etcd/floor.db"],
              timeout=1800)

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
    lab.wait_healthy(300)
    for c in conns.values():
        c.close()


def flow_run(inventory: Path, archive: Path) -> None:
    from flows.restore import restore_etcd_cluster

    restore_etcd_cluster(inventory=str(inventory), snapshot=str(archive), auto_approve=True)


def backup_archive(lab: Lab, work: Path) -> tuple[Path, Path]:
    """A real backup set of the lab, taken by the flow: its etcd archive and the plain .db in it."""
    import tarfile

    from flows.backup import backup_master_nodes

    os.environ["INCLUDE_STARVAULT_DB_BACKUP"] = "false"
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    backup_master_nodes(inventory=str(lab.dir / "inventory.yaml"), store=str(store), RETENTION_PERIOD_DAYS=1000)
    archive = next(store.rglob("etcd_snapshot_*.db.tar.gz"))
    with tarfile.open(archive) as tar:
        member = next(m for m in tar if m.name.endswith(".db"))
        tar.extract(member, work / "plain", filter="data")
    return archive, next((work / "plain").rglob("*.db"))


def main() -> None:
    a = parse(net=90, masters="3,7", mb="10,200", links="loopback", own_floor="loopback,datacenter,dr-site")
    results = {}  # (masters, mb, link) -> {name: median seconds}
    work = Path(tempfile.mkdtemp(prefix="nova-dr-bench-restore-"))
    for n in (int(x) for x in a.masters.split(",")):
        with BenchLab(n, a.net) as lab:
            filled = 0
            for mb in (int(x) for x in a.mb.split(",")):
                fill(lab, mb - filled, start=filled)
                filled = mb
                archive, db = backup_archive(lab, work)
                for profile in a.links.split(","):
                    with Link(lab, profile) as link:
                        floors = {"OpenSSH floor (bash, scp)": Timed(link)}
                        if profile in a.own_floor.split(","):  # minutes per run where bandwidth is all it shows
                            floors["own-connector floor"] = Timed(link)
                        flows, growth = FlowTimes(link), []
                        for _ in range(a.runs):
                            floors["OpenSSH floor (bash, scp)"].run(link.floor, "restore.sh", str(db),
                                                                    lab.cluster().etcd_token)
                            if "own-connector floor" in floors:
                                floors["own-connector floor"].run(own_floor, lab, link.inventory, db)
                            with PeakRSS() as mem:
                                flows.run(flow_run, link.inventory, archive)
                            growth.append(mem.growth)
                        results[n, mb, profile] = report(
                            f"full restore, {n} masters, {profile}, snapshot {db.stat().st_size / 1e6:.0f} MB "
                            f"(archive {archive.stat().st_size / 1e6:.0f} MB)", floors, "restore-etcd-cluster", flows,
                            "at most 1.0x the OpenSSH floor; dr-site: at most 0.6x")
                        print(f"{'peak RSS growth per flow run':34} " + ", ".join(f"{g / 2**20:.1f}" for g in growth)
                              + " MiB (the process's first run also imports; goal: flat, at most 64 MiB)")
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
    counts = sorted({n for n, _, _ in results})
    if len(counts) > 1:
        print(f"\nscaling with the number of masters, {counts[-1]} against {counts[0]}")
        for (n, mb, profile), med in sorted(results.items()):
            if n == counts[-1] and (counts[0], mb, profile) in results:
                base = results[counts[0], mb, profile]
                print(f"  {mb} MB, {profile}: " + ", ".join(f"{k} {med[k] / base[k]:.2f}x" for k in med if k in base))
    shutil.rmtree(work, ignore_errors=True)
    report_prefect_costs()


if __name__ == "__main__":
    main()
