"""recover-etcd-space (etcd's NOSPACE alarm) and defragment-etcd (a scheduled rolling
defragmentation), on the recovery machinery. The rules are in core/space.py."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.inventory import resolve_inventory
from core.errors import ConnectError, NovaDRError
from core.etcd import Alarm, env_mismatches
from core.plan import Plan, Step, size_text
from core.space import (CHECK_KEY, CLOSE_FRACTION, FITS_FRACTION, SpaceRow, build_defrag_plan, build_space_plan,
                        defrag_timeout, quota_advice, quota_bytes)
from flows import actions as act
from flows import machinery as mc
from flows.lock import cluster_lock
from flows.machinery import Run
from tasks import datadir, etcd
from tasks.etcd import read_etcd_env

SPACE, DEFRAG = "recover-etcd-space", "defragment-etcd"


# -- what the masters say ---------------------------------------------------------------

def read_space(run: Run) -> tuple[list[SpaceRow], list[Alarm], int | None]:
    """Each member's status, health, sizes and free disk; the cluster's alarms; the quota (the
    smallest of the members': the first member to reach it raises the alarm for all)."""
    def read(m):
        try:
            conn = run.conn(m.etcd_member)
            env = read_etcd_env(conn, m)
            mc.refuse_wrong_env(env_mismatches(m, run.cluster.etcd_token, env, m.paths.etcd_env))
            with ThreadPoolExecutor(3) as ex:
                st, health, probe = (ex.submit(etcd.read_endpoint_status, conn, m, env),
                                     ex.submit(etcd.read_health, conn, m, env),
                                     ex.submit(datadir.probe_data_dir, conn, m))
            st, (healthy, error), probe = st.result(), health.result(), probe.result()
            row = SpaceRow(member=m.etcd_member, answers=st is not None, healthy=healthy, health_error=error,
                           leader=bool(st and st.is_leader), member_id=st.member_id if st else 0,
                           db_size=st.db_size if st else 0, in_use=st.db_size_in_use if st else 0,
                           free_bytes=probe.get("free"))
            return row, env
        except ConnectError as err:
            return SpaceRow(member=m.etcd_member, answers=False, health_error=f"unreachable over SSH: {err}"), None

    found = mc.each_master(run.cluster.masters, read)
    rows = [r for r, _ in found]
    quotas = [quota_bytes(env) for _, env in found if env is not None]
    limited = [q for q in quotas if q is not None]
    alarms: list[Alarm] = []
    for r, env in found:
        if r.answers:
            m = run.cluster.master(r.member)
            alarms = etcd.read_alarms(run.conn(r.member), m, env)
            break
    return rows, alarms, min(limited) if limited else None


def space_table(rows: list[SpaceRow], markdown: bool = True) -> str:
    return mc.render_table(
        ["member", "answers", "healthy", "leader", "db size", "in use", "fragmented", "free disk"],
        [[r.member, "yes" if r.answers else "NO", "yes" if r.healthy else (r.health_error or "NO")[:60],
          "yes" if r.leader else "", size_text(r.db_size), size_text(r.in_use), f"{r.fragmentation:.0%}",
          size_text(r.free_bytes) if r.free_bytes is not None else "UNKNOWN"] for r in rows], markdown)


# -- actions ----------------------------------------------------------------------------

def _status(run: Run, member: str):
    m = run.cluster.master(member)
    conn = run.conn(member)
    env = read_etcd_env(conn, m)
    return conn, m, env, etcd.read_endpoint_status(conn, m, env)


def compact(run: Run, step: Step, up: dict) -> dict:
    conn, m, env, st = _status(run, step.master)
    if st is None:
        raise NovaDRError(f"{step.master} does not answer endpoint status; nothing was compacted")
    return {"revision": st.revision, "result": etcd.compact(conn, m, env, st.revision, defrag_timeout(st.db_size))}


def check_fits(run: Run, step: Step, up: dict) -> dict:
    """The live data, as the first defragmented file weighs it, against the quota."""
    quota, member = step.args["quota"], step.args["member"]
    live = up[f"defrag@{member}"]["detail"]["db_size_after"]
    if quota and live >= FITS_FRACTION * quota:
        raise NovaDRError(f"even compacted and defragmented, {member}'s database is {size_text(live)}, over "
                          f"{FITS_FRACTION:.0%} of the quota: disarming would have the alarm back within moments. "
                          + quota_advice(quota) + f". Only {member} was defragmented (harmless); run this flow again "
                          "after that")
    return {"live_data": live, "quota": quota}


def _answering(conn, m, env, timeout: float):
    """Wait until the member answers again (healthy, or unhealthy only by an alarm); its
    state and its endpoint status then."""
    deadline = time.monotonic() + timeout
    while True:
        healthy, error = etcd.read_health(conn, m, env)
        st = etcd.read_endpoint_status(conn, m, env) if SpaceRow(
            member=m.etcd_member, answers=True, healthy=healthy, health_error=error).up_but_for_alarms else None
        if st is not None:
            return ("healthy" if healthy else error), st
        if time.monotonic() > deadline:
            raise NovaDRError(f"{m.etcd_member} did not answer again within {timeout:.0f}s of its defragmentation "
                              f"({error}); the next member was not touched")
        time.sleep(0.5)


def defrag_member(run: Run, step: Step, up: dict) -> dict:
    conn, m, env, before = _status(run, step.master)
    if before is None:
        raise NovaDRError(f"{step.master} does not answer endpoint status; it was not defragmented")
    started = datetime.now(timezone.utc)
    etcd.defragment(conn, m, env, defrag_timeout(before.db_size))
    ended = datetime.now(timezone.utc)
    state, after = _answering(conn, m, env, run.data.get("catch_up_timeout", 90))
    return {"db_size_before": before.db_size, "in_use_before": before.db_size_in_use, "db_size_after": after.db_size,
            "started": started.isoformat(), "ended": ended.isoformat(),
            "seconds": round((ended - started).total_seconds(), 2), "after": state}


def disarm_alarms(run: Run, step: Step, up: dict) -> dict:
    conn, m, env, _ = _status(run, step.master)
    disarmed = etcd.disarm_alarms(conn, m, env)
    left = etcd.read_alarms(conn, m, env)
    if left:
        raise NovaDRError(f"alarms still active after `alarm disarm`: {', '.join(a.alarm for a in left)}")
    return {"disarmed": [f"{a.alarm} {a.member_id:x}" for a in disarmed]}


def prove_write(run: Run, step: Step, up: dict) -> str:
    conn, m, env, _ = _status(run, step.master)
    etcd.put_and_delete(conn, m, env, CHECK_KEY + run.recovery_id)
    left = etcd.read_alarms(conn, m, env)
    if left:
        raise NovaDRError(f"the write went through, but etcd raised {', '.join(a.alarm for a in left)} again")
    return "a write and its delete succeeded; no alarm"


ACTIONS = {f.__name__: f for f in (compact, check_fits, defrag_member, disarm_alarms, prove_write, act.verify_members)}


# -- reports ----------------------------------------------------------------------------

def _defrag_rows(results: dict) -> list[list]:
    rows = []
    for sid, r in results.items():
        if sid.startswith("defrag@"):
            d = r["detail"]
            rows.append([sid.split("@")[1], size_text(d["db_size_before"]), size_text(d["in_use_before"]),
                         size_text(d["db_size_after"]), f"{d['seconds']:.2f}s",
                         d["started"][11:23], d["ended"][11:23]])
    return rows


def _report(run: Run, plan: Plan, approval: dict, results: dict, before: list[SpaceRow], after: list[SpaceRow],
            seconds: float) -> dict:
    ctx = FlowRunContext.get()
    current = str(ctx.flow_run.id) if ctx else ""
    head = ["member", "db size before", "in use before", "db size after", "defragmenting", "from (UTC)", "to"]
    md = "\n".join([
        f"# {plan.flow} on `{run.cluster.name}`: done in {seconds:.1f}s", "", plan.summary, "",
        f"- recovery id: `{run.recovery_id}`",
        f"- approved by: {approval['approved_by']} ({approval.get('reason') or '-'}), through {approval.get('via', '?')}",
        "", "## Defragmentation, member by member", mc.render_table(head, _defrag_rows(results)),
        "", "## Before", space_table(before), "", "## After", space_table(after),
        "", "## Steps", mc.step_table(results, current),
    ])
    fits = results.get("check-fits", {}).get("detail") or {}
    if fits.get("quota") and fits["live_data"] >= CLOSE_FRACTION * fits["quota"]:
        close = (f"The live data is {size_text(fits['live_data'])}, {fits['live_data'] / fits['quota']:.0%} of the quota: "
                 f"the alarm will be back soon. {quota_advice(fits['quota'])}.")
        get_run_logger().warning("%s", close)
        md += f"\n\n> **Warning:** {close}"
    mc.publish(f"{plan.flow}-report", md, f"{plan.flow}: what was done")
    print(mc.render_table(head, _defrag_rows(results), markdown=False))
    summary = {"recovery_id": run.recovery_id, "approval": approval,
               "steps": {k: r["detail"] for k, r in results.items()},
               "before": [r.model_dump() for r in before], "after": [r.model_dump() for r in after],
               "resumed_steps": [k for k, r in results.items() if r.get("flow_run_id") not in ("", current)]}
    mc.mark_recovery_done(run.recovery_id, summary)
    return summary


# -- the flows --------------------------------------------------------------------------

def _space_plan(run: Run):
    def make(_facts) -> Plan:  # the usual facts call every member unhealthy under NOSPACE
        rows, alarms, quota = read_space(run)
        run.data["before"] = rows
        plan = build_space_plan(run.cluster, rows, alarms, quota, run.recovery_id)
        return plan.model_copy(update={"summary": plan.summary + "\n\n" + space_table(rows)})
    return make


@flow(name=SPACE, task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def recover_etcd_space(
    inventory: str,
    auto_approve: bool = False,
    recovery_id: str | None = None,
    approval_timeout_minutes: float = 60,
    wait_for_cluster_seconds: float = 120,
    catch_up_timeout_seconds: float = 90,
    force_lock: bool = False,
) -> dict:
    """Bring a cluster out of etcd's NOSPACE alarm (read-only: every write refused): compact the
    history, defragment the members one at a time (followers first, the leader last), disarm
    the alarm, prove that a write succeeds. No key is deleted.

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        auto_approve: skip the approval gate (drills and tests); production leaves it off
        recovery_id: resume that recovery (printed first by every run)
        approval_timeout_minutes: how long the gate waits before the run ends with nothing changed
        wait_for_cluster_seconds: how long to wait while another recovery holds this cluster
        catch_up_timeout_seconds: how long a member may take to answer again after its defragmentation
        force_lock: take the cluster lock from another recovery that has not expired (the plan says so)
    """
    cluster = resolve_inventory(inventory)
    rid = mc.derive_recovery_id(SPACE, cluster.name, "space", recovery_id)
    print(f"recovery id: {rid}")
    run = Run(SPACE, cluster, rid, data={"catch_up_timeout": catch_up_timeout_seconds})
    try:
        with cluster_lock(run, wait_for_cluster_seconds, force_lock):
            started = time.time()
            _, plan, approval, results = mc.run_recovery(run, _space_plan(run), ACTIONS, auto_approve,
                                                         approval_timeout_minutes)
            return _report(run, plan, approval, results, run.data["before"], read_space(run)[0],
                           time.time() - started)
    finally:
        run.close()


@flow(name=DEFRAG, task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def defragment_etcd(
    inventory: str,
    min_fragmentation_percent: float = 45,
    min_db_size_mb: float = 100,
    wait_for_cluster_seconds: float = 0,
    catch_up_timeout_seconds: float = 90,
) -> dict:
    """Routine maintenance: defragment the members whose database is both fragmented and big
    enough (defaults 45% of at least 100 MB, as OpenShift's etcd operator), one at a time, the
    leader last. Never while a member is unhealthy, an alarm is active, or a recovery holds the
    cluster. Defragmentation changes no key, so no approval is asked: the plan is published.

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        min_fragmentation_percent: defragment a member only when at least this share of its file is free pages
        min_db_size_mb: ... and only when its file is at least this big (MiB)
        wait_for_cluster_seconds: how long to wait while a recovery holds this cluster (0: do not wait)
        catch_up_timeout_seconds: how long a member may take to answer again after its defragmentation
    """
    log = get_run_logger()
    if not 0 <= min_fragmentation_percent <= 100 or min_db_size_mb < 0:
        raise NovaDRError(f"min_fragmentation_percent={min_fragmentation_percent:g}, min_db_size_mb="
                          f"{min_db_size_mb:g}: give a percentage from 0 to 100 and a size of 0 or more")
    cluster = resolve_inventory(inventory)
    rid = mc.derive_recovery_id(DEFRAG, cluster.name, "defrag", None)
    run = Run(DEFRAG, cluster, rid, data={"catch_up_timeout": catch_up_timeout_seconds})
    try:
        with cluster_lock(run, wait_for_cluster_seconds):
            started = time.time()
            rows, alarms, _ = read_space(run)
            plan, skipped = build_defrag_plan(cluster, rows, alarms, min_fragmentation_percent / 100,
                                              int(min_db_size_mb * 1024 ** 2), rid)
            log.info("%s\n%s", plan.text(), space_table(rows, markdown=False))
            if not plan.steps:
                mc.publish(f"{DEFRAG}-report", f"# {DEFRAG} on `{cluster.name}`: nothing to do\n\n{plan.summary}\n\n"
                           + space_table(rows), f"{DEFRAG}: what was done")
                mc.mark_recovery_done(rid, {"defragmented": [], "skipped": skipped})
                return {"recovery_id": rid, "steps": {}, "skipped": skipped, "before": [r.model_dump() for r in rows]}
            mc.publish(f"{DEFRAG}-plan", plan.markdown(), f"What {DEFRAG} will do")
            results = mc.execute_plan(run, plan, ACTIONS)
            approval = {"approved_by": "no approval asked (no key changes)", "via": DEFRAG}
            return {**_report(run, plan, approval, results, rows, read_space(run)[0], time.time() - started),
                    "skipped": skipped}
    finally:
        run.close()


def plan_space(inventory: str, **_ignored) -> Plan:
    cluster = resolve_inventory(inventory)
    run = Run(SPACE, cluster, mc.derive_recovery_id(SPACE, cluster.name, "space", None))
    try:
        return _space_plan(run)(None)
    finally:
        run.close()


def plan_defrag(inventory: str, min_fragmentation_percent: float = 45, min_db_size_mb: float = 100,
                **_ignored) -> Plan:
    cluster = resolve_inventory(inventory)
    run = Run(DEFRAG, cluster, mc.derive_recovery_id(DEFRAG, cluster.name, "defrag", None))
    try:
        rows, alarms, _ = read_space(run)
        plan, _ = build_defrag_plan(cluster, rows, alarms, float(min_fragmentation_percent) / 100,
                                    int(float(min_db_size_mb) * 1024 ** 2), run.recovery_id)
        return plan.model_copy(update={"summary": plan.summary + "\n\n" + space_table(rows, markdown=False)})
    finally:
        run.close()
