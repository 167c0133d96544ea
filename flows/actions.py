"""Plan actions shared by the recovery flows: action(run, step, upstream results) -> detail.

Each reads the master's real state before it acts, so a retry or a re-run is harmless.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from core.errors import CommandError, ConnectError, NovaDRError
from core.etcd import parse_env_file, summarize_log
from core.plan import Step
from flows.machinery import Run, each_master
from tasks import datadir, etcd, service
from tasks.etcd import read_etcd_env

# etcd refuses membership changes for 5 s after peers (re)connect ("unhealthy cluster"), and an
# add right after a remove can time out while a leader is elected: retry, reading the list again.
MEMBERSHIP_ATTEMPTS, MEMBERSHIP_DELAY = 12, 2.0
TRANSIENT = ("unhealthy cluster", "timed out", "deadline exceeded", "leader changed", "too many requests")


def on(run: Run, step: Step):
    return run.conn(step.master), run.cluster.master(step.master)


def stop_etcd(run: Run, step: Step, up: dict) -> str:
    return service.stop_etcd(*on(run, step))


def start_etcd(run: Run, step: Step, up: dict) -> str:
    return service.start_etcd(*on(run, step))


def _logs(run: Run, member: str) -> str:
    return summarize_log(service.read_service_logs(run.conn(member), run.cluster.master(member)))


def start_etcd_or_explain(run: Run, step: Step, up: dict) -> str:
    try:
        return service.start_etcd(*on(run, step))
    except CommandError:
        raise NovaDRError(f"{step.master} did not start. Last log lines: {_logs(run, step.master)}. Its data may be "
                          f"lost or corrupt: run replace-etcd-member --param member={step.master}") from None


def quarantine_name(run: Run, master) -> str:
    return (f"{master.paths.data_dir}/nova-dr-quarantine-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-"
            f"{run.recovery_id}")


def quarantine_data(run: Run, step: Step, up: dict) -> dict:
    conn, m = on(run, step)
    service.stop_etcd(conn, m)  # never move a data dir from under a running member
    q = datadir.find_quarantine(conn, m, run.recovery_id) or quarantine_name(run, m)
    result = datadir.quarantine_member_dir(conn, m, run.recovery_id, q)
    return {"result": result, "quarantine": datadir.find_quarantine(conn, m, run.recovery_id) or "(nothing to keep)"}


def _change_membership(run: Run, step: Step, what: str, decide) -> dict:
    """Run one membership change from a helper master with bounded retries. Before each
    try the member list is read again and `decide(members, entry, act)` sees the target's
    current entry (None when absent), so a change that already landed is never made twice.
    The planned helper goes first; one that stops answering (its master went down, its
    connection was lost half way) is replaced by the next master that is not the target."""
    target = run.cluster.master(step.args["target"])
    helpers = [step.master] + [m.etcd_member for m in run.cluster.masters
                               if m.etcd_member not in (step.master, target.etcd_member)]
    last, turn = "", 0
    for _ in range(MEMBERSHIP_ATTEMPTS):
        name = helpers[turn % len(helpers)]
        helper = run.cluster.master(name)
        try:
            conn = run.conn(name)
            env = read_etcd_env(conn, helper)
            members = etcd.list_etcd_members(conn, helper, env)
            if members is None:  # this helper's etcd did not answer: the next one
                last, turn = f"{name}'s etcd did not answer", turn + 1
                continue
            act = {"remove": lambda hex_id: etcd.member_remove(conn, helper, env, hex_id),
                   "add": lambda: etcd.member_add(conn, helper, env, target.etcd_member, target.peer_url)}
            entry = next((x for x in members if target.peer_url in x.peer_urls), None)
            return {**decide(members, entry, act), "helper": name}
        except ConnectError as err:  # ConnectionLost too: the list is read again on the next helper
            last, turn = str(err), turn + 1
            continue
        except CommandError as err:
            if not any(t in str(err).lower() for t in TRANSIENT):
                raise
            last = str(err)
            if err.code == -1:  # our own timeout: that master is suspect, the next one tries
                turn += 1
        time.sleep(MEMBERSHIP_DELAY)
    raise NovaDRError(f"member {what} of {target.etcd_member} kept failing after {MEMBERSHIP_ATTEMPTS} attempts "
                      f"(helpers tried: {', '.join(helpers[:max(1, min(turn + 1, len(helpers)))])}): {last}")


def remove_member(run: Run, step: Step, up: dict) -> dict:
    def decide(members, entry, act):
        if entry is None:
            return {"result": "already removed"}
        if not entry.started:
            return {"result": f"already removed and re-added (unstarted member {entry.hex_id}): not removing it"}
        act["remove"](entry.hex_id)
        return {"result": f"removed {entry.hex_id}"}

    return _change_membership(run, step, "remove", decide)


def add_member(run: Run, step: Step, up: dict) -> dict:
    name = step.args["target"]

    def decide(members, entry, act):
        if entry is not None:  # it landed already (maybe in a run that died): never add twice
            initial = ",".join(f"{x.name or name}={x.peer_urls[0]}" for x in members)
            return {"result": f"already added ({entry.hex_id})", "initial_cluster": initial}
        out = act["add"]()
        return {"result": "added", "initial_cluster": parse_env_file(out).get("ETCD_INITIAL_CLUSTER", "")}

    return _change_membership(run, step, "add", decide)


def set_state_existing(run: Run, step: Step, up: dict) -> str:
    conn, m = on(run, step)
    initial = up[f"add-member@{m.etcd_member}"]["detail"].get("initial_cluster") or None
    return datadir.set_initial_cluster_state(conn, m, "existing", run.recovery_id, initial)


def wait_caught_up(run: Run, step: Step, up: dict) -> dict:
    """Healthy, and it has applied everything the leader had applied a moment before: read the
    leader first, then the member. (With writers running, members are never read at one instant,
    so equal numbers would be luck.)"""
    member = step.master
    m = run.cluster.master(member)
    conn = run.conn(member)
    env = read_etcd_env(conn, m)
    timeout = run.data.get("catch_up_timeout", 90)
    deadline = time.monotonic() + timeout
    seen = "not healthy"
    while time.monotonic() < deadline:
        if etcd.check_endpoint_health(conn, m, env):
            leader = next((s for s in read_statuses(run) if s.is_leader), None)
            mine = etcd.read_endpoint_status(conn, m, env)
            if mine and leader and mine.raft_applied_index >= leader.raft_applied_index:
                return {"applied_index": mine.raft_applied_index, "leader_applied_index_before": leader.raft_applied_index}
            seen = (f"healthy, applied index {mine.raft_applied_index if mine else '?'} vs leader's "
                    f"{leader.raft_applied_index if leader else '?'}")
        time.sleep(0.2)
    nxt = step.args.get("next", f"replace-etcd-member --param member={member}")
    raise NovaDRError(f"{member} did not catch up within {timeout:g}s ({seen}). "
                      f"Last log lines: {_logs(run, member)}. Next: {nxt}")


def read_statuses(run: Run, masters=None) -> list:
    """The endpoint status of every member that answers: one whose master is unreachable
    (a helper lost half way) is not a fact about the others."""
    def read(m):
        try:
            conn = run.conn(m.etcd_member)
            return etcd.read_endpoint_status(conn, m, read_etcd_env(conn, m))
        except ConnectError:
            return None

    return [st for st in each_master(masters or run.cluster.masters, read) if st]


def verify_members(run: Run, step: Step, up: dict) -> dict:
    """Every member started and healthy; one leader; one raft term; applied indexes together;
    with hashkv=True the same hashkv at one revision everywhere. Bounded retry."""
    deadline = time.monotonic() + run.data.get("verify_timeout", 30)
    while True:
        rows, problems = _verify_once(run, step.args["members"], step.args.get("hashkv", False))
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1)
    if problems:
        raise NovaDRError("verification failed: " + "; ".join(problems))
    return {"rows": rows}


def not_converged(run: Run, masters, rows: list[dict]) -> list[str]:
    """Converged: on a second reading every member has applied at least what the most advanced
    one had applied on the first. Exact equality needs an idle cluster, and with etcd auth on
    no cluster is idle while we look: each etcdctl call's Authenticate is a raft entry."""
    ahead = max(r["applied_index"] for r in rows)
    again = {s.member_id: s.raft_applied_index for s in read_statuses(run, masters)}
    behind = [f"{r['member']}={again.get(r['_id'], '?')}" for r in rows if again.get(r["_id"], -1) < ahead]
    return [f"applied index not converged (highest was {ahead}): {', '.join(behind)}"] if behind else []


def read_status_rows(run: Run, masters) -> tuple[list[dict], list[str]]:
    """Each member's own endpoint status, as rows; the members that did not answer."""
    def read(m):
        conn = run.conn(m.etcd_member)
        env = read_etcd_env(conn, m)
        return m, env, etcd.read_endpoint_status(conn, m, env)

    rows, silent = [], []
    for m, env, st in each_master(masters, read):
        if st is None:
            silent.append(f"{m.etcd_member} does not answer endpoint status")
            continue
        rows.append({"member": m.etcd_member, "leader": st.is_leader, "raft_term": st.raft_term,
                     "applied_index": st.raft_applied_index, "revision": st.revision, "_id": st.member_id,
                     "_env": env})
    return rows, silent


def _verify_once(run: Run, names: list[str], with_hashkv: bool) -> tuple[list[dict], list[str]]:
    problems, rows = [], []
    masters = [run.cluster.master(n) for n in names]
    conn0 = run.conn(masters[0].etcd_member)
    members = etcd.list_etcd_members(conn0, masters[0], read_etcd_env(conn0, masters[0])) or []
    unstarted = [x.hex_id for x in members if not x.started]
    if unstarted or len(members) != len(run.cluster.masters):
        problems.append(f"member list has {len(members)} members, unstarted: {unstarted or 'none'}")
    status_rows, silent = read_status_rows(run, masters)
    rows += status_rows
    problems += silent
    if problems:
        return rows, problems
    if sum(r["leader"] for r in rows) != 1:
        problems.append(f"{sum(r['leader'] for r in rows)} leaders")
    if len({r["raft_term"] for r in rows}) > 1:
        problems.append("raft term differs: " + ", ".join(f"{r['member']}={r['raft_term']}" for r in rows))
    problems += not_converged(run, masters, rows)
    if with_hashkv:
        rev = min(r["revision"] for r in rows)

        def hashkv(r):
            m = run.cluster.master(r["member"])
            r["hashkv"] = etcd.read_hashkv(run.conn(m.etcd_member), m, r["_env"], rev).hash

        each_master(rows, hashkv)
        if len({r["hashkv"] for r in rows}) > 1:
            problems.append(f"hashkv at revision {rev} differs: " + ", ".join(f"{r['member']}={r['hashkv']}" for r in rows))
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], problems
