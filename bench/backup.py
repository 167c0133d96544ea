"""Backup: backup-master-nodes against the plain script an operator would write, in one run
on a lab, and the memory the flow's process needs for two database sizes.

The floors: `etcdctl snapshot save` on a master and `tar -czf` there, a `tar -czf` of each
master's files there, every archive copied into the store directory, the masters in
parallel; once as a bash script with OpenSSH (bench/floors/backup.sh), once over our own
SSH connections. The flow does the same work (plus checks, a manifest and retention) to a
directory store, StarVault off on all sides. Each runs over every link profile asked for
(lab/links.py). Prints medians, bytes on the link, the ratios, and the peak RSS growth of
this process during a flow run at --mb and at --small-mb.

    .venv/bin/python bench/backup.py [--masters 3] [--mb 200] [--small-mb 20] [--runs 3] [--links datacenter]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import BenchLab, FlowTimes, Link, PeakRSS, Timed, fill, parse, report  # noqa: E402  (sets up sys.path and the environment first)


def own_floor(inventory: Path, store: Path) -> None:
    from core.etcd import etcdctl_env, parse_env_file
    from core.inventory import load_inventory_file
    from tasks.remote import connect

    cluster = load_inventory_file(inventory)
    conns = {m.etcd_member: connect(cluster, m) for m in cluster.masters}
    first = cluster.masters[0]

    def snapshot():
        c = conns[first.etcd_member]
        env = parse_env_file(c.run(["cat", first.paths.etcd_env]).stdout)
        c.run([*etcdctl_env(env, [first.client_url]), first.paths.etcdctl, "snapshot", "save", "/var/tmp/floor.db"],
              timeout=1800)
        c.run(["tar", "-czf", "/var/tmp/floor.db.tar.gz", "-C", "/var/tmp", "floor.db"], timeout=1800)
        c.get_file("/var/tmp/floor.db.tar.gz", store / "floor.db.tar.gz")
        c.run(["rm", "-f", "/var/tmp/floor.db", "/var/tmp/floor.db.tar.gz"])

    def node(m):
        c, p = conns[m.etcd_member], m.paths
        tmp = f"/var/tmp/floor-node-{m.etcd_member}.tar.gz"  # the lab's masters share /var/tmp
        c.run(["tar", "-czf", tmp, "-C", "/", p.pki_dir.lstrip("/"), p.encryption_config.lstrip("/"),
               p.unseal_tokens.lstrip("/")])
        c.get_file(tmp, store / f"{m.archive_name}-floor.tar.gz")
        c.run(["rm", "-f", tmp])

    try:
        with ThreadPoolExecutor(len(cluster.masters) + 1) as ex:
            futures = [ex.submit(snapshot)] + [ex.submit(node, m) for m in cluster.masters]
            for f in futures:
                f.result()
    finally:
        for c in conns.values():
            c.close()


def flow_run(inventory: Path, store: Path) -> None:
    from flows.backup import backup_master_nodes

    backup_master_nodes(inventory=str(inventory), store=str(store), RETENTION_PERIOD_DAYS=1000)


def fresh(store: Path) -> Path:
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    return store


def main() -> None:
    a = parse(net=91, mb=200, small_mb=20, links="datacenter")
    os.environ["INCLUDE_STARVAULT_DB_BACKUP"] = "false"
    work = Path(tempfile.mkdtemp(prefix="nova-dr-bench-store-"))
    try:
        with BenchLab(a.masters, a.net) as lab:
            fill(lab, a.small_mb)
            with PeakRSS() as small:
                flow_run(lab.dir / "inventory.yaml", fresh(work / "small"))
            fill(lab, a.mb - a.small_mb, start=a.small_mb)
            for profile in a.links.split(","):
                with Link(lab, profile) as link:
                    floors = {"OpenSSH floor (bash, scp)": Timed(link), "own-connector floor": Timed(link)}
                    flows = FlowTimes(link)
                    for _ in range(a.runs):
                        floors["OpenSSH floor (bash, scp)"].run(link.floor, "backup.sh", str(fresh(work / "floor")))
                        floors["own-connector floor"].run(own_floor, link.inventory, fresh(work / "floor"))
                        with PeakRSS() as big:
                            flows.run(flow_run, link.inventory, fresh(work / "flow"))
                    db = sum(f.stat().st_size for f in (work / "flow").glob("etcd_snapshot_*"))
                    report(f"backup, {a.masters} masters, {profile}, database ~{a.mb} MB (etcd archive "
                           f"{db / 1e6:.0f} MB)", floors, "backup-master-nodes", flows, "at most 0.5x the OpenSSH floor")
            print(f"{'peak RSS growth, flow':34} {small.growth / 2**20:7.1f} MiB at ~{a.small_mb} MB, "
                  f"{big.growth / 2**20:.1f} MiB at ~{a.mb} MB (goal: flat)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
