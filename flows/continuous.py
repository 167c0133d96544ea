"""continuous-backup: the cluster's history between full snapshots, seconds old.

A long-running run per cluster watches the whole keyspace from a follower and stores what it
sees as segments (tasks/capture.py), each continuing the store's newest one. Whatever ends a
watch (a member restart, a leader hand-off that took the member away, a lost link), the next
one continues from the last stored revision, on another member if need be. A gap (etcd
compacted what the capture had not read) is reported, counted, and answered with a full
snapshot (a backup-master-nodes run) that the history then continues: never papered over.

Served hourly, each run living a little longer than an hour: a run that dies is replaced
within the hour, and two runs overlap for a minute, their segments resolved by revision.
"""

from __future__ import annotations

import threading
import time

from prefect import flow, get_run_logger

from blocks.inventory import resolve_inventory
from core.errors import NovaDRError
from core.history import HistoryError, Recorder, parse_segment_name, start_revision
from core.signing import seal_segment
from flows import machinery as mc
from flows.backup import UNSIGNED, choose_snapshot_member, signing_key
from flows.machinery import Run
from tasks.capture import Stopped, capture, lease_ttls
from tasks.crypto import EncryptingStore, recipients_from
from tasks.etcd import read_etcd_env
from tasks.history_store import HistoryStore, full_snapshots
from tasks.remote import connect
from tasks.storage import open_store

FLOW_NAME = "continuous-backup"
RETRY_MAX_S = 30  # the longest wait between two watches when no member answers
UNENCRYPTED_HISTORY = ("history segments are stored unencrypted: every Secret the cluster writes passes through "
                       "them. Set backup_recipients (age public keys) in the inventory")


class Counters:
    """What the run did, for its result, its metrics and its report."""

    def __init__(self):
        self.segments = self.revisions = self.bytes = self.gaps = self.full_snapshots = self.restarts = 0
        self.first = self.last = 0
        self.last_event_at = 0.0
        self.gap_reports: list[str] = []

    def wrote(self, data: bytes, revs) -> None:
        self.segments += 1
        self.revisions += len(revs)
        self.bytes += len(data)
        self.first = self.first or revs[0].rev
        self.last, self.last_event_at = revs[-1].rev, revs[-1].at

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


def write_metrics(path: str, cluster: str, c: Counters) -> None:
    """A node_exporter textfile, as fleet-status writes its own (whole, then renamed)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    reg = CollectorRegistry()
    for name, doc, value in [
        ("nova_dr_history_last_revision", "the newest revision stored as history", c.last),
        ("nova_dr_history_last_event_timestamp_seconds", "when the newest stored revision was seen, unix time",
         c.last_event_at),
        ("nova_dr_history_segments_written", "segments this run stored", c.segments),
        ("nova_dr_history_gaps", "gaps this run found (each answered with a full snapshot)", c.gaps),
        ("nova_dr_history_full_snapshots", "full snapshots this run took for a gap", c.full_snapshots),
        ("nova_dr_history_watch_restarts", "watches this run started again after one ended", c.restarts),
    ]:
        Gauge(name, doc, ["cluster"], registry=reg).labels(cluster).set(value)
    write_to_textfile(path, reg)


def full_snapshot(inventory: str, store: str, s3_block: str | None, backup_parameters: dict | None) -> int:
    """A backup-master-nodes run (a subflow of this one); the revision of its snapshot file."""
    from flows.backup import backup_master_nodes

    try:
        out = backup_master_nodes(inventory=inventory, store=store, s3_block=s3_block, **(backup_parameters or {}))
    except Exception as err:
        raise NovaDRError(f"the history needs a full snapshot to continue from, and backup-master-nodes failed: {err}. "
                          "Give it what the nightly backup is given in backup_parameters (e.g. starvault_block); "
                          "the next run tries again") from None
    etcd = next(f for f in out["files"] if f["kind"] == "etcd")
    return int(etcd["status"]["revision"])


@flow(name=FLOW_NAME, log_prints=True)
def continuous_backup(
    inventory: str,
    store: str,
    flush_seconds: float = 10,
    flush_mib: float = 8,
    run_minutes: float = 61,
    member: str | None = None,
    s3_block: str | None = None,
    recipients: list[str] | None = None,
    backup_parameters: dict | None = None,
    textfile: str | None = None,
) -> dict:
    """Record every change to etcd between full snapshots, so that restore-etcd-cluster can
    bring the cluster back to any second (point=) or revision (revision=) since the oldest set.

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        store: the cluster's backup store (its sets are the full snapshots the history continues)
        flush_seconds: a segment is stored at least this often while changes come (the recovery point)
        flush_mib: ... or as soon as this many MiB of changes wait
        run_minutes: how long this run records (the deployment starts one every hour; they overlap)
        member: watch this member (default: a healthy follower, so the leader's load does not grow)
        s3_block: a Nova Backup S3 Credentials block for an s3:// store (default: the environment)
        recipients: age public keys to encrypt the segments to (default: the inventory's backup_recipients)
        backup_parameters: backup-master-nodes' parameters for the full snapshot a gap needs
            (e.g. starvault_block), besides inventory, store and s3_block
        textfile: write Prometheus metrics there for node_exporter, after every segment
    """
    log = get_run_logger()
    if flush_seconds <= 0 or flush_mib <= 0 or run_minutes <= 0:
        raise NovaDRError("flush_seconds, flush_mib and run_minutes must be above 0")
    cluster = resolve_inventory(inventory)
    if member is not None:
        cluster.master(member)  # a member the inventory does not name is refused here, in one line
    key = signing_key(cluster, log)
    seal = seal_segment(key) if key else None
    keys = recipients if recipients is not None else cluster.backup_recipients
    base_store = open_store(store, s3_block)
    st = EncryptingStore(base_store, recipients_from(keys), {"history"}) if keys else base_store
    if not keys:
        log.warning(UNENCRYPTED_HISTORY)
    # Its own segments, read back on a restart, are checked as every reader checks them; unsigned
    # ones only when this run signs none either.
    history = HistoryStore(st, cluster.backup_signers, allow_unsigned=key is None)
    counters = Counters()
    stop = threading.Event()
    timer = threading.Timer(run_minutes * 60, stop.set)
    timer.daemon = True
    timer.start()
    run = Run(FLOW_NAME, cluster)
    try:
        rec = Recorder(_start(run, history, st, inventory, store, s3_block, backup_parameters, counters, log),
                       flush_seconds, int(flush_mib * (1 << 20)))
        print(f"continuous backup of {cluster.name} to {st.url}: from revision {rec.last + 1}, a segment every "
              f"{flush_seconds:g}s or {flush_mib:g} MiB, for {run_minutes:g} min")

        def write(name, data, revs):
            history.write(name, data)
            counters.wrote(data, revs)
            if textfile:
                write_metrics(textfile, cluster.name, counters)

        wait, started = 1.0, time.monotonic()
        while not stop.is_set():
            try:
                facts = mc.gather_facts(run)
                chosen = member or choose_snapshot_member(facts)
                m = cluster.master(chosen)
                conn = connect(cluster, m)
                try:
                    env = read_etcd_env(conn, m)
                    log.info("watching %s from revision %d", chosen, rec.last + 1)
                    started = time.monotonic()
                    capture(conn, m, env, rec, write, stop, lease_ttls(conn, m, env), seal)
                finally:
                    conn.close()
            except Stopped:
                break
            except HistoryError as err:
                counters.gaps += 1
                counters.gap_reports.append(str(err))
                log.error("a gap in the history: %s. Taking a full snapshot; the history continues from it", err)
                mc.publish("continuous-backup-gap", f"# A gap in {cluster.name}'s history\n\n{err}\n\nA full snapshot "
                           "was started; a restore to a point inside the gap is refused, by name.",
                           "continuous-backup: a gap, and the full snapshot that followed")
                rec = Recorder(full_snapshot(inventory, store, s3_block, backup_parameters), flush_seconds,
                               int(flush_mib * (1 << 20)))
                counters.full_snapshots += 1
                continue
            except (NovaDRError, OSError, EOFError) as err:  # the watch ended, or no member could be watched
                counters.restarts += 1
                # A watch that ran a while ended for a reason of its own; one that failed at once
                # (no member answers) is tried again less and less often.
                wait = 1.0 if time.monotonic() - started > 60 else min(RETRY_MAX_S, wait * 2)
                log.warning("%s; watching again in %.0fs from revision %d", err, wait, rec.last + 1)
                stop.wait(wait)
    finally:
        timer.cancel()
        run.close()
    if textfile:
        write_metrics(textfile, cluster.name, counters)
    summary = counters.as_dict()
    mc.publish("continuous-backup-report",
               f"# continuous-backup of `{cluster.name}` to `{st.url}`\n\n"
               + mc.render_table(["revisions", "segments", "bytes", "up to revision", "gaps", "full snapshots",
                                  "watch restarts"],
                                 [[counters.revisions, counters.segments, counters.bytes, counters.last, counters.gaps,
                                   counters.full_snapshots, counters.restarts]])
               + "".join(f"\n\n> **Gap:** {g}" for g in counters.gap_reports)
               + ("" if key else f"\n\n> **Warning:** {UNSIGNED}"), "continuous-backup: what this run recorded")
    return summary


def _start(run: Run, history: HistoryStore, st, inventory, store, s3_block, backup_parameters,
           counters: Counters, log) -> int:
    """The revision the store's history reaches, checked against the cluster's own; a full
    snapshot first when the store has no set to continue."""
    names = history.names()
    newest = max((parse_segment_name(n) for n in names), key=lambda s: s.last, default=None)
    bases, left = full_snapshots(st, run.cluster.backup_signers)
    if left:
        log.info("sets the history cannot start from: %s", "; ".join(left[:5]))
    facts = mc.gather_facts(run)
    revs = [f.status.revision for f in facts.masters if f.status]
    if not revs:
        raise NovaDRError("no etcd member answers: the capture cannot start. " + "; ".join(
            f.error or f"{f.member}: not healthy" for f in facts.masters))
    if newest is not None and not newest.name.endswith(".age"):
        # Its name is not trusted alone: read and checked. An encrypted one cannot be read here
        # (this machine holds the recipients' public keys only): its name is checked against
        # the cluster's revision below, and every restore checks its signature.
        history.load(newest.name)
    start = start_revision(newest.last if newest else None, [b.revision for b in bases], max(revs))
    if start is None:
        log.info("the store has no signed set to continue: taking a full snapshot first")
        counters.full_snapshots += 1
        start = full_snapshot(inventory, store, s3_block, backup_parameters)
    return start
