"""etcd's suggested maximum: an 8 GiB database backed up and restored, against the OpenSSH
floors, with the flow process's memory.

The lab's etcd quota is raised above the size (its default is 2 GiB), the database is
filled with values close to etcd's 1.5 MiB request limit, several writers at once, then:
- backup: bench/floors/backup.sh against backup-master-nodes (to a directory store);
- restore: bench/floors/restore.sh (the plain .db) against restore-etcd-cluster (the set's
  archive), old data deleted after verification on both sides so the disk holds out.
The flow's peak RSS growth is measured at a small size first (the process warm), then at
the full size.

    .venv/bin/python bench/big.py [--gib 8] [--masters 1] [--runs 1]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import BenchLab, FlowTimes, Link, PeakRSS, Timed, parse, report, value  # noqa: E402  (sets up sys.path first)
from lab.lab import Lab, etcd_bin_dir  # noqa: E402
from restore import backup_archive  # noqa: E402

VALUE_BYTES = 1_400_000  # under etcd's --max-request-bytes (1.5 MiB) with the key and the request around it


def raise_quota(lab: Lab, size: int) -> None:
    for m in lab.masters():
        lab.in_master(m.member, "sh", "-c", f"echo ETCD_QUOTA_BACKEND_BYTES={size} >> /etc/etcd.env && "
                                            "systemctl restart etcd")
    lab.wait_healthy(120)


def fill_to(lab: Lab, size: int) -> None:
    """Values of ~1.4 MB (compressing ~4x, as Kubernetes objects do), four writers at once."""
    files = []
    for seed in range(8):
        p = Path(tempfile.mkstemp()[1])
        v = value(seed)
        p.write_bytes((v * 2)[:VALUE_BYTES])
        files.append(p)
    ctl, env = str(etcd_bin_dir() / "etcdctl"), lab.etcdctl_env()

    def put(i):
        with open(files[i % 8], "rb") as f:
            subprocess.run([ctl, "put", f"/registry/big/{i:06d}"], stdin=f, env=env, check=True, capture_output=True)

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(put, range(size // VALUE_BYTES + 1)))
    for p in files:
        p.unlink()


def main() -> None:
    a = parse(net=93, masters=1, gib=8, runs=1)
    size = a.gib << 30
    os.environ["INCLUDE_STARVAULT_DB_BACKUP"] = "false"
    work = Path(tempfile.mkdtemp(prefix="nova-dr-bench-big-"))
    from flows.backup import backup_master_nodes
    from flows.restore import restore_etcd_cluster

    try:
        with BenchLab(a.masters, a.net) as lab, Link(lab, "loopback") as link:
            raise_quota(lab, size + (1 << 30))
            fill_to(lab, 64 << 20)  # warm: every module imported, every path taken once
            small_archive, _ = backup_archive(lab, work / "small")
            with PeakRSS() as small_restore:
                restore_etcd_cluster(inventory=str(link.inventory), snapshot=str(small_archive), auto_approve=True,
                                     delete_old_data=True)
            fill_to(lab, size)
            backup_floor, backup_flow = Timed(link), FlowTimes(link)
            restore_floor, restore_flow = Timed(link), FlowTimes(link)
            mem = {}
            for _ in range(a.runs):
                floor_store = work / "floor-store"
                shutil.rmtree(floor_store, ignore_errors=True)
                floor_store.mkdir(parents=True)
                backup_floor.run(link.floor, "backup.sh", str(floor_store))
                shutil.rmtree(floor_store)
                store = work / "store"
                shutil.rmtree(store, ignore_errors=True)
                store.mkdir()
                with PeakRSS() as mem["backup"]:
                    backup_flow.run(lambda: backup_master_nodes(inventory=str(link.inventory), store=str(store),
                                                                RETENTION_PERIOD_DAYS=1000))
                archive = next(store.rglob("etcd_snapshot_*.db.tar.gz"))
                plain = work / "plain"
                shutil.rmtree(plain, ignore_errors=True)
                subprocess.run(["tar", "-xzf", str(archive), "-C", str(work), "--transform", "s|.*/|plain/|"],
                               check=True)
                db = next(plain.glob("*.db"))
                restore_floor.run(link.floor, "restore.sh", str(db), lab.cluster().etcd_token)
                for m in lab.masters():
                    lab.in_master(m.member, "rm", "-rf", "/var/lib/etcd/floor-old")
                db.unlink()
                with PeakRSS() as mem["restore"]:
                    restore_flow.run(lambda: restore_etcd_cluster(inventory=str(link.inventory), snapshot=str(archive),
                                                                  auto_approve=True, delete_old_data=True))
            print(f"\ndatabase {size / 2**30:.1f} GiB, archive {archive.stat().st_size / 2**30:.2f} GiB, "
                  f"{a.masters} master(s), loopback")
            report("backup", {"OpenSSH floor (bash, scp)": backup_floor}, "backup-master-nodes", backup_flow,
                   "within 1.3x of the OpenSSH floor")
            report("restore", {"OpenSSH floor (bash, scp)": restore_floor}, "restore-etcd-cluster", restore_flow,
                   "within 1.3x of the OpenSSH floor")
            print(f"\n{'peak RSS growth, restore':34} {small_restore.growth / 2**20:7.1f} MiB at 64 MiB, "
                  f"{mem['restore'].growth / 2**20:.1f} MiB at {a.gib} GiB (goal: at most 64 MiB)")
            print(f"{'peak RSS growth, backup':34} {mem['backup'].growth / 2**20:7.1f} MiB at {a.gib} GiB")
            print(f"{'median restore, flow':34} {statistics.median(restore_flow.walls):7.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
