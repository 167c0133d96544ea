"""restore-etcd-cluster (SPEC P8): bring every member back from one snapshot, when quorum is lost.

The last resort: it rolls Kubernetes back to the snapshot's time. Read-only preflight, a plan,
an approval gate, then a DAG of idempotent steps with checkpoints keyed on the recovery id.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.inventory import resolve_inventory
from core.errors import CommandError, NovaDRError, PreflightError, SnapshotError
from core.facts import ClusterFacts
from core.plan import Plan, Step
from core.restore_plan import FOLLOW_UPS, build_restore_plan
from core.snapshot import SnapshotCheck, prepare_snapshot, unpacked_size
from flows import machinery as mc
from core.etcd import (restore_argv, revision_after_restore, start_timeout, summarize_log, supports_bump_revision,
                       work_timeout)
from flows.actions import not_converged, on, quarantine_name, read_status_rows, stop_etcd
from flows.machinery import Run
from flows.lock import cluster_lock
from tasks import datadir, etcd, service
from tasks.backups import fetch_set, newest_trusted, passed_note
from tasks.drill import find_etcd_bins, scratch_etcd, snapshot_contents
from tasks.scratch import scratch_dir
from tasks.storage import open_store

FLOW_NAME = "restore-etcd-cluster"
DEFAULT_BUMP = 1_000_000_000  # SPEC: about a week of writes at under 1,500/s


# -- the actions the plan's steps name --------------------------------------------------

def copy_snapshot(run: Run, step: Step, up: dict) -> str:
    conn, m = on(run, step)
    return datadir.copy_snapshot(conn, m, run.data["snapshot"], run.recovery_id)


def check_snapshot(run: Run, step: Step, up: dict) -> dict:
    conn, m = on(run, step)
    st = etcd.read_snapshot_status(conn, m, f"{datadir.work_dir(m, run.recovery_id)}/snapshot.db",
                                   run.data["snapshot"].size)
    return {"revision": st.revision, "hash": st.hash, "total_size": st.total_size}


def restore_staging(run: Run, step: Step, up: dict) -> dict:
    conn, m = on(run, step)
    probe = datadir.probe_staging(conn, m, run.recovery_id)
    asked = step.args["bump_revision"]
    bump = asked if asked and supports_bump_revision(probe.restore_help) else 0
    if probe.state != "none":
        return {"state": f"already {probe.state}", "bumped": bump}
    wd = datadir.work_dir(m, run.recovery_id)
    snap: SnapshotCheck = run.data["snapshot"]
    if probe.snapshot_size != snap.size:
        # The copy's checkpoint says done, but the master says otherwise (its work dir was
        # cleaned, or lived on a disk that is gone): the master decides. Copy it again.
        datadir.copy_snapshot(conn, m, snap, run.recovery_id)
    argv = ["env", "ETCDCTL_API=3", *restore_argv(probe.binary, f"{wd}/snapshot.db", f"{wd}/staging.tmp",
                                                  m.etcd_member, run.cluster.initial_cluster(), run.cluster.etcd_token,
                                                  m.peer_url, bump)]
    said = datadir.restore_into_staging(conn, m, run.recovery_id, argv, work_timeout(snap.size))
    return {"state": said, "binary": probe.binary, "bumped": bump, "bump_supported": bool(bump) or not asked}


def park_manifest(run: Run, step: Step, up: dict) -> str:
    return datadir.park_manifest(*on(run, step))


def unpark_manifest(run: Run, step: Step, up: dict) -> str:
    return datadir.unpark_manifest(*on(run, step))


def set_state_new(run: Run, step: Step, up: dict) -> str:
    conn, m = on(run, step)
    return datadir.set_initial_cluster_state(conn, m, "new", run.recovery_id)


def swap_data(run: Run, step: Step, up: dict) -> dict:
    conn, m = on(run, step)
    # The checkpoint may say "stopped", but someone may have started etcd since: the master
    # decides. Never move a data dir from under a running member.
    service.stop_etcd(conn, m)
    result, kept = datadir.swap_in_restored(conn, m, run.recovery_id, quarantine_name(run, m))
    return {"result": result, "quarantine": kept or "(nothing to keep)"}


def clean_work(run: Run, step: Step, up: dict) -> str:
    return datadir.clean_work_dir(*on(run, step), run.recovery_id)


def delete_old_data(run: Run, step: Step, up: dict) -> str:
    return datadir.delete_quarantine(*on(run, step), run.recovery_id)


def start_restored(run: Run, step: Step, up: dict) -> str:
    conn, m = on(run, step)
    try:
        return service.start_etcd(conn, m)
    except CommandError:
        logs = summarize_log(service.read_service_logs(conn, m))
        q = datadir.find_quarantine(conn, m, run.recovery_id) or "(nothing was kept)"
        raise NovaDRError(f"{m.etcd_member} did not start with the restored data. Last log lines: {logs}. Its old "
                          f"data is in {q}. Fix the cause, then re-run this restore (recovery_id={run.recovery_id}) "
                          "to go on from here") from None


def wait_healthy(run: Run, step: Step, up: dict) -> dict:
    members = [m.etcd_member for m in run.cluster.masters]
    state = etcd.wait_until_healthy({mb: run.conn(mb) for mb in members}, run.cluster, members,
                                    timeout=run.data.get("healthy_timeout", 120))
    sick = [m for m, ok in state.items() if not ok]
    if sick:
        logs = {m: service.read_service_logs(run.conn(m), run.cluster.master(m))[-1500:] for m in sick}
        raise NovaDRError(f"not healthy in time: {', '.join(sick)}. Last log lines: {logs}")
    return state


def verify(run: Run, step: Step, up: dict) -> dict:
    """Bounded retry: raft indexes converge a moment after start."""
    expected = up["check-snapshot"]["detail"]["revision"]
    bumps = {r["detail"].get("bumped", 0) for k, r in up.items() if k.startswith("restore-staging@")}
    bump = max(bumps) if bumps else 0
    deadline = time.monotonic() + run.data.get("verify_timeout", 30)
    while True:
        rows, problems = verify_once(run, revision_after_restore(expected, bump))
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1)
    if problems:
        raise NovaDRError("verification failed: " + "; ".join(problems))
    return {"rows": rows, "expected_revision": revision_after_restore(expected, bump), "bumped": bump}


def verify_once(run: Run, expected_revision: int) -> tuple[list[dict], list[str]]:
    cluster = run.cluster
    rows, problems = read_status_rows(run, cluster.masters)
    if problems:
        return rows, problems
    rev = min(r["revision"] for r in rows)

    def hash_and_count(r):
        m = cluster.master(r["member"])
        conn, env = run.conn(m.etcd_member), r.pop("_env")
        r.pop("_id")
        r["hashkv"] = etcd.read_hashkv(conn, m, env, rev).hash
        r["live_keys"] = etcd.count_live_keys(conn, m, env)

    problems += not_converged(run, cluster.masters, rows)
    mc.each_master(rows, hash_and_count)
    leaders = [r["member"] for r in rows if r["leader"]]
    if len(leaders) != 1:
        problems.append(f"{len(leaders)} leaders ({', '.join(leaders) or 'none'})")
    for key in ("raft_term", "hashkv", "live_keys", "revision"):
        if len({r[key] for r in rows}) > 1:
            problems.append(f"{key} differs: " + ", ".join(f"{r['member']}={r[key]}" for r in rows))
    if rev < expected_revision:
        problems.append(f"revision {rev} is below the snapshot's {expected_revision}")
    elif rev > expected_revision:
        parked = all(m.paths.kube_apiserver_manifest for m in cluster.masters)
        if parked:
            # No client can write: every kube-apiserver is parked. So these members do not serve
            # what was restored (etcd reads another data dir, or another cluster answered).
            problems.append(f"revision {rev} is above the snapshot's {expected_revision}, although no "
                            "kube-apiserver runs: the members do not serve the restored data")
        else:  # a master without a parked manifest: its clients may have written since the start
            rows[0]["note"] = f"revision {rev} > snapshot's {expected_revision}: something wrote after the start"
    return rows, problems


ACTIONS = {f.__name__: f for f in (copy_snapshot, check_snapshot, restore_staging, park_manifest, unpark_manifest,
                                   stop_etcd, start_restored, set_state_new, swap_data, clean_work, delete_old_data,
                                   wait_healthy, verify)}


# -- preflight refusals and the plan ----------------------------------------------------

def refuse_unsafe(facts: ClusterFacts, snapshot: SnapshotCheck) -> None:
    if facts.unreachable:
        why = "; ".join(f.error for f in facts.masters if not f.reachable)
        raise PreflightError(f"cannot restore: {', '.join(facts.unreachable)} unreachable over SSH ({why}). "
                             "Every master takes part in a full restore; nothing was changed")
    unknown = [f.member for f in facts.masters if f.free_bytes is None]
    if unknown:
        raise PreflightError(f"cannot read the free disk space of the data dir on {', '.join(unknown)} (`df -B1 "
                             "--output=avail` printed no number); a restore needs room for the snapshot and its copy. "
                             "Check df on that master; nothing was changed")
    short = [f.member for f in facts.masters if f.free_bytes < 2 * snapshot.size + (64 << 20)]
    if short:
        raise PreflightError(f"not enough free disk for the snapshot and its restore on {', '.join(short)} "
                             f"(need about {2 * snapshot.size + (64 << 20)} bytes); nothing was changed")


def contents_of(run: Run):
    """What the snapshot holds, once read (prepare() started reading it beside the preflight)."""
    c = run.data.get("contents")
    if isinstance(c, Future):
        c = run.data["contents"] = c.result()
    return c


def make_plan(run: Run, facts: ClusterFacts) -> Plan:
    snap: SnapshotCheck = run.data["snapshot"]
    contents = contents_of(run)  # first: a failed read adds its warning
    warnings = list(snap.warnings)
    if facts.has_quorum:
        warnings.append(f"the cluster still has quorum ({len(facts.healthy)} of {facts.voting_members} healthy): "
                        "a full restore throws away every write since the snapshot. Consider "
                        "replace-etcd-member or restart-etcd-member instead")
    return build_restore_plan(run.cluster, facts, run.recovery_id, snapshot_name=snap.source.rsplit("/", 1)[-1],
                              snapshot_sha256=snap.sha256, bump_revision=run.data["bump_revision"],
                              archive_member=snap.archive_member,
                              delete_old_data=run.data["delete_old_data"], warnings=warnings,
                              point=point_lines(run),
                              contents=contents.line(datetime.now(timezone.utc)) if contents else None)


def point_lines(run: Run) -> list[str] | None:
    built = run.data.get("point")
    if built is None:
        return None
    lines = built.plan.lines(run.data["point_asked"])
    if run.data["bump_revision"] != built.plan.bump:
        lines[-1] = f"revision bump: +{run.data['bump_revision']} (as asked; the history would size it +{built.plan.bump})"
    return lines + [f"built: {built.applied['puts']} keys written and {built.applied['deletes']} deleted in "
                    f"{built.applied['txns']} txns, {built.applied['leases_granted']} leases granted; the point's "
                    f"snapshot is at revision {built.revision}"]


def snapshot_from_store(store: str, backup: str, cluster, workdir: str, s3_block: str | None,
                        identity_block: str | None = None, allow_unsigned: bool = False) -> tuple[str, str | None]:
    """Fetch the chosen set's etcd archive (and manifest), decrypt it when it is encrypted, and
    check its signature and sha256s before anything. Returns the snapshot and, for a set no
    trusted key signed (accepted with allow_unsigned), the warning the plan shows."""
    st = open_store(store, s3_block)
    names = [m.archive_name for m in cluster.masters]
    found, passed = newest_trusted(st, backup or "latest", names, cluster.backup_signers, allow_unsigned)
    fetched = fetch_set(st, found, Path(workdir) / "fetched", names=[found.etcd], identity_block=identity_block,
                        trusted=cluster.backup_signers, allow_unsigned=allow_unsigned)
    if fetched["problems"]:
        raise SnapshotError(f"backup set {found.ts} in {st.url}: " + "; ".join(fetched["problems"])
                            + "; nothing was changed")
    warnings = [] if fetched["signed_by"] else [fetched["origin"]]
    if not found.manifest:  # the daemon's set, or one whose backup was killed before its manifest
        warnings[-1] += "; its etcd snapshot is checked by its own sha256 trailer only"
    if passed:
        warnings.append(f"restoring {found.ts}, the newest set a trusted key signed; " + passed_note(passed))
    return str(Path(workdir) / "fetched" / fetched["files"][0]), "; ".join(warnings) or None


def snapshot_of_point(cluster, store: str | None, backup: str | None, point: str | None, revision: int | None,
                      workdir: str, s3_block: str | None, identity_block: str | None, allow_unsigned: bool):
    """The snapshot of a point in time or a revision, built on this machine from the store's
    last full snapshot before it and the history recorded since (tasks/point.py)."""
    from tasks.point import build_point, parse_point

    if not store:
        raise NovaDRError("a restore to a point (point= or revision=) needs store=: the backup store whose sets "
                          "and history (continuous-backup) reach it; nothing was changed")
    if point and revision is not None:
        raise NovaDRError("give point= or revision=, not both; nothing was changed")
    if backup not in (None, "", "latest"):
        raise NovaDRError(f"backup={backup!r} with a point: the point chooses the set (the last full snapshot "
                          "before it); leave backup empty. Nothing was changed")
    if revision is not None and revision <= 0:
        raise NovaDRError(f"revision={revision}: give a revision etcd reached (a positive number)")
    newest = point in ("latest", "newest")  # the newest revision the history recorded without a gap
    built = build_point(open_store(store, s3_block), cluster, Path(workdir) / "point", revision=revision,
                        point=parse_point(point) if point and not newest else None, identity_block=identity_block,
                        allow_unsigned=allow_unsigned)
    return built.db, built


def prepare(inventory: str, snapshot: str | None, recovery_id: str | None, allow_version_mismatch: bool,
            bump_revision: int | None, delete_old_data: bool, workdir: str, store: str | None = None,
            backup: str | None = None, s3_block: str | None = None, identity_block: str | None = None,
            allow_unsigned: bool = False, for_a_person: bool = True, point: str | None = None,
            revision: int | None = None) -> Run:
    """Everything before the cluster is touched: inventory, snapshot checks, recovery id.
    `for_a_person`: someone reads the plan, so it shows what the snapshot holds."""
    cluster = resolve_inventory(inventory)
    if snapshot and store:
        raise NovaDRError("give either snapshot or store (+ backup), not both")
    if bump_revision is not None and bump_revision < 0:
        raise NovaDRError(f"bump_revision={bump_revision}: give 0 (no bump) or a positive number")
    origin, built, rid_key = None, None, None
    if point or revision is not None:
        snapshot, built = snapshot_of_point(cluster, store, backup, point, revision, workdir, s3_block,
                                            identity_block, allow_unsigned)
        origin = "; ".join(built.warnings) or None
        if bump_revision is None:  # sized from the newest revision ever recorded, not a guess
            bump_revision = built.plan.bump
        # The point's snapshot is built again by a re-run, byte for byte another file: the
        # recovery is keyed on what it restores (the base set and the revision), not its sha256.
        rid_key = f"{built.plan.base}@{built.plan.target}"
    elif store:
        snapshot, origin = snapshot_from_store(store, backup or "latest", cluster, workdir, s3_block, identity_block,
                                               allow_unsigned)
    elif snapshot and snapshot.endswith(".age"):  # an encrypted snapshot given as a file
        from tasks.backups import decrypt_files

        local = Path(workdir) / "decrypted"
        local.mkdir()
        os.symlink(Path(snapshot).resolve(), local / Path(snapshot).name)
        snapshot = str(local / decrypt_files([Path(snapshot).name], local, identity_block)[0])
    if not snapshot:
        raise NovaDRError("no snapshot given; pass --param snapshot=PATH (an etcd_snapshot_*.db.tar.gz or .db), "
                          "or store=URL with backup=latest|TIMESTAMP")
    if for_a_person:  # the plan's read of the contents needs the .db here; otherwise it is only hashed
        refuse_no_room(workdir, snapshot)
    snap = prepare_snapshot(snapshot, workdir, cluster.nova_version, allow_version_mismatch, keep_db=for_a_person)
    if origin:
        print(f"warning: {origin}")  # the flow logs it (log_prints); `nova-dr plan` shows it
        snap.warnings.append(origin)
    if bump_revision is None:
        bump_revision = DEFAULT_BUMP
    rid = mc.derive_recovery_id(FLOW_NAME, cluster.name, rid_key or snap.sha256, recovery_id)
    # Read in a scratch etcd on this machine while the lock is taken and the preflight reads
    # the masters (seconds at 200 MB): the plan is the first to need it. Without the gate no
    # one reads the plan and nothing is decided from it, so it is not read at all: at 8 GB it
    # is a second full restore, on this machine's disk and cores, beside the real one.
    return Run(FLOW_NAME, cluster, rid, data={"snapshot": snap, "bump_revision": bump_revision,
                                               "delete_old_data": delete_old_data, "point": built,
                                               "point_asked": point or f"revision {revision}",
                                               "contents": in_background(read_contents, snap) if for_a_person
                                               else None})


def in_background(fn, *args) -> Future:
    f = Future()

    def go():
        try:
            f.set_result(fn(*args))
        except BaseException as e:  # the waiter gets it; nothing dies unseen in this thread
            f.set_exception(e)

    threading.Thread(target=go, daemon=True).start()
    return f


# What this machine keeps beside the bytes it writes: logs, Prefect's own files.
SLACK = 64 << 20


def refuse_no_room(workdir: str, snapshot: str) -> None:
    """The archive is unpacked on this machine before anything: with room for it, or not at all."""
    size = unpacked_size(snapshot)
    if not size:  # a plain .db is read where it lies
        return
    need = size + SLACK
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise PreflightError(f"{workdir}: {free >> 20} MiB free on this machine; unpacking {Path(snapshot).name} needs "
                             f"about {need >> 20} MiB. Free space there, or set NOVA_DR_HOME to a larger disk. "
                             "Nothing was changed")


def read_contents(snap: SnapshotCheck):
    """The snapshot's revision, key count and newest change, read in a scratch etcd on this
    machine, for the plan; a warning (never a refusal) when it cannot be read here."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < snap.size + SLACK:  # the scratch etcd restores a copy of the whole snapshot there
        snap.warnings.append(f"the snapshot's content (revision, keys, newest change) was not read: "
                             f"{tempfile.gettempdir()} has {free >> 20} MiB free, a scratch etcd of it needs about "
                             f"{(snap.size + SLACK) >> 20} MiB")
        return None
    try:
        with scratch_etcd(snap.db_path, find_etcd_bins()) as drill:
            return snapshot_contents(drill)
    except (NovaDRError, CommandError, OSError, ValueError, KeyError) as err:
        snap.warnings.append(f"the snapshot's content (revision, keys, newest change) could not be read on this "
                             f"machine, so the plan cannot show it: {str(err)[:300]}")
        return None


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def restore_etcd_cluster(
    inventory: str,
    snapshot: str | None = None,
    auto_approve: bool = False,
    recovery_id: str | None = None,
    allow_version_mismatch: bool = False,
    delete_old_data: bool = False,
    bump_revision: int | None = None,
    approval_timeout_minutes: float = 60,
    wait_for_cluster_seconds: float = 120,
    healthy_timeout_seconds: float = 120,
    store: str | None = None,
    backup: str | None = None,
    s3_block: str | None = None,
    identity_block: str | None = None,
    force: bool = False,
    allow_unsigned: bool = False,
    approvals_required: int = 1,
    point: str | None = None,
    revision: int | None = None,
) -> dict:
    """Restore the whole etcd cluster from a snapshot (quorum lost, API down): the last resort.

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        snapshot: a path on the machine running the flow to an etcd_snapshot_*.db.tar.gz or a .db (or use store + backup)
        auto_approve: skip the approval gate (drills and tests); production leaves it off
        recovery_id: resume that recovery (printed first by every run); empty derives one from the snapshot
        allow_version_mismatch: restore a snapshot made by another Nova x.y.Z (may break platform services)
        delete_old_data: delete the old data dirs after verification instead of keeping them in quarantine
        bump_revision: revisions to add with --mark-compacted, where the etcd binary supports it (0 never bumps;
            empty: 1,000,000,000, or for a point, the newest revision the history recorded plus 1,000,000)
        approval_timeout_minutes: how long the gate waits before the run ends with nothing changed
        wait_for_cluster_seconds: how long to wait while another recovery holds this cluster
        healthy_timeout_seconds: how long the members may take to answer healthy after the start, plus 1 s per 50 MB of snapshot
        store: take the snapshot from a backup store instead: a directory (NFS mount) or s3://bucket/prefix
        backup: with store: latest (the newest complete set) or a set's timestamp YYYY-MM-DD_HHMMSS
        s3_block: a Nova Backup S3 Credentials block for an s3:// store (default: the environment)
        identity_block: a Nova Backup Age Identity block, for an encrypted snapshot (name ending .age)
        force: take the cluster lock from another recovery that has not expired (the plan says so)
        allow_unsigned: with store: accept a set that no key in the inventory's backup_signers signed, or
            one with no manifest (the platform's daemon's); the plan shows it as a warning
        approvals_required: how many different people must approve the plan, one after another (1 to 3)
        point: with store: restore the cluster as it was at this time, e.g. 2026-12-02T10:15:30Z, or latest for
            the newest revision recorded (needs the history continuous-backup records; the plan shows the revision)
        revision: with store: restore the cluster as it was at this etcd revision (instead of point)
    """
    log = get_run_logger()
    with scratch_dir("nova-dr-snap-", mc.state_dir()) as tmp:
        run = prepare(inventory, snapshot, recovery_id, allow_version_mismatch, bump_revision, delete_old_data, tmp,
                      store, backup, s3_block, identity_block, allow_unsigned, for_a_person=not auto_approve,
                      point=point, revision=revision)
        # Longer for a large snapshot: etcd indexes all of it at start.
        run.data["healthy_timeout"] = start_timeout(run.data["snapshot"].size, healthy_timeout_seconds)
        run.data["auto_approve"] = auto_approve
        run.data["approvals"] = approvals_required
        print(f"recovery id: {run.recovery_id}")
        try:
            with cluster_lock(run, wait_for_cluster_seconds, force):
                return _restore(run, auto_approve, approval_timeout_minutes, log)
        finally:
            run.close()
            contents_of(run)  # its scratch etcd is gone before the snapshot's folder is


def _restore(run: Run, auto_approve: bool, approval_timeout_minutes: float, log) -> dict:
    snap: SnapshotCheck = run.data["snapshot"]

    def plan_from(facts: ClusterFacts) -> Plan:
        refuse_unsafe(facts, snap)
        return make_plan(run, facts)

    started = time.time()
    before, plan, approval, results = mc.run_recovery(run, plan_from, ACTIONS, auto_approve,
                                                      approval_timeout_minutes, run.data["approvals"])
    ctx = FlowRunContext.get()
    ctx_id = str(ctx.flow_run.id) if ctx else ""
    report = render_report(run, plan, before, results, approval, time.time() - started, ctx_id)
    mc.publish("restore-report", report, "restore-etcd-cluster: what was done and what to do next")
    print(mc.render_table(["member", "leader", "raft term", "applied index", "revision", "hashkv", "live keys"],
                          [[r["member"], r["leader"], r["raft_term"], r["applied_index"], r["revision"], r["hashkv"],
                            r["live_keys"]] for r in results["verify"]["detail"]["rows"]], markdown=False))
    summary = {"recovery_id": run.recovery_id, "snapshot": snap.source, "sha256": snap.sha256,
               "verify": results["verify"]["detail"], "approval": approval,
               "quarantine": {k.split("@")[1]: r["detail"]["quarantine"] for k, r in results.items()
                              if k.startswith("swap-data@")},
               "resumed_steps": [k for k, r in results.items() if r.get("flow_run_id") not in ("", ctx_id)]}
    mc.mark_recovery_done(run.recovery_id, summary)
    return summary


def render_report(run: Run, plan: Plan, before: ClusterFacts, results: dict, approval: dict, seconds: float,
                  flow_run_id: str) -> str:
    v = results["verify"]["detail"]
    after = mc.render_table(["member", "leader", "raft term", "applied index", "revision", "hashkv", "live keys"],
                            [[r["member"], "yes" if r["leader"] else "", r["raft_term"], r["applied_index"],
                              r["revision"], r["hashkv"], r["live_keys"]] for r in v["rows"]])
    quarantine = [f"- {k.split('@')[1]}: `{r['detail']['quarantine']}`" for k, r in results.items()
                  if k.startswith("swap-data@")]
    bumped = (f"revision bumped by {v['bumped']} (--mark-compacted)" if v["bumped"]
              else "no revision bump (the etcd binary has no --bump-revision, or bump_revision=0)")
    snap: SnapshotCheck = run.data["snapshot"]
    return "\n".join([
        f"# restore-etcd-cluster on `{run.cluster.name}`: done in {seconds:.1f}s", "",
        f"- recovery id: `{run.recovery_id}`", f"- snapshot: `{snap.source}` (sha256 `{snap.sha256}`)",
        f"- approved by: {approval['approved_by']} ({approval.get('reason') or 'no reason given'}), through "
        f"{approval.get('via', '?')}",
        f"- expected revision {v['expected_revision']}; {bumped}",
        f"- what the snapshot held: {contents_of(run).line(datetime.now(timezone.utc))}"
        if contents_of(run) else "- what the snapshot held: not read (auto_approve: no one read the plan; "
        "`nova-dr plan` shows it)" if run.data.get("auto_approve") else "- what the snapshot held: not read on this "
        "machine", "",
        "## Before", mc.facts_table(before), "", "## After", after, "",
        "## Steps", mc.step_table(results, flow_run_id), "",
        "## Old data (quarantine)", *(quarantine or ["- none"]), "",
        "## Manual follow-ups", *[f"- {f}" for f in FOLLOW_UPS],
    ])


def plan_restore(inventory: str, snapshot: str | None = None, recovery_id: str | None = None,
                 allow_version_mismatch: bool = False, bump_revision: int | None = None,
                 delete_old_data: bool = False, store: str | None = None, backup: str | None = None,
                 s3_block: str | None = None, identity_block: str | None = None, allow_unsigned: bool = False,
                 point: str | None = None, revision: int | None = None, **_ignored) -> Plan:
    """`nova-dr plan restore-etcd-cluster`: preflight and plan, nothing touched."""
    with scratch_dir("nova-dr-plan-", mc.state_dir()) as tmp:
        run = prepare(inventory, snapshot, recovery_id, allow_version_mismatch,
                      None if bump_revision in (None, "") else int(bump_revision),
                      delete_old_data in (True, "true", "1", "yes"), tmp, store, backup, s3_block, identity_block,
                      allow_unsigned in (True, "true", "1", "yes"), point=point,
                      revision=None if revision in (None, "") else int(revision))
        try:
            facts = mc.gather_facts(run)
            mc.refuse_mismatched(facts)
            refuse_unsafe(facts, run.data["snapshot"])
            plan = make_plan(run, facts)
            return plan.model_copy(update={"summary": plan.summary + "\n\nPreflight:\n" + mc.facts_table(facts, False)})
        finally:
            run.close()
            contents_of(run)
