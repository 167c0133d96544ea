"""Restarting one etcd member (SPEC P6) and replacing one whose data is lost (P7): who may be
touched, and the plan. Pure functions of the inventory, the facts and the parameters."""

from __future__ import annotations

from core.errors import PreflightError
from core.etcd import show
from core.facts import ClusterFacts
from core.inventory import Cluster
from core.plan import Plan, Step


def _step(id, action, master, title, command="", deps=(), destructive=False, checkpoint=True, **args) -> Step:
    return Step(id=id, action=action, master=master, title=title, command=command, deps=tuple(deps),
                destructive=destructive, args={"checkpoint": checkpoint, **args})


def quorum(voting: int) -> int:
    return voting // 2 + 1


def choose_member_to_replace(cluster: Cluster, facts: ClusterFacts, member: str | None, force: bool) -> str:
    """The member to replace, or a PreflightError that says why not and what to do instead."""
    if member:
        member = cluster.master(member).etcd_member  # an unknown name raises, listing the members
    unhealthy = facts.unhealthy
    if not member:
        if not unhealthy:
            raise PreflightError("every member is healthy: nothing to replace. Name one with "
                                 "--param member=NAME and force=true to replace a healthy member")
        if len(unhealthy) > 1:
            raise PreflightError(f"several members are unhealthy ({', '.join(unhealthy)}): name the one to replace "
                                 "first with --param member=NAME")
        member = unhealthy[0]
    elif member not in unhealthy and not force:
        raise PreflightError(f"{member} is healthy; replacing it throws its data away. Pass force=true if you "
                             "really mean it, or restart-etcd-member for a member that only hangs")
    target = facts.by_member(member)
    if not target.reachable:
        raise PreflightError(f"{member} is unreachable over SSH ({target.error}); its master must answer to be "
                             "replaced")
    voting = facts.voting_members
    healthy = len(facts.healthy)
    if healthy < quorum(voting):
        raise PreflightError(
            f"the cluster has no quorum ({healthy} of {voting} members healthy, {quorum(voting)} needed): a member "
            "cannot be removed or added. This is restore-etcd-cluster's case")
    others_down = [x for x in facts.unhealthy if x != member]
    if others_down:
        # etcd's strict reconfiguration check refuses `member add` unless the member handling it
        # is connected to every voting member: with another one down, the add would fail after
        # the remove had landed, leaving the cluster a member short.
        raise PreflightError(
            f"{', '.join(others_down)} {'is' if len(others_down) == 1 else 'are'} down too, and etcd refuses to add "
            f"a member while any voting member is unreachable (strict reconfiguration check). Bring "
            f"{' and '.join(others_down)} back first (restart-etcd-member), then replace {member}")
    left = healthy - (1 if member in facts.healthy else 0)
    if left < quorum(voting - 1):
        raise PreflightError(
            f"removing {member} would leave {left} healthy of {voting - 1} members, below quorum "
            f"({quorum(voting - 1)}); bring another member back first (restart-etcd-member)")
    return member


def build_restart_plan(cluster: Cluster, facts: ClusterFacts, member: str, recovery_id: str) -> Plan:
    m = cluster.master(member)
    # Members that were down before stay out of the verification: this flow does not touch them.
    check = [x.etcd_member for x in cluster.masters if x.etcd_member in facts.healthy or x.etcd_member == member]
    steps = [
        _step(f"stop-etcd@{member}", "stop_etcd", member, "Stop the unit (it may hang or crash-loop)",
              show(m.paths.service_stop), destructive=True, checkpoint=False),
        _step(f"start-etcd@{member}", "start_etcd_or_explain", member, "Start the unit", show(m.paths.service_start),
              deps=[f"stop-etcd@{member}"], destructive=True, checkpoint=False),
        _step(f"wait-caught-up@{member}", "wait_caught_up", member,
              "Wait until it is healthy and its applied index has caught up with the leader (bounded)",
              "etcdctl endpoint health / endpoint status", deps=[f"start-etcd@{member}"], checkpoint=False),
        _step("verify", "verify_members", None, f"Verify {', '.join(check)}: one leader, same raft term, applied "
              "indexes converged", "etcdctl endpoint status", deps=[f"wait-caught-up@{member}"], checkpoint=False,
              members=check),
    ]
    return Plan(flow="restart-etcd-member", cluster=cluster.name, recovery_id=recovery_id, steps=tuple(steps),
                summary=f"Restart etcd on `{member}` ({m.node}) and wait until it has caught up. Nothing else is "
                        "touched; if it does not come back, the run fails with its log and names the next step.")


def build_replace_plan(cluster: Cluster, facts: ClusterFacts, member: str, helper: str, recovery_id: str) -> Plan:
    m = cluster.master(member)
    old = next((x for x in (facts.member_list() or ()) if m.peer_url in x.peer_urls), None)
    old_id = old.hex_id if old else "(not in the member list)"
    steps = [
        _step(f"stop-etcd@{member}", "stop_etcd", member, "Stop etcd on the failed master",
              show(m.paths.service_stop), destructive=True),
        # The target is in every step id (the checkpoint key): after a failed replacement of one
        # member, replacing another must not find the first one's remove/add already "done".
        _step(f"remove-member@{member}", "remove_member", helper, f"Remove {member} from the cluster (from {helper})",
              f"etcdctl member remove {old_id}", deps=[f"stop-etcd@{member}"], destructive=True, target=member),
        _step(f"add-member@{member}", "add_member", helper, f"Add {member} back with its peer URL (from {helper})",
              f"etcdctl member add {member} --peer-urls={m.peer_url}", deps=[f"remove-member@{member}"], destructive=True,
              target=member),
        _step(f"quarantine-data@{member}", "quarantine_data", member,
              "Move the old member dir into quarantine (rename, same filesystem)",
              f"mv {m.paths.data_dir}/member {m.paths.data_dir}/nova-dr-quarantine-<UTC time>-{recovery_id}/member",
              deps=[f"stop-etcd@{member}"], destructive=True),
        _step(f"set-state-existing@{member}", "set_state_existing", member,
              "Set ETCD_INITIAL_CLUSTER_STATE=existing and the ETCD_INITIAL_CLUSTER member add printed (copy kept)",
              f"ETCD_INITIAL_CLUSTER_STATE=existing in {m.paths.etcd_env}",
              deps=[f"add-member@{member}", f"quarantine-data@{member}"], destructive=True),
        _step(f"start-etcd@{member}", "start_etcd", member, "Start etcd: it joins and fetches the data from the leader",
              show(m.paths.service_start), deps=[f"set-state-existing@{member}"], destructive=True, checkpoint=False),
        _step(f"wait-caught-up@{member}", "wait_caught_up", member,
              "Wait until it is healthy and its applied index has caught up with the leader (bounded)",
              "etcdctl endpoint health / endpoint status", deps=[f"start-etcd@{member}"], checkpoint=False),
        _step("verify", "verify_members", None,
              "Verify: every member started; one leader; same raft term, applied index and hashkv everywhere",
              "etcdctl member list / endpoint status / endpoint hashkv", deps=[f"wait-caught-up@{member}"],
              checkpoint=False, hashkv=True, members=[x.etcd_member for x in cluster.masters]),
    ]
    return Plan(flow="replace-etcd-member", cluster=cluster.name, recovery_id=recovery_id, steps=tuple(steps),
                summary=f"Replace `{member}` ({m.node}, member id {old_id}): remove it, add it back, start it with "
                        "an empty data dir so that it fetches everything from the leader. No revision bump (a member "
                        "joining a live quorum). Its old data is moved into quarantine, not deleted.")
