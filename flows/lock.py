"""One recovery per cluster: the lock on the masters, taken, renewed and given back.

The rules are in core/lock.py, the file on a master in tasks/lock.py. Here:
- `acquire` asks every master at once (read, decide, compare-and-swap) until a majority
  names this run, or `wait_seconds` pass; then the refusal names the holder.
- A thread renews the record every TTL/6 and spreads it to masters that were unreachable.
  Someone else's record where ours was (a forced take-over, or ours expired), or no
  majority renewed for a whole TTL, means the lock is lost: `ensure_held` then stops the
  run before its next step.
- `release` removes our record wherever it is still ours. A run that dies leaves its record
  behind: a re-run of the same recovery takes it over at once, anyone else after the expiry.

Each round opens its own SSH connections and closes them: an approval can take hours, and
the run holds no connection while it waits (the run's own connections are closed then).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

from prefect.context import FlowRunContext

from core.errors import AuthError, ClusterBusy, ConnectError, LockLost, NovaDRError
from core.inventory import Cluster, Master
from core.lock import TAKE, Holder, LockUnreadable, Seen, Verdict, busy_message, decide, majority, parse_holder
from core.plan import Plan
from tasks.lock import lock_path, read_lock, record_sha256, remove_lock, replace_lock
from tasks.remote import connect

log = logging.getLogger("nova_dr.lock")
DEFAULT_TTL = 90.0
_live_tokens: set[str] = set()  # the locks this process holds now (a process may run recoveries in turn)


def lock_ttl() -> float:
    """NOVA_DR_LOCK_TTL_SECONDS: how long a record outlives its last renewal (at least 10 s)."""
    try:
        return max(10.0, float(os.environ.get("NOVA_DR_LOCK_TTL_SECONDS", DEFAULT_TTL)))
    except ValueError:
        raise NovaDRError(f"NOVA_DR_LOCK_TTL_SECONDS={os.environ['NOVA_DR_LOCK_TTL_SECONDS']!r}: give seconds, "
                          "e.g. 90") from None


def _proc_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] == "Z" else fields[19]  # a zombie is gone; field 22 is the start time


def holder_alive(h: Holder) -> bool | None:
    """Whether the holder's process still runs: known only where it ran (this machine)."""
    if h.host != socket.gethostname():
        return None
    if h.pid == os.getpid():
        return h.token in _live_tokens
    return bool(h.pid_start) and _proc_start(h.pid) == h.pid_start


class ClusterLock:
    def __init__(self, cluster: Cluster, recovery_id: str, flow: str, force: bool = False,
                 ttl: float | None = None):
        # One SSH attempt per round: a dead master must not hold every renewal up for 30 s.
        self.cluster = cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"connect_attempts": 1})})
        self.force, self.ttl = force, ttl or lock_ttl()
        ctx = FlowRunContext.get()
        from prefect.settings import PREFECT_API_URL

        self._base = dict(recovery_id=recovery_id, flow=flow, flow_run_id=str(ctx.flow_run.id) if ctx else "",
                          host=socket.gethostname(), pid=os.getpid(), pid_start=_proc_start(os.getpid()),
                          token=secrets.token_hex(8), api=PREFECT_API_URL.value() or "embedded")
        self.held: dict[str, str] = {}  # member -> sha256 of our record there
        self._offset: dict[str, float] = {}  # member -> its clock minus ours
        self.replaced: list[Seen] = []  # the records this run took over, for the plan
        self.lost = ""
        self._mu = threading.Lock()
        self._round = threading.Lock()  # one renewal round at a time: the thread's, or ensure_held's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._confirmed = time.monotonic()

    @property
    def name(self) -> str:
        return self.cluster.name

    def record(self, master_now: float) -> str:
        return Holder(**self._base, acquired_at=master_now, expires_at=master_now + self.ttl).dumps()

    @property
    def me(self) -> Holder:
        return Holder(**self._base, acquired_at=0, expires_at=0)

    # -- one master ---------------------------------------------------------------------

    def _try(self, conn, m: Master) -> Seen:
        """Read, decide, and take the lock on one master where the rules allow."""
        f = read_lock(conn, m, self.name)
        self._offset[m.etcd_member] = f.now - time.time()
        try:
            current = parse_holder(f.text)
        except LockUnreadable as err:
            if not self.force:
                return Seen(m.etcd_member, now=f.now, error=(
                    f"{lock_path(m, self.name)} is not a nova-dr lock record ({err}); pass force=true to replace it"))
            current = None
        alive = holder_alive(current) if current else None
        verdict = decide(current, self.me, f.now, self.force, alive)
        if verdict not in TAKE:
            return Seen(m.etcd_member, verdict, current, f.now, holder_alive=alive)
        rec = self.record(f.now)
        if replace_lock(conn, m, self.name, f.sha256, rec).result != "done":
            return Seen(m.etcd_member, now=f.now, error="the lock changed while we read it (another recovery)")
        with self._mu:
            self.held[m.etcd_member] = record_sha256(rec)
        return Seen(m.etcd_member, verdict, current, f.now, holder_alive=alive)

    def _renew(self, conn, m: Master) -> Seen:
        member = m.etcd_member
        rec = self.record(time.time() + self._offset.get(member, 0.0))
        f = replace_lock(conn, m, self.name, self.held[member], rec)
        self._offset[member] = f.now - time.time()
        if f.result == "done":
            with self._mu:
                self.held[member] = record_sha256(rec)
            return Seen(member, Verdict.OURS, now=f.now)
        with self._mu:
            del self.held[member]
        try:
            other = parse_holder(f.text)
        except LockUnreadable:
            other = None
        who = other.describe(f.now) if other else "nobody (the file was removed)"
        if other is not None:  # someone else's record where ours was: they judged ours expired, or forced it
            self.lost = self.lost or f"{member}: the cluster lock now names {who}"
        return Seen(member, None, other, f.now, error=f"our record was replaced by {who}")

    def _each(self, fn) -> list[Seen]:
        def one(m: Master) -> Seen:
            try:
                conn = connect(self.cluster, m)
            except ConnectError as err:
                return Seen(m.etcd_member, error=str(err), refused=isinstance(err, AuthError))
            try:
                return fn(conn, m)
            except NovaDRError as err:  # an unreachable master, or a lock command that failed there
                return Seen(m.etcd_member, error=str(err), refused=isinstance(err, AuthError))
            finally:
                conn.close()

        with ThreadPoolExecutor(len(self.cluster.masters)) as ex:
            return list(ex.map(one, self.cluster.masters))

    # -- the cluster --------------------------------------------------------------------

    def acquire(self, wait_seconds: float) -> None:
        need, started = majority(len(self.cluster.masters)), time.monotonic()
        while True:
            seen = self._each(self._try)
            if len(self.held) >= need:
                break
            self._give_back()  # a minority is worth nothing, and would block the others
            refused = [s.error for s in seen if s.refused]
            if refused:  # asking again would only repeat a wrong password (and may lock the account)
                raise AuthError(f"cluster {self.name}: cannot take the recovery lock: " + "; ".join(refused))
            if time.monotonic() - started >= wait_seconds:
                raise ClusterBusy(busy_message(self.name, seen, len(self.cluster.masters),
                                               time.monotonic() - started, lock_path(self.cluster.masters[0], self.name)))
            time.sleep(1 + random.random())  # two racing recoveries must not stay in step
        self.replaced = [s for s in seen if s.verdict in (Verdict.RESUME, Verdict.EXPIRED, Verdict.FORCED)]
        for s in self.replaced:
            log.warning("cluster %s: on %s, took the lock over (%s) from %s", self.name, s.member, s.verdict.value,
                        s.holder.describe(s.now) if s.holder else "an unreadable record")
        log.info("cluster %s: locked for recovery %s on %s", self.name, self.me.recovery_id,
                 ", ".join(sorted(self.held)))
        self._confirmed = time.monotonic()
        _live_tokens.add(self.me.token)
        self._thread = threading.Thread(target=self._renew_loop, name=f"lock-{self.name}", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """One round: renew where ours, spread to masters where it is free."""
        with self._round:
            if self.lost:
                return
            self._each(lambda conn, m: self._renew(conn, m) if m.etcd_member in self.held else self._try(conn, m))
            if len(self.held) >= majority(len(self.cluster.masters)) and not self.lost:
                self._confirmed = time.monotonic()
            elif time.monotonic() - self._confirmed > self.ttl and not self.lost:
                self.lost = f"not renewed on a majority of the masters for {self.ttl:.0f}s (unreachable?)"
            if self.lost:
                log.error("cluster %s: the recovery lock is lost: %s", self.name, self.lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 6) and not self.lost:
            self.renew()

    def ensure_held(self, now: bool = False) -> None:
        """Raise LockLost once the lock is lost. `now=True` asks the masters first (after an
        approval, before the first change), instead of trusting the last renewal."""
        if now:
            self.renew()
        if self.lost:
            raise LockLost(f"cluster {self.name}: this run no longer holds the recovery lock ({self.lost}); it "
                           "stopped before its next step. See who holds it, then re-run this recovery "
                           f"(recovery_id={self.me.recovery_id}) once that one is done")

    def _give_back(self) -> None:
        def one(conn, m: Master) -> Seen:
            with self._mu:
                sha = self.held.pop(m.etcd_member, None)
            if sha:
                remove_lock(conn, m, self.name, sha)  # a conflict: it is someone else's now, left alone
            return Seen(m.etcd_member)

        if self.held:
            self._each(one)

    def release(self) -> None:
        _live_tokens.discard(self.me.token)
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=60)
        self._give_back()
        if self.held:
            log.warning("cluster %s: the lock stays on %s (unreachable); it expires %.0fs after its last renewal",
                        self.name, ", ".join(sorted(self.held)), self.ttl)

    def plan_notes(self) -> tuple[str, list[str]]:
        """A line for the plan's summary, and a warning per record taken over."""
        path = lock_path(self.cluster.masters[0], self.name)
        line = (f"Cluster lock: held by this run (recovery `{self.me.recovery_id}`) on {', '.join(sorted(self.held))} "
                f"(`{path}`, renewed every {self.ttl / 6:.0f}s, expires {self.ttl:.0f}s after the last renewal)")
        why = {Verdict.RESUME: "the same recovery; this run resumes it",
               Verdict.EXPIRED: "its lock had expired",
               Verdict.FORCED: "force=true: it had NOT expired; that run stops before its next step"}
        took = {}
        for s in self.replaced:
            key = s.holder.token if s.holder else "unreadable"
            took.setdefault(key, (s, []))[1].append(s.member)
        warnings = [f"took the cluster lock over on {', '.join(members)} from "
                    f"{s.holder.describe(s.now) if s.holder else 'an unreadable lock record'}: {why[s.verdict]}"
                    for s, members in took.values()]
        return line, warnings


def with_lock_notes(plan: Plan, lock: ClusterLock | None) -> Plan:
    if lock is None:
        return plan
    line, warnings = lock.plan_notes()
    return plan.model_copy(update={"summary": (plan.summary + "\n\n" if plan.summary else "") + line,
                                   "warnings": plan.warnings + tuple(warnings)})


@contextmanager
def cluster_lock(run, wait_seconds: float, force: bool = False) -> Iterator[ClusterLock]:
    """Hold `run.cluster` for `run.recovery_id` for the block; `run.lock` names the lock."""
    lock = ClusterLock(run.cluster, run.recovery_id, run.flow, force)
    lock.acquire(wait_seconds)
    run.lock = lock
    try:
        yield lock
    finally:
        run.lock = None
        lock.release()
