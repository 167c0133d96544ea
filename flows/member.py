"""restart-etcd-member (SPEC P6) and replace-etcd-member (P7), on the recovery machinery."""

from __future__ import annotations

import time

from prefect import flow
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.inventory import resolve_inventory
from core.errors import PreflightError
from core.facts import ClusterFacts
from core.member_plan import build_replace_plan, build_restart_plan, choose_member_to_replace
from core.plan import Plan
from flows import actions as act
from flows import machinery as mc
from flows.machinery import Run
from flows.lock import cluster_lock

RESTART, REPLACE = "restart-etcd-member", "replace-etcd-member"

ACTIONS = {f.__name__: f for f in (act.stop_etcd, act.start_etcd, act.start_etcd_or_explain, act.wait_caught_up,
                                   act.verify_members, act.remove_member, act.add_member, act.quarantine_data,
                                   act.set_state_existing)}


def _refuse_unknown_or_unreachable(run: Run, facts: ClusterFacts, member: str) -> None:
    f = facts.by_member(member)
    if not f.reachable:
        raise PreflightError(f"{member} is unreachable over SSH ({f.error}); nothing was changed")


def restart_plan(run: Run, member: str, force: bool):
    def make(facts: ClusterFacts) -> Plan:
        _refuse_unknown_or_unreachable(run, facts, member)
        if member in facts.healthy and not force:
            raise PreflightError(f"{member} is healthy: nothing to restart (force=true restarts it anyway)")
        return build_restart_plan(run.cluster, facts, member, run.recovery_id)
    return make


def replace_plan(run: Run, member: str | None, force: bool):
    def make(facts: ClusterFacts) -> Plan:
        target = choose_member_to_replace(run.cluster, facts, member, force)
        # Membership changes go through a healthy peer, the leader when there is one.
        helpers = [x for x in facts.healthy if x != target]
        helper = facts.leader if facts.leader in helpers else helpers[0]
        return build_replace_plan(run.cluster, facts, target, helper, run.recovery_id)
    return make


def _report(run: Run, plan: Plan, before: ClusterFacts, approval: dict, results: dict, seconds: float) -> dict:
    ctx = FlowRunContext.get()
    rows = results["verify"]["detail"]["rows"]
    cols = [c for c in ("member", "leader", "raft_term", "applied_index", "revision", "hashkv") if c in rows[0]]
    quarantine = [f"- {k.split('@')[1]}: `{r['detail']['quarantine']}`" for k, r in results.items()
                  if k.startswith("quarantine-data@")]
    md = "\n".join([
        f"# {plan.flow} on `{run.cluster.name}`: done in {seconds:.1f}s", "", plan.summary, "",
        f"- recovery id: `{run.recovery_id}`", f"- approved by: {approval['approved_by']} ({approval.get('reason') or '-'}), "
        f"through {approval.get('via', '?')}",
        "", "## Before", mc.facts_table(before), "", "## After", mc.render_table(cols, [[r[c] for c in cols] for r in rows]),
        "", "## Steps", mc.step_table(results, str(ctx.flow_run.id) if ctx else ""),
        *(["", "## Old data (quarantine)", *quarantine] if quarantine else []),
    ])
    mc.publish(f"{plan.flow}-report", md, f"{plan.flow}: what was done")
    print(mc.render_table(cols, [[r[c] for c in cols] for r in rows], markdown=False))
    current = str(ctx.flow_run.id) if ctx else ""
    summary = {"recovery_id": run.recovery_id, "approval": approval, "verify": results["verify"]["detail"],
               "steps": {k: r["detail"] for k, r in results.items()},
               "resumed_steps": [k for k, r in results.items() if r.get("flow_run_id") not in ("", current)]}
    mc.mark_recovery_done(run.recovery_id, summary)
    return summary


def _run(flow_name: str, inventory: str, member: str | None, plan_fn, key: str, recovery_id: str | None,
         auto_approve: bool, approval_timeout_minutes: float, wait_for_cluster_seconds: float,
         catch_up_timeout_seconds: float, force_lock: bool) -> dict:
    cluster = resolve_inventory(inventory)
    if member:
        cluster.master(member)  # an unknown name fails here, listing the members, before anything
    rid = mc.derive_recovery_id(flow_name, cluster.name, key, recovery_id)
    print(f"recovery id: {rid}")
    run = Run(flow_name, cluster, rid, data={"catch_up_timeout": catch_up_timeout_seconds})
    try:
        with cluster_lock(run, wait_for_cluster_seconds, force_lock):
            started = time.time()
            before, plan, approval, results = mc.run_recovery(run, plan_fn(run), ACTIONS, auto_approve,
                                                              approval_timeout_minutes)
            return _report(run, plan, before, approval, results, time.time() - started)
    finally:
        run.close()


@flow(name=RESTART, task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def restart_etcd_member(
    inventory: str,
    member: str,
    auto_approve: bool = False,
    force: bool = False,
    recovery_id: str | None = None,
    approval_timeout_minutes: float = 60,
    wait_for_cluster_seconds: float = 120,
    catch_up_timeout_seconds: float = 90,
    force_lock: bool = False,
) -> dict:
    """Restart a failed or hanging etcd member and wait until it has caught up. Never escalates:
    if it does not come back, the run fails with its log and names replace-etcd-member.

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        member: the etcd member name, e.g. etcd2
        auto_approve: skip the approval gate (drills and tests); production leaves it off
        force: restart it even when it answers healthy
        recovery_id: resume that recovery (printed first by every run)
        approval_timeout_minutes: how long the gate waits before the run ends with nothing changed
        wait_for_cluster_seconds: how long to wait while another recovery holds this cluster
        catch_up_timeout_seconds: how long the member may take to be healthy and caught up
        force_lock: take the cluster lock from another recovery that has not expired (the plan says so)
    """
    return _run(RESTART, inventory, member, lambda run: restart_plan(run, member, force), member, recovery_id,
                auto_approve, approval_timeout_minutes, wait_for_cluster_seconds, catch_up_timeout_seconds, force_lock)


@flow(name=REPLACE, task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def replace_etcd_member(
    inventory: str,
    member: str | None = None,
    auto_approve: bool = False,
    force: bool = False,
    recovery_id: str | None = None,
    approval_timeout_minutes: float = 60,
    wait_for_cluster_seconds: float = 120,
    catch_up_timeout_seconds: float = 90,
    force_lock: bool = False,
) -> dict:
    """Replace one etcd member whose data is lost (quorum still held): member remove, member add,
    an empty data dir (the old one quarantined), ETCD_INITIAL_CLUSTER_STATE=existing, start.

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        member: the etcd member to replace; empty picks the single unhealthy one
        auto_approve: skip the approval gate (drills and tests); production leaves it off
        force: replace it even when it answers healthy
        recovery_id: resume that recovery (printed first by every run)
        approval_timeout_minutes: how long the gate waits before the run ends with nothing changed
        wait_for_cluster_seconds: how long to wait while another recovery holds this cluster
        catch_up_timeout_seconds: how long the new member may take to be healthy and caught up
        force_lock: take the cluster lock from another recovery that has not expired (the plan says so)
    """
    return _run(REPLACE, inventory, member, lambda run: replace_plan(run, member, force), member or "auto",
                recovery_id, auto_approve, approval_timeout_minutes, wait_for_cluster_seconds,
                catch_up_timeout_seconds, force_lock)


def _plan_only(flow_name: str, plan_fn, inventory: str, member: str | None, force: bool) -> Plan:
    cluster = resolve_inventory(inventory)
    run = Run(flow_name, cluster, mc.derive_recovery_id(flow_name, cluster.name, member or "auto", None))
    try:
        facts = mc.gather_facts(run)
        mc.refuse_mismatched(facts)
        plan = plan_fn(run, member, force)(facts)
        return plan.model_copy(update={"summary": plan.summary + "\n\nPreflight:\n" + mc.facts_table(facts, False)})
    finally:
        run.close()


def plan_restart(inventory: str, member: str, force: bool = False, **_ignored) -> Plan:
    return _plan_only(RESTART, restart_plan, inventory, member, force in (True, "true"))


def plan_replace(inventory: str, member: str | None = None, force: bool = False, **_ignored) -> Plan:
    return _plan_only(REPLACE, replace_plan, inventory, member, force in (True, "true"))
