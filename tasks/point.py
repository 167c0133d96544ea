"""The snapshot of a point in the cluster's past: the last full snapshot before it, restored
into a scratch etcd on this machine, the history's revisions up to the point applied to it
(tasks/replay.py), and the result saved with `etcdctl snapshot save`. Read-only for the
cluster and the store; used by restore-etcd-cluster (point=, revision=) and by the drills."""

from __future__ import annotations

import os
import subprocess
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from core.errors import NovaDRError, SnapshotError
from core.history import Fold, HistoryError, PointPlan, bump_after, fold_chunk, plan_point
from core.names import etcd_snapshot_name, timestamp
from core.snapshot import SnapshotCheck, prepare_snapshot
from tasks.backups import fetch_set
from tasks.drill import find_etcd_bins, scratch_etcd
from tasks.history_store import Base, HistoryStore, full_snapshots
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


def _base_snapshot(st, cluster, base: Base, workdir: Path, identity_block, allow_unsigned) -> SnapshotCheck:
    fetched = fetch_set(st, base.set, workdir / "base", names=[base.set.etcd], identity_block=identity_block,
                        trusted=cluster.backup_signers, allow_unsigned=allow_unsigned)
    if fetched["problems"]:
        raise SnapshotError(f"backup set {base.set.ts}: " + "; ".join(fetched["problems"]) + "; nothing was changed")
    return prepare_snapshot(workdir / "base" / fetched["files"][0], workdir / "base", cluster.nova_version)


CHUNK_BYTES = 48 << 20  # of stored segments per worker's task
IN_PROCESS = 8  # segments: fewer are folded here (a worker process takes a second to start)


def fold_history(history: HistoryStore, plan: PointPlan, base_revision: int, trusted: list[str],
                 allow_unsigned: bool, chunk_bytes: int = CHUNK_BYTES) -> tuple[Fold, dict[int, int], list[str], float]:
    """The plan's segments folded onto its base, in chunks of consecutive segments, each in a
    worker process (core.history.fold_chunk), merged in order with the same checks at each
    seam. Never more than two chunks in memory per worker."""
    segs = list(plan.segments)
    here = ((s.name, history.read(s.name)) for s in segs)  # one segment in memory at a time
    if len(segs) <= IN_PROCESS:
        return fold_chunk(base_revision, plan.target, here, trusted, allow_unsigned)
    try:
        return _fold_in_workers(history, plan, segs, base_revision, trusted, allow_unsigned, chunk_bytes)
    except BrokenProcessPool:  # no worker could start here (a restricted host): the same fold, slower
        return fold_chunk(base_revision, plan.target, here, trusted, allow_unsigned)


def _fold_in_workers(history, plan, segs, base_revision, trusted, allow_unsigned, chunk_bytes):
    import multiprocessing

    workers = max(1, min(4, os.cpu_count() or 1))
    fold, ttls, warnings, at = Fold(base_revision), {}, [], 0.0
    pending: deque = deque()

    def merge_oldest():
        part, t, w, a = pending.popleft().result()
        fold.merge(part)
        ttls.update(t)
        warnings.extend(w)
        return a

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        chunk_base, items, size = base_revision, [], 0
        for i, s in enumerate(segs):
            data = history.read(s.name)
            items.append((s.name, data))
            size += len(data)
            if size >= chunk_bytes or i == len(segs) - 1:
                pending.append(pool.submit(fold_chunk, chunk_base, plan.target, items, trusted, allow_unsigned))
                chunk_base, items, size = min(plan.target, max(chunk_base, s.last)), [], 0
                while len(pending) > 2 * workers:
                    at = max(at, merge_oldest())
        while pending:
            at = max(at, merge_oldest())
    return fold, ttls, warnings, at


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
    # The base is fetched, checked and unpacked (I/O, gzip, subprocesses) while the history is
    # folded (Python, in worker processes): an hour of history is millions of revisions.
    with ThreadPoolExecutor(1) as ex:  # a failed fold waits for the base's job, then is raised
        snap_job = ex.submit(_base_snapshot, st, cluster, base, workdir, identity_block, allow_unsigned)
        fold, ttls, warnings, at = fold_history(history, plan, base.revision, cluster.backup_signers, allow_unsigned)
        snap = snap_job.result()
    at = max(at, base.at or 0.0)
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
