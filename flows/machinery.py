"""What every recovery flow shares: connections, preflight, the approval gate, the DAG
executor with checkpoints, and the recovery id.

A recovery flow reads: preflight -> plan -> gate -> re-check -> execute -> verify -> report.
(One recovery per cluster: flows/lock.py; `run.lock` is set while the run holds the cluster.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from prefect import get_run_logger, task
from prefect.logging import get_logger
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.flow_runs import FlowPauseTimeout, pause_flow_run
from prefect.input import RunInput
from prefect.serializers import JSONSerializer
from pydantic import Field

from core.errors import AuthError, ConnectError, NotApproved, NovaDRError, PlanChanged, PreflightError
from core.etcd import env_mismatches
from core.facts import ClusterFacts, MasterFacts
from core.inventory import Cluster
from core.plan import Plan, Step, size_text
from core.resume import resume_notes
from flows.lock import with_lock_notes
from tasks import datadir, etcd, service
from tasks.remote import Connector, connect

if TYPE_CHECKING:
    from blocks.state import StateStore


def state_dir() -> Path:
    """Checkpoints and finished-recovery records. NOVA_DR_HOME, default ~/.nova-dr. Mode 0700:
    whoever could write a checkpoint could make a re-run skip a step, and Prefect reads a
    result file with whatever serializer the file itself names (pickle included)."""
    d = Path(os.environ.get("NOVA_DR_HOME", "~/.nova-dr")).expanduser()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if d.stat().st_uid == os.geteuid() and d.stat().st_mode & 0o077:
        d.chmod(0o700)  # made by an older nova-dr, 0755
    return d


def checkpoint_encoder(obj):
    """JSON for checkpoints: a step's result is plain data. An error (Prefect persists a failed
    step's exception too) is kept as its type only: its message holds remote argv and output."""
    if isinstance(obj, BaseException):
        return {"error": type(obj).__name__}
    raise TypeError(f"{type(obj).__name__} is not plain data")


# Not pickle: a checkpoint never holds code, and what is written is what a person can read.
CHECKPOINTS = JSONSerializer(object_encoder="flows.machinery.checkpoint_encoder", object_decoder=None)


# -- recovery ids ----------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def shared() -> StateStore | None:
    """The fleet's shared state (NOVA_DR_STATE=block:NAME), or None: this machine's state_dir()."""
    from blocks.state import shared_state

    return shared_state(os.environ.get("NOVA_DR_STATE"))


def _done_marker(recovery_id: str) -> Path:
    return state_dir() / "recoveries" / f"{recovery_id}.done.json"


def _is_done(recovery_id: str) -> bool:
    st = shared()
    return st.read(f"{recovery_id}.done.json") is not None if st else _done_marker(recovery_id).exists()


def derive_recovery_id(flow: str, cluster: str, key: str, given: str | None) -> str:
    """The given id, or one derived from the flow, the cluster and (say) the snapshot's sha256.

    A derived id whose recovery already finished gets a new generation, so that restoring the
    same snapshot again next month starts afresh instead of replaying old checkpoints."""
    if given:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}", given):
            raise NovaDRError(f"recovery_id {given!r}: use letters, digits, '.', '_' and '-' (at most 81)")
        if _is_done(given):
            raise NovaDRError(f"recovery {given} already completed; omit recovery_id to start a new recovery")
        return given
    base = f"{slug(flow)}-{slug(cluster)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    rid, gen = base, 1
    while _is_done(rid):
        gen += 1
        rid = f"{base}-{gen}"
    return rid


def mark_recovery_done(recovery_id: str, summary: dict) -> None:
    if (st := shared()) is not None:
        st.write(f"{recovery_id}.done.json", json.dumps(summary, indent=1, default=str).encode())
        return
    f = _done_marker(recovery_id)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(summary, indent=1, default=str))


# -- connections and preflight ----------------------------------------------------------

@dataclass
class Run:
    """One recovery's working set. Passed to tasks; never hashed (checkpoints use plain keys)."""

    flow: str
    cluster: Cluster
    recovery_id: str = ""
    conns: dict[str, Connector] = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # per-flow inputs: the snapshot, options
    lock: object = None  # the ClusterLock this run holds (flows/lock.py), while it holds it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def conn(self, member: str) -> Connector:
        with self._lock:  # steps on several masters ask at once; one connection per master
            if member not in self.conns:
                self.conns[member] = connect(self.cluster, self.cluster.master(member))
            return self.conns[member]

    def close(self) -> None:
        for c in self.conns.values():
            c.close()


def each_master(masters, fn) -> list:
    """`fn(master)` on every master at once, results in the masters' order. One after another,
    a 7-master verification spent seconds in etcdctl start-ups alone."""
    masters = list(masters)
    with ThreadPoolExecutor(max(1, len(masters))) as ex:
        return list(ex.map(fn, masters))


def read_master_facts(run: Run, member: str) -> MasterFacts:
    m = run.cluster.master(member)
    try:
        conn = run.conn(member)
        env = etcd.read_etcd_env(conn, m)
        # Independent reads, each on its own channel of the one connection: every SSH command
        # costs a round trip, and a dead member's etcdctl waits out its dial timeout.
        ex = ThreadPoolExecutor(5)
        try:
            health = ex.submit(etcd.check_endpoint_health, conn, m, env)
            stat = ex.submit(etcd.read_endpoint_status, conn, m, env)
            mlist = ex.submit(etcd.list_etcd_members, conn, m, env)
            probed = ex.submit(datadir.probe_data_dir, conn, m)
            svc = ex.submit(service.read_service_state, conn, m)
            probe = probed.result()
            # A unit the service manager says is stopped or failed serves nothing: its etcdctl
            # reads are not waited for (2 s of dial timeout, the most of a replacement's
            # preflight). A unit that is active or still starting is asked, and etcd's own
            # client decides.
            down = svc.result() in ("inactive", "failed")
        finally:
            ex.shutdown(wait=False)  # what is still running ends at its own command timeout
        healthy = False if down else health.result()
        status = stat.result() if healthy else None  # an unhealthy member's answers are not facts
        members = mlist.result() if healthy else None
        return MasterFacts(
            member=member, node=m.node, service=svc.result(), healthy=healthy,
            status=status, members=tuple(members) if members is not None else None,
            initial_cluster_state=env.get("ETCD_INITIAL_CLUSTER_STATE", ""),
            data_dir_exists=probe.get("exists", False), data_dir_has_member=probe.get("member", False),
            data_dir_mount_point=probe.get("mount_point", False), data_dir_bytes=probe.get("bytes", 0),
            free_bytes=probe.get("free"), manifest=probe.get("manifest", ""), entries=tuple(probe["entries"]),
            mismatches=tuple(env_mismatches(m, run.cluster.etcd_token, env, m.paths.etcd_env)),
        )
    except ConnectError as err:
        return MasterFacts(member=member, node=m.node, reachable=False, error=str(err))


def gather_facts(run: Run) -> ClusterFacts:
    """Read-only: every master in parallel."""
    facts = each_master(run.cluster.masters, lambda m: read_master_facts(run, m.etcd_member))
    return ClusterFacts(masters=tuple(facts))


@task(name="preflight", retries=0, cache_policy=NO_CACHE)
def preflight(run: Run) -> ClusterFacts:
    facts = gather_facts(run)
    get_run_logger().info("preflight:\n%s", facts_table(facts, markdown=False))
    return facts


def refuse_mismatched(facts: ClusterFacts) -> None:
    """Before any plan: the inventory must describe the etcd that really runs on each master."""
    refuse_wrong_env([w for f in facts.masters for w in f.mismatches])


def refuse_wrong_env(wrong: list[str]) -> None:
    if wrong:
        raise PreflightError("the inventory does not match the masters: " + "; ".join(wrong)
                             + ". Correct the inventory (or the env file), then run again; nothing was changed")


def facts_table(facts: ClusterFacts, markdown: bool = True) -> str:
    head = ["member", "node", "ssh", "service", "healthy", "leader", "raft term", "applied index", "revision",
            "data dir", "mount point", "free", "INITIAL_CLUSTER_STATE"]
    rows = []
    for f in facts.masters:
        s = f.status
        rows.append([f.member, f.node, "ok" if f.reachable else "UNREACHABLE", f.service, "yes" if f.healthy else "NO",
                     "yes" if s and s.is_leader else "", s.raft_term if s else "", s.raft_applied_index if s else "",
                     s.revision if s else "", size_text(f.data_dir_bytes) if f.data_dir_has_member else "no member dir",
                     "yes" if f.data_dir_mount_point else "no", size_text(f.free_bytes) if f.free_bytes is not None else "UNKNOWN", f.initial_cluster_state])
    return render_table(head, rows, markdown)


def render_table(head: list[str], rows: list[list], markdown: bool = True) -> str:
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head] + rows)


# -- the approval gate -----------------------------------------------------------------

class Approval(RunInput):
    approve: bool = Field(False, description="Tick to run the plan shown above. Leave unticked to reject it.")
    name: str = Field("", description="Who decides (recorded in the report).")
    reason: str = Field("", description="Why (recorded in the report).")
    via: str = Field("", description="Filled in by nova-dr's own tools (the terminal, `nova-dr approve`); leave it "
                                     "empty")


# Prefect's open-source server records no caller: an answer with no `via` came from its UI or
# its REST API, under the name typed there.
UI_OR_API = "the Prefect UI or REST API (Prefect records no caller: the name is as typed)"


# In-process listeners: `nova-dr run` in a terminal answers the gate itself.
GATE_LISTENERS: list[Callable[[str, Plan], None]] = []


def api_is_shared() -> bool:
    from prefect.settings import PREFECT_API_URL
    return bool(PREFECT_API_URL.value())


_TIMED_OUT = "approval_timeout_minutes passed with no answer"


def _reject_at_timeout(flow_run_id, timeout_minutes: float) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:  # a no-op (ABORT) if someone answered meanwhile
            client.resume_flow_run(flow_run_id, run_input={"approve": False, "name": "nova-dr", "reason": _TIMED_OUT})
    except Exception as err:  # then the server's own deadline ends the run, with its own message
        get_logger("nova_dr.gate").warning("answering the gate at its timeout failed: %s", err)


# A deployment with this tag lets its runs skip the gate (a drill on a scratch cluster, say).
ALLOW_AUTO_APPROVE = "nova-dr-allow-auto-approve"


def refuse_unattended_from_api() -> None:
    """auto_approve=true is a parameter like any other: whoever reaches the Prefect API could
    start an unattended full restore through a deployment. A run of a deployment may skip the
    gate only when that deployment was made to allow it; a run started in this process (`nova-dr
    run`, a script, a test) was started by someone at this machine."""
    ctx = FlowRunContext.get()
    dep_id = ctx.flow_run.deployment_id if ctx and ctx.flow_run else None
    if dep_id is None:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment(dep_id)
    if ALLOW_AUTO_APPROVE not in (dep.tags or []):
        raise NotApproved(f"auto_approve=true is refused for a run of deployment {dep.name!r}: a caller of the Prefect "
                          "API must not start an unattended recovery. Approve it at its gate (UI, `nova-dr approve`, "
                          f"or the REST API), or give a drill deployment the tag {ALLOW_AUTO_APPROVE}. Nothing was "
                          "changed")


def approval_gate(plan: Plan, auto_approve: bool, timeout_minutes: float, approvals: int = 1) -> dict:
    """Pause until someone approves (or `approvals` different people, one after another).
    Returns who, why and through what. Raises NotApproved otherwise."""
    log = get_run_logger()
    if not 1 <= approvals <= 3:
        raise NovaDRError(f"approvals_required={approvals}: give 1, 2 or 3; nothing was changed")
    if auto_approve and approvals > 1:
        raise NotApproved(f"approvals_required={approvals} asks for {approvals} different people; auto_approve cannot "
                          "stand in for them. Nothing was changed")
    if auto_approve:
        refuse_unattended_from_api()
        log.warning("auto_approve=true: the plan runs without asking anyone")
        return {"approved_by": "auto_approve", "reason": "auto_approve parameter", "via": "auto_approve"}
    if not GATE_LISTENERS and not api_is_shared():
        raise NotApproved(
            "this run needs an approval and nobody can give it: no terminal and no shared Prefect server "
            "(PREFECT_API_URL). Run `nova-dr run` in a terminal, point PREFECT_API_URL at a server, or pass "
            "--auto-approve. Nothing was changed")
    answers: list = []
    for i in range(approvals):
        answer = _one_approval(plan, timeout_minutes, i, approvals)
        if approvals > 1:
            who = answer.name.strip().casefold()
            if not who or who in {a.name.strip().casefold() for a in answers}:
                raise NotApproved(f"approval {i + 1} of {approvals} came from {answer.name or 'no name'!r}, who is not "
                                  f"a new person: this plan needs {approvals} different names; nothing was changed")
        answers.append(answer)
    who = " and ".join(a.name or "(no name)" for a in answers)
    log.info("approved by %s: %s", who, "; ".join(a.reason or "(no reason)" for a in answers))
    return {"approved_by": who, "reason": "; ".join(a.reason for a in answers if a.reason),
            "via": "; ".join(a.via or UI_OR_API for a in answers)}


def _one_approval(plan: Plan, timeout_minutes: float, i: int, of: int) -> Approval:
    log = get_run_logger()
    ctx = FlowRunContext.get()
    for listener in GATE_LISTENERS:
        listener(str(ctx.flow_run.id), plan)
    form = Approval.with_initial_data(description=plan.markdown(), approve=False)
    log.info("waiting for approval%s of flow run %s (UI, `nova-dr approve`, or the REST API)",
             f" {i + 1} of {of}" if of > 1 else "", ctx.flow_run.id)
    timeout = max(1, int(timeout_minutes * 60))
    # Once a pause has timed out, Prefect's server turns any state the run proposes into its own
    # "The flow was paused and never resumed." (measured, 3.9.1: our message was lost). So the
    # run answers its own gate with a rejection at the timeout, and the server's own deadline
    # is later: the run then ends with our message, saying nothing was changed.
    expiry = threading.Timer(timeout, _reject_at_timeout, args=(ctx.flow_run.id, timeout_minutes))
    expiry.daemon = True
    expiry.start()
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout + 120, poll_interval=2,
                                key=f"approve-{plan.fingerprint()}" + (f"-{i + 1}" if i else ""))
    except FlowPauseTimeout:
        raise NotApproved(f"no approval within {timeout_minutes:g} min; nothing was changed") from None
    finally:
        expiry.cancel()
    if not answer.approve and answer.reason == _TIMED_OUT:
        raise NotApproved(f"no approval within {timeout_minutes:g} min; nothing was changed")
    if not answer.approve:
        raise NotApproved(f"plan rejected by {answer.name or 'someone'}"
                          f"{': ' + answer.reason if answer.reason else ''}; nothing was changed")
    return answer


def ensure_plan_unchanged(before: Plan, after: Plan) -> None:
    if before.fingerprint() != after.fingerprint():
        changed = sorted({s.id for s in after.steps} ^ {s.id for s in before.steps}) or ["commands or order"]
        raise PlanChanged(
            f"the cluster changed while the plan waited for approval (differs in: {', '.join(changed[:6])}); "
            "nothing was executed. Run the flow again to see the new plan")


# -- the executor ----------------------------------------------------------------------

# action name -> function(run, step, upstream results) -> detail (a str or dict)
Action = Callable[[Run, Step, dict], object]


def _checkpoint_key(ctx, params) -> str | None:
    step: Step = params["step"]
    return f"{params['run'].recovery_id}-{step.id}" if step.args.get("checkpoint", True) else None


def _retry_only_transient(task, task_run, state) -> bool:
    # A lost SSH connection is transient; every action reads the master's state again
    # before acting, so the retry never repeats a change that already landed.
    try:
        state.result()
    except AuthError:  # a refused login or sudo: a retry asks again with the same key or password
        return False
    except ConnectError:
        return True
    except Exception:
        return False
    return False


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_only_transient,
      cache_key_fn=_checkpoint_key, persist_result=True, result_serializer=CHECKPOINTS)
def run_step(run: Run, step: Step, actions: dict, upstream: dict) -> dict:
    if run.lock is not None:
        run.lock.ensure_held()  # a run that lost the cluster to another recovery changes nothing more
    started = time.time()
    detail = actions[step.action](run, step, upstream)
    ctx = FlowRunContext.get()
    return {"step": step.id, "master": step.master, "detail": detail, "seconds": round(time.time() - started, 2),
            "flow_run_id": str(ctx.flow_run.id) if ctx else ""}


def checkpoint_max_age() -> timedelta:
    """A checkpoint older than this is not trusted: a re-run a day later does the step again
    (each reads the master's state first). NOVA_DR_CHECKPOINT_MAX_AGE_HOURS, default 24."""
    return timedelta(hours=float(os.environ.get("NOVA_DR_CHECKPOINT_MAX_AGE_HOURS", "24")))


def checkpoints_done(run: Run, plan: Plan) -> dict[str, str]:
    """Step id -> when an earlier run of this recovery finished it, for the live checkpoints
    (the result records run_step's cache writes, named by _checkpoint_key)."""
    storage, st = state_dir() / "checkpoints", shared()
    written = st.modified() if st else {}
    now, out = datetime.now(timezone.utc), {}
    for s in plan.steps:
        name = f"{run.recovery_id}-{s.id}"
        try:
            if st:
                if name not in written or (record := st.read(name)) is None:
                    continue
                meta, mtime = json.loads(record).get("metadata", {}), written[name]
            else:
                meta, mtime = json.loads((storage / name).read_text()).get("metadata", {}), (storage / name).stat().st_mtime
            done = datetime.fromtimestamp(mtime, timezone.utc)
        except (OSError, ValueError):
            continue
        expires = meta.get("expiration")
        if expires and datetime.fromisoformat(expires.replace("Z", "+00:00")) <= now:
            continue
        out[s.id] = f"{done:%Y-%m-%d %H:%M:%S} UTC"
    return out


def with_resume_notes(run: Run, plan: Plan, facts: ClusterFacts) -> Plan:
    line, refusals = resume_notes(plan, checkpoints_done(run, plan), facts)
    if refusals:
        raise PreflightError("the masters no longer agree with what an earlier run of this recovery did: "
                             + "; ".join(refusals) + ". The cluster was changed since; start a fresh recovery "
                             f"with --param recovery_id=NEW (this one is {run.recovery_id}). Nothing was changed")
    if not line:
        return plan
    return plan.model_copy(update={"summary": (plan.summary + "\n\n" if plan.summary else "") + line})


def execute_plan(run: Run, plan: Plan, actions: dict[str, Action]) -> dict[str, dict]:
    """Submit every step with its dependencies; Prefect runs what is ready in parallel."""
    storage = shared()
    if storage is None:
        storage = state_dir() / "checkpoints"
        storage.mkdir(mode=0o700, exist_ok=True)
    futures = {}
    for s in plan.steps:
        runner = run_step.with_options(task_run_name=s.id, result_storage=storage,
                                       cache_expiration=checkpoint_max_age())
        futures[s.id] = runner.submit(run, s, actions, {d: futures[d] for d in s.deps},
                                      wait_for=[futures[d] for d in s.deps])
    results, failed = {}, None
    for sid, fut in futures.items():
        try:
            results[sid] = fut.result()
        except Exception as err:  # the first failure in plan order is the one to report
            failed = failed or (sid, err)
    if failed:
        sid, err = failed
        raise NovaDRError(f"step {sid} failed: {err}") from err
    return results


def step_table(results: dict[str, dict], current_run: str, markdown: bool = True) -> str:
    rows = []
    for sid, r in results.items():
        earlier = r.get("flow_run_id") and r["flow_run_id"] != current_run
        detail = r["detail"] if isinstance(r["detail"], str) else json.dumps(r["detail"], default=str)
        rows.append([sid, r.get("master") or "cluster", f"{r['seconds']:.2f}s",
                     ("(earlier run) " if earlier else "") + detail[:160]])
    return render_table(["step", "on", "took", "result"], rows, markdown)


def publish(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=key, description=description)



def run_recovery(run: Run, make_plan: Callable[[ClusterFacts], Plan], actions: dict[str, Action],
                 auto_approve: bool, approval_timeout_minutes: float,
                 approvals: int = 1) -> tuple[ClusterFacts, Plan, dict, dict]:
    """The shape every recovery shares: preflight -> plan -> gate -> re-check -> execute.

    `make_plan` refuses (raises) when the facts do not allow the procedure. Returns the facts
    before, the plan, who approved, and each step's result."""
    log = get_run_logger()
    def checked_plan(facts: ClusterFacts) -> Plan:
        refuse_mismatched(facts)
        return make_plan(facts)

    before = preflight(run)
    plan = with_resume_notes(run, with_lock_notes(checked_plan(before), run.lock), before)
    log.info("%s", plan.text())
    publish(f"{slug(plan.flow)}-plan", plan.markdown(), f"What {plan.flow} will do")
    if not auto_approve:
        # An approval can take hours: no SSH connection is held open (and left to die behind
        # a firewall) meanwhile. The re-check after it connects again.
        run.close()
    approval = approval_gate(plan, auto_approve, approval_timeout_minutes, approvals)
    if run.lock is not None:
        run.lock.ensure_held(now=True)  # a forced take-over during the wait is seen before any change
    if not auto_approve:
        ensure_plan_unchanged(plan, checked_plan(preflight(run)))
    return before, plan, approval, execute_plan(run, plan, actions)
