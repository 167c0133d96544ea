"""The full restore (SPEC P8) as a DAG of steps: a pure function of facts and parameters.

Order, and why:
- the snapshot is copied and restored into a staging dir on every master BEFORE anything
  stops: `snapshot restore` checks the snapshot's hash, so a bad snapshot or a full disk is
  found while the cluster still runs as it did;
- stops wait for every staging restore; the leader stops last, so it does not try (and time
  out) handing leadership to peers that are shutting down;
- every member starts only after every swap: one at a time cannot reach quorum.
"""

from __future__ import annotations

from core.etcd import restore_argv, show
from core.facts import ClusterFacts
from core.inventory import Cluster
from core.plan import Plan, Step

FOLLOW_UPS = [
    "Kubernetes is now back at the snapshot's time. Restart the kubelet on every node "
    "(`systemctl restart kubelet`): it holds pod state newer than the snapshot.",
    "Check the CNI (IP allocations made after the snapshot may collide) and the CSI drivers "
    "(volumes attached or provisioned after the snapshot are unknown to the cluster).",
    "Check controllers and operators that keep external state (load balancers, DNS, StarVault).",
    "The old data dirs stay in quarantine (see the report) until you delete them.",
]


def build_restore_plan(cluster: Cluster, facts: ClusterFacts, recovery_id: str, *, snapshot_name: str,
                       snapshot_sha256: str, bump_revision: int, delete_old_data: bool,
                       warnings: list[str] = (), contents: str | None = None,
                       archive_member: str | None = None, point: list[str] | None = None) -> Plan:
    members = [m.etcd_member for m in cluster.masters]
    first = members[0]
    steps: list[Step] = []

    def add(id, action, master, title, command="", deps=(), destructive=False, checkpoint=True, **args):
        steps.append(Step(id=id, action=action, master=master, title=title, command=command, deps=tuple(deps),
                          destructive=destructive, args={"checkpoint": checkpoint, **args}))

    work = {m.etcd_member: f"{m.paths.data_dir}/nova-dr-{recovery_id}" for m in cluster.masters}
    for m in cluster.masters:
        # An archive crosses the network as it is (gzip: ~4x fewer bytes) and is unpacked there.
        z = "z" if snapshot_name.endswith(("gz", ".tgz")) else ""
        unpack = f"tar -x{z}O {archive_member}" if archive_member else "cat"
        add(f"copy-snapshot@{m.etcd_member}", "copy_snapshot", m.etcd_member,
            "Copy the snapshot to the master over SSH (the staging restore checks its sha256 trailer)",
            f"cat {snapshot_name} | ssh {m.node} '{unpack} > {work[m.etcd_member]}/snapshot.db'")
    add("check-snapshot", "check_snapshot", first, "Read the snapshot's revision and hash (snapshot status)",
        f"etcdutl snapshot status {work[first]}/snapshot.db -w json", deps=[f"copy-snapshot@{first}"])
    for m in cluster.masters:
        mb = m.etcd_member
        argv = restore_argv(m.paths.etcdutl or m.paths.etcdctl, f"{work[mb]}/snapshot.db", f"{work[mb]}/staging.tmp",
                            mb, cluster.initial_cluster(), cluster.etcd_token, m.peer_url, bump_revision)
        add(f"restore-staging@{mb}", "restore_staging", mb,
            "Restore the snapshot into a staging dir beside the data dir (etcd still runs)",
            show(argv) + (" (bump flags only where the binary has them)" if bump_revision else ""),
            deps=[f"copy-snapshot@{mb}"], bump_revision=bump_revision)
    all_staged = [f"restore-staging@{mb}" for mb in members]

    parked = []
    for m in cluster.masters:
        f = facts.by_member(m.etcd_member)
        if m.paths.kube_apiserver_manifest and f.manifest in ("present", "parked"):
            add(f"park-manifest@{m.etcd_member}", "park_manifest", m.etcd_member,
                "Move the kube-apiserver manifest out of the manifests folder",
                f"mv {m.paths.kube_apiserver_manifest} {m.paths.manifest_park_dir}/", deps=all_staged, destructive=True)
            parked.append(m.etcd_member)

    leader = facts.leader
    followers = [mb for mb in members if mb != leader]
    for mb in followers + ([leader] if leader else []):
        deps = all_staged + ([f"park-manifest@{mb}"] if mb in parked else [])
        if mb == leader:
            deps += [f"stop-etcd@{f}" for f in followers]
        add(f"stop-etcd@{mb}", "stop_etcd", mb, "Stop etcd" + (" (the leader, last)" if mb == leader else ""),
            show(cluster.master(mb).paths.service_stop), deps=deps, destructive=True)
    for m in cluster.masters:
        mb = m.etcd_member
        add(f"set-state-new@{mb}", "set_state_new", mb, "Make sure ETCD_INITIAL_CLUSTER_STATE=new (copy kept)",
            f"ETCD_INITIAL_CLUSTER_STATE=new in {m.paths.etcd_env}", deps=[f"stop-etcd@{mb}"], destructive=True)
        add(f"swap-data@{mb}", "swap_data", mb,
            "Move the old member dir into quarantine and the restored one into place (renames)",
            f"mv {m.paths.data_dir}/member {m.paths.data_dir}/nova-dr-quarantine-<UTC time>-{recovery_id}/member && "
            f"mv {work[mb]}/staging/member {m.paths.data_dir}/member",
            deps=[f"set-state-new@{mb}", f"restore-staging@{mb}"], destructive=True)
    all_swapped = [f"swap-data@{mb}" for mb in members]
    for m in cluster.masters:
        add(f"start-etcd@{m.etcd_member}", "start_restored", m.etcd_member, "Start etcd (all members together)",
            show(m.paths.service_start), deps=all_swapped, destructive=True, checkpoint=False)
    add("wait-healthy", "wait_healthy", None, "Wait until every member answers healthy (bounded)",
        "etcdctl endpoint health (each member)", deps=[f"start-etcd@{mb}" for mb in members], checkpoint=False)
    add("verify", "verify", None,
        "Verify: one leader; same raft term, applied index, hashkv and live key count on every member; "
        "revision = the snapshot's (+ bump)",
        "etcdctl endpoint status / endpoint hashkv / get --count-only", checkpoint=False,
        deps=["wait-healthy", "check-snapshot", *all_staged])
    for mb in parked:
        add(f"unpark-manifest@{mb}", "unpark_manifest", mb, "Put the kube-apiserver manifest back",
            f"mv {cluster.master(mb).paths.manifest_park_dir}/... {cluster.master(mb).paths.kube_apiserver_manifest}",
            deps=["verify"], destructive=True)
    for m in cluster.masters:
        add(f"clean-work@{m.etcd_member}", "clean_work", m.etcd_member,
            "Remove this recovery's copy of the snapshot and the empty staging dir",
            f"rm {work[m.etcd_member]}/snapshot.db; rmdir {work[m.etcd_member]}/staging", deps=["verify"])
    if delete_old_data:
        for m in cluster.masters:
            add(f"delete-old-data@{m.etcd_member}", "delete_old_data", m.etcd_member,
                "Delete the quarantined old data (asked for by delete_old_data)",
                f"rm -rf {m.paths.data_dir}/nova-dr-quarantine-*-{recovery_id}", deps=["verify"], destructive=True)

    summary = (f"Restore every member of `{cluster.name}` from `{snapshot_name}` (sha256 {snapshot_sha256[:16]}...). "
               "**This rolls Kubernetes back to the snapshot's time.** Old data is moved into quarantine"
               + (", then DELETED after verification." if delete_old_data else ", not deleted.")
               + (f"\n\nWhat the snapshot holds: {contents}." if contents else "")
               + ("\n\nThe point in time, built on this machine from a full snapshot and the recorded history:\n"
                  + "\n".join(f"- {line}" for line in point) if point else ""))
    return Plan(flow="restore-etcd-cluster", cluster=cluster.name, recovery_id=recovery_id, steps=tuple(steps),
                warnings=tuple(warnings), summary=summary)
