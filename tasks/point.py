"""The snapshot of a point in the cluster's past: the last full snapshot before it, restored
into a scratch etcd on this machine, the history's revisions up to the point applied to it
(tasks/replay.py), and the result saved with `etcdctl snapshot save`. Read-only for the
cluster and the store; used by restore-etcd-cluster (point=, revision=) and by the drills."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from core.errors import NovaDRError, SnapshotError
from core.history import Fold, HistoryError, PointPlan, bump_after, plan_point
from core.names import etcd_snapshot_name, timestamp
from core.snapshot import prepare_snapshot
from tasks.backups import fetch_set
from tasks.drill import find_etcd_bins, scratch_etcd
from tasks.history_store import HistoryStore, full_snapshots
from tasks.replay import apply_fold, kept_alive
from tasks.storage import BackupStore


@dataclass(frozen=True)
class BuiltPoint:
    db: str  # the point's snapshot on this machine, named as a set's etcd snapshot is
    plan: PointPlan
    at: float  # when the point's revision was seen (unix time)
    applied: dict  # what the replay did: puts, deletes, leases granted, txns
    revision: int  # the built snapshot's own revision (the base's, plus one per txn)
    warnings: list[str]


def parse_point(text: str) -> float:
    """`2026-12-02T10:15:30Z` (ISO 8601, with a zone) as unix time; a clear error otherwise."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise NovaDRError(f"point={text!r}: not a time; write it as 2026-12-02T10:15:30Z (UTC)") from None
    if dt.tzinfo is None:
        raise NovaDRError(f"point={text!r}: give its zone (2026-12-02T10:15:30Z for UTC); a bare time is ambiguous")
    return dt.timestamp()


def plan_for(st: BackupStore, trusted: list[str], revision: int | None, point: float | None,
             identity_block: str | None = None, allow_unsigned: bool = False):
    """(the plan, the history, the bases) for a point: what plan_point decides from the store."""
    history = HistoryStore(st, trusted, allow_unsigned, identity_block)
    bases, _left = full_snapshots(st, trusted, allow_unsigned)
    # A set written before its snapshot's time was recorded can start a restore to a revision,
    # never one to a point in time: when its revision was reached is not known.
    usable = [b for b in bases if point is None or b.at is not None]
    plan = plan_point([(b.set.ts, b.revision, b.at or 0.0) for b in usable], history.names(), history.revisions,
                      revision=revision, point=point)
    return plan, history, usable


def build_point(st: BackupStore, cluster, workdir: str | Path, revision: int | None = None, point: float | None = None,
                identity_block: str | None = None, allow_unsigned: bool = False) -> BuiltPoint:
    workdir = Path(workdir)
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    plan, history, bases = plan_for(st, cluster.backup_signers, revision, point, identity_block, allow_unsigned)
    base = next(b for b in bases if b.set.ts == plan.base)
    fetched = fetch_set(st, base.set, workdir / "base", names=[base.set.etcd], identity_block=identity_block,
                        trusted=cluster.backup_signers, allow_unsigned=allow_unsigned)
    if fetched["problems"]:
        raise SnapshotError(f"backup set {base.set.ts}: " + "; ".join(fetched["problems"]) + "; nothing was changed")
    snap = prepare_snapshot(workdir / "base" / fetched["files"][0], workdir / "base", cluster.nova_version)
    fold, ttls, warnings = Fold(plan.base_revision), {}, []
    at = base.at or 0.0
    for seg in plan.segments:
        s = history.load(seg.name)
        if s.unsigned:
            warnings.append(f"history segment {seg.name}: {s.unsigned}; accepted only because allow_unsigned=true")
        ttls.update(s.lease_ttls)
        for r in s.revisions:
            if r.rev <= plan.target:
                fold.add(r)
                at = max(at, r.at)
    if fold.reached != plan.target:  # plan_point said it is reachable; the segments say otherwise
        raise HistoryError(f"the history reaches revision {fold.reached}, not {plan.target}")
    name = etcd_snapshot_name(snap.nova_version or cluster.nova_version, snap.k8s_version or cluster.k8s_version,
                              timestamp(datetime.fromtimestamp(at, timezone.utc)), packed=False)
    out = workdir / "point" / name
    out.parent.mkdir(mode=0o700)
    bins = find_etcd_bins()
    with scratch_etcd(snap.db_path, bins) as drill:
        if drill["status"].revision != base.file_revision:  # gardener/etcd-backup-restore#1044
            raise SnapshotError(f"backup set {base.set.ts}: its snapshot holds revision {drill['status'].revision}, "
                                f"its manifest says {base.file_revision}; its history cannot be applied to it. "
                                "Nothing was changed")
        # Leases are kept alive from before the first write until the point's snapshot is
        # saved: none may expire in between and take its keys (gardener/etcd-backup-restore#1046).
        with kept_alive(drill["endpoint"]) as alive:
            applied = apply_fold(drill["endpoint"], fold, ttls, alive, base.file_revision)
            res = subprocess.run([str(bins / "etcdctl"), "snapshot", "save", str(out)], env=drill["env"],
                                 capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise NovaDRError(f"saving the point's snapshot failed: {res.stderr.strip()[-300:]}")
    out.chmod(0o600)
    # The built snapshot's revision is below the point's (one per txn, not per revision
    # replayed): the bump is sized from it, so the restored store starts above everything
    # any client saw.
    built = base.file_revision + applied["txns"]
    return BuiltPoint(str(out), replace(plan, bump=bump_after(plan.newest, built)), at, applied, built, warnings)
