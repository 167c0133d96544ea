"""verify-backups' point-in-time drill: a random revision the history recorded, rebuilt from
the store alone in a scratch etcd (tasks/point.py), compared with what the cluster itself held
at that revision (`etcdctl get --rev`, read on a healthy member over SSH)."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from core.errors import CommandError, NovaDRError
from core.history import chain_from, parse_segment_name
from core.inventory import Cluster
from core.verify import Check, keyspace_digest
from flows.machinery import Run
from tasks.drill import find_etcd_bins, scratch_etcd
from tasks.etcd import check_endpoint_health, etcdctl, read_etcd_env
from tasks.history_store import full_snapshots
from tasks.point import build_point
from tasks.storage import BackupStore

NAME = "point-in-time drill"
TRIES = 12  # revisions asked for before giving up on finding one the cluster has not compacted


def pick_revision(low: int, high: int, compacted, rng: random.Random) -> int | None:
    """A random revision in [low, high] that the cluster still holds (`compacted(r)` says
    whether etcd compacted it away): each compacted pick moves `low` above it, so the search
    ends near the newest revisions, which no compaction has reached yet."""
    for _ in range(TRIES):
        if low > high:
            return None
        r = rng.randint(low, high)
        if not compacted(r):
            return r
        low = r + 1
    return None


def point_in_time_drill(cluster: Cluster, st: BackupStore, workdir: Path, identity_block: str | None,
                        allow_unsigned: bool, rng: random.Random | None = None) -> Check:
    rng = rng or random.Random()
    bases, _ = full_snapshots(st, cluster.backup_signers, allow_unsigned)
    names = [f.name for f in st.list() if parse_segment_name(f.name)]
    if not bases:
        return Check(NAME, "fail", "the store holds history but no trusted full snapshot it could continue")
    base = bases[-1]
    reaches = chain_from(base.revision, names).reaches
    if reaches <= base.revision:
        return Check(NAME, "warn", f"no history recorded after the newest full snapshot ({base.set.ts}, revision "
                                   f"{base.revision}): is continuous-backup running?")
    run = Run("verify-backups", cluster)
    try:
        m, conn, env = _member(run)

        def compacted(r: int) -> bool:
            res = etcdctl(conn, m, env, "get", "", "--from-key", "--count-only", f"--rev={r}", "-w", "fields",
                          check=False)
            if res.code == 0:
                return False
            if "compacted" in res.stderr:
                return True
            raise NovaDRError(f"{m.etcd_member}: get --rev={r} failed: {res.stderr.strip()[-300:]}")

        r = pick_revision(base.revision + 1, reaches, compacted, rng)
        if r is None:
            return Check(NAME, "warn", f"the cluster has compacted every revision the history holds after "
                                       f"{base.set.ts} (up to {reaches}): nothing to compare with")
        # The whole keyspace at r, read into memory here (about 1.4 times its size, as JSON).
        live = etcdctl(conn, m, env, "get", "", "--from-key", f"--rev={r}", "-w", "json", "--command-timeout=600s",
                       timeout=660).stdout
        built = build_point(st, cluster, workdir, revision=r, identity_block=identity_block,
                            allow_unsigned=allow_unsigned)
        bins = find_etcd_bins()
        with scratch_etcd(built.db, bins) as drill:
            got = subprocess.run([str(bins / "etcdctl"), "get", "", "--from-key", "-w", "json", "--command-timeout=600s"],
                                 env=drill["env"], capture_output=True, text=True, check=True, timeout=660).stdout
    except (NovaDRError, CommandError, subprocess.SubprocessError, OSError) as err:
        return Check(NAME, "fail", str(err)[:600])
    finally:
        run.close()
    want, got_ = keyspace_digest(live), keyspace_digest(got)
    where = (f"revision {r}, rebuilt from the full snapshot of {base.set.ts} and {len(built.plan.segments)} history "
             f"segments")
    if want != got_:
        return Check(NAME, "fail", f"{where}: holds {got_[1]} keys (sha256 {got_[0][:16]}), the cluster held {want[1]} "
                                   f"(sha256 {want[0][:16]}) at that revision: the history does not restore it")
    return Check(NAME, "pass", f"{where}: the same {want[1]} keys, values and leases as the cluster held then "
                               f"(sha256 {want[0][:16]})")


def _member(run: Run):
    """A member that answers, with its connection and ETCDCTL_* settings."""
    errors = []
    for m in run.cluster.masters:
        try:
            conn = run.conn(m.etcd_member)
            env = read_etcd_env(conn, m)
            if check_endpoint_health(conn, m, env):
                return m, conn, env
            errors.append(f"{m.etcd_member}: not healthy")
        except (NovaDRError, CommandError) as err:
            errors.append(str(err)[:200])
    raise NovaDRError("no etcd member answers, so the rebuilt point cannot be compared: " + "; ".join(errors))
