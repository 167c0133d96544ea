"""etcd's space: the NOSPACE alarm, the quota, fragmentation, and the rolling defragmentation
plans of recover-etcd-space and defragment-etcd. Pure functions of what the masters said.

Measured on etcd 3.5.1 (tests/captured/alarm_list_nospace.json, endpoint_health_nospace.json):
- Under NOSPACE `endpoint health` says false for every member ("Active Alarm(s): NOSPACE"),
  while `endpoint status` still answers, with dbSize and dbSizeInUse.
- The quota is checked against the physical file size (backend Size()), so compaction alone
  frees nothing: each member must be defragmented before the alarm is disarmed, or the next
  write raises it again.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from core.errors import PreflightError
from core.etcd import Alarm, work_timeout
from core.inventory import Cluster
from core.plan import Plan, Step, size_text

DEFAULT_QUOTA = 2 * 1024 ** 3  # etcd 3.5 DefaultQuotaBytes, when ETCD_QUOTA_BACKEND_BYTES is unset or 0
ALARM_PREFIX = "Active Alarm(s)"
# After compaction the live data must leave room under the quota, or the first writes raise
# NOSPACE again at once.
FITS_FRACTION = 0.9
CLOSE_FRACTION = 0.75  # above it the report warns that the alarm will be back soon
CHECK_KEY = "/nova-dr/space-check/"  # outside /registry/: the kube-apiserver never reads it


class SpaceRow(BaseModel):
    """One member as the space flows see it."""
    model_config = ConfigDict(frozen=True)

    member: str
    answers: bool  # endpoint status answered (an alarm does not stop that)
    healthy: bool = False  # endpoint health true (false for every member while an alarm is active)
    health_error: str = ""
    leader: bool = False
    member_id: int = 0
    db_size: int = 0
    in_use: int = 0
    free_bytes: int | None = None

    @property
    def fragmentation(self) -> float:
        return 1 - self.in_use / self.db_size if self.db_size else 0.0

    @property
    def up_but_for_alarms(self) -> bool:
        return self.answers and (self.healthy or self.health_error.startswith(ALARM_PREFIX))


def quota_bytes(env: dict[str, str]) -> int | None:
    """The member's quota from its env file, as etcd reads it: unset or 0 is the default,
    a negative number no quota at all (None)."""
    raw = env.get("ETCD_QUOTA_BACKEND_BYTES", "").strip()
    if not raw:
        return DEFAULT_QUOTA
    try:
        n = int(raw)
    except ValueError:
        raise PreflightError(f"ETCD_QUOTA_BACKEND_BYTES={raw!r} in the env file is not a number of bytes; etcd "
                             "itself refuses to start with it. Correct it first; nothing was changed") from None
    return DEFAULT_QUOTA if n == 0 else None if n < 0 else n


def free_needed(row: SpaceRow) -> int:
    """Defragmentation writes a new file of the live data beside the old one, then swaps them."""
    return row.in_use + max(row.in_use // 10, 16 << 20)


def defrag_timeout(db_size: int) -> float:
    """etcd's default 5 s command timeout is far too short (LAB.md: 1.2 GB needed more)."""
    return work_timeout(db_size, floor=60.0)


def rolling_order(rows: list[SpaceRow]) -> list[SpaceRow]:
    """Followers first, the leader last (defragmenting the leader under load blocks every write
    the cluster takes); the inventory's order otherwise."""
    return [r for r in rows if not r.leader] + [r for r in rows if r.leader]



def quota_advice(quota: int | None) -> str:
    return (f"The quota is {size_text(quota) if quota else 'unlimited'} (ETCD_QUOTA_BACKEND_BYTES in each master's etcd "
            "env file, etcd's default 2 GiB when unset; etcd warns above 8 GiB). Raise it on every master and "
            "restart the members one at a time (restart-etcd-member), or delete data the cluster no longer needs")


def _refuse_down(rows: list[SpaceRow], what: str) -> None:
    down = [r.member for r in rows if not r.up_but_for_alarms]
    if down:
        why = "; ".join(f"{r.member}: {r.health_error or 'does not answer endpoint status'}" for r in rows
                        if r.member in down)
        raise PreflightError(f"cannot {what}: {', '.join(down)} {'is' if len(down) == 1 else 'are'} down ({why}). "
                             "Bring it back first (restart-etcd-member, or replace-etcd-member); nothing was changed")


def _refuse_short_disk(rows: list[SpaceRow]) -> None:
    unknown = [r.member for r in rows if r.free_bytes is None]
    if unknown:
        raise PreflightError(f"cannot read the free disk space of the data dir on {', '.join(unknown)}; "
                             "defragmentation needs room for a copy of the database. Nothing was changed")
    short = [r for r in rows if r.free_bytes < free_needed(r)]
    if short:
        raise PreflightError(
            "not enough free disk for defragmentation (it writes a copy of the live data beside the database): "
            + ", ".join(f"{r.member} has {size_text(r.free_bytes)} free, needs {size_text(free_needed(r))}" for r in short)
            + ". Free space in that data dir's filesystem (never in the etcd member dir); nothing was changed")


def _step(id, action, master, title, command="", deps=(), **args) -> Step:
    return Step(id=id, action=action, master=master, title=title, command=command, deps=tuple(deps), args=args)


def _verify_step(rows: list[SpaceRow], after: str) -> Step:
    return _step("verify", "verify_members", None, "Verify: one leader, same raft term, applied indexes converged, "
                 "the same hashkv everywhere", "etcdctl endpoint status / endpoint hashkv", deps=[after], hashkv=True,
                 members=[r.member for r in rows], checkpoint=False)


def _defrag_steps(cluster: Cluster, order: list[SpaceRow], after: str | None) -> list[Step]:
    steps, prev = [], after
    for r in order:
        m = cluster.master(r.member)
        steps.append(_step(f"defrag@{r.member}", "defrag_member", r.member,
                           f"Defragment {r.member}{' (the leader, last)' if r.leader else ''}, then wait until it "
                           "answers again before the next", f"etcdctl defrag --endpoints={m.client_url} "
                           "--command-timeout=<60 s + 1 s per 2 MB of its database>", deps=[prev] if prev else []))
        prev = steps[-1].id
    return steps


def build_space_plan(cluster: Cluster, rows: list[SpaceRow], alarms: list[Alarm], quota: int | None,
                     recovery_id: str) -> Plan:
    """recover-etcd-space: compact, defragment one member at a time, disarm, prove a write."""
    corrupt = [a for a in alarms if a.alarm != "NOSPACE"]
    if corrupt:
        raise PreflightError(f"etcd raised {', '.join(sorted({a.alarm for a in corrupt}))}: that is not a space "
                             "problem, and disarming it would hide a member whose data differs. Find the member "
                             "(etcdctl alarm list) and replace it with replace-etcd-member; nothing was changed")
    _refuse_down(rows, "recover etcd's space")
    _refuse_short_disk(rows)
    if not alarms and not any(quota and r.db_size >= FITS_FRACTION * quota for r in rows):
        raise PreflightError("no NOSPACE alarm, and every member's database is well under the quota: nothing to "
                             "recover. defragment-etcd shrinks fragmented databases; nothing was changed")
    helper = next((r.member for r in rows if r.leader), rows[0].member)
    order = rolling_order(rows)
    compact = _step("compact", "compact", helper, "Compact the key history to the current revision (read when the "
                    "step runs), and wait until it is applied", "etcdctl compaction <current revision> --physical")
    first = _defrag_steps(cluster, order[:1], "compact")
    # Only a defragmented file tells what the live data weighs: dbSizeInUse counts the pages
    # a compaction freed only after a later write commits, and NOSPACE refuses writes.
    fits = _step("check-fits", "check_fits", None, f"Check from {order[0].member}'s defragmented file that the live "
                 "data fits the quota with room to spare; otherwise stop and say how to raise the quota",
                 "etcdctl endpoint status (dbSize)", deps=[first[0].id], quota=quota, member=order[0].member,
                 checkpoint=False)
    defrag = first + _defrag_steps(cluster, order[1:], "check-fits")
    disarm = _step("disarm", "disarm_alarms", helper, "Disarm the NOSPACE alarms (only after every member is "
                   "defragmented: the quota is checked against the file size)", "etcdctl alarm disarm",
                   deps=[defrag[-1].id if len(defrag) > 1 else "check-fits"], checkpoint=False)
    prove = _step("prove-write", "prove_write", helper, "Prove that a write succeeds (a key outside /registry/, "
                  "written and deleted) and that no alarm is left", f"etcdctl put {CHECK_KEY}{recovery_id} ...; "
                  "etcdctl del ...; etcdctl alarm list", deps=["disarm"], checkpoint=False)
    verify = _verify_step(rows, "prove-write")
    sizes = ", ".join(f"{r.member} {size_text(r.db_size)} ({size_text(r.in_use)} in use)" for r in rows)
    who = ", ".join(sorted({next((r.member for r in rows if r.member_id == a.member_id), f"{a.member_id:x}")
                            for a in alarms})) or "none"
    return Plan(flow="recover-etcd-space", cluster=cluster.name, recovery_id=recovery_id,
                steps=(compact, first[0], fits, *defrag[1:], disarm, prove, verify),
                summary=f"NOSPACE alarm raised by: {who}. Databases: {sizes}; quota {size_text(quota) if quota else 'none'}. "
                        "Compact the history, defragment the members one at a time (followers first, the leader "
                        "last, each answering again before the next), then disarm the alarm. No data is deleted: "
                        "compaction drops old revisions only; every current key stays.")


def build_defrag_plan(cluster: Cluster, rows: list[SpaceRow], alarms: list[Alarm], min_fragmentation: float,
                      min_db_bytes: int, recovery_id: str) -> tuple[Plan, list[str]]:
    """defragment-etcd: only the members past both thresholds, rolling. Returns the plan (no
    steps when none qualifies) and, per member left alone, why."""
    if alarms:
        raise PreflightError(f"etcd has active alarms ({', '.join(sorted({a.alarm for a in alarms}))}): run "
                             "recover-etcd-space for NOSPACE (replace-etcd-member for CORRUPT); a scheduled "
                             "defragmentation does not touch a cluster in trouble; nothing was changed")
    unhealthy = [r for r in rows if not (r.answers and r.healthy)]
    if unhealthy:
        raise PreflightError(f"{', '.join(r.member for r in unhealthy)} not healthy: a scheduled defragmentation "
                             "never blocks a member while another one is down; nothing was changed")
    chosen, skipped = [], []
    for r in rows:
        if r.fragmentation >= min_fragmentation and r.db_size >= min_db_bytes:
            chosen.append(r)
        else:
            skipped.append(f"{r.member}: {size_text(r.db_size)}, {r.fragmentation:.0%} fragmented (thresholds "
                           f"{min_fragmentation:.0%} of at least {size_text(min_db_bytes)})")
    if chosen:
        _refuse_short_disk(chosen)
    steps = _defrag_steps(cluster, rolling_order(chosen), None)
    if steps:
        steps.append(_verify_step(rows, steps[-1].id))
    summary = (f"Defragment {', '.join(r.member for r in rolling_order(chosen))}, one at a time, the leader last."
               if chosen else "No member passes the thresholds: nothing to do.")
    return Plan(flow="defragment-etcd", cluster=cluster.name, recovery_id=recovery_id, steps=tuple(steps),
                summary=summary + (" Left alone: " + "; ".join(skipped) if skipped else "")), skipped
