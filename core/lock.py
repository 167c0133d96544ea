"""The cluster lock's rules: one recovery per cluster, whichever Prefect server each run uses.

The lock lives with the cluster, not with a Prefect server: a small JSON record (a `Holder`)
in a file on every master (tasks/lock.py reads and replaces it atomically). A recovery holds
the cluster while a majority of the masters name it, so two recoveries can never both hold
it, whatever server, machine or Prefect home each runs from.

What a recovery may do with the record it finds on one master is a pure function of that
record, that master's clock and who asks (`decide`). Each master's expiry is judged by its
own clock, so the orchestrators' clocks never matter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import Enum

FORMAT = "nova-dr-lock/1"


@dataclass(frozen=True)
class Holder:
    """Who holds the cluster. Written whole, at the moment the lock is taken."""

    recovery_id: str
    flow: str
    flow_run_id: str
    host: str
    pid: int
    pid_start: str  # the process's start time (/proc/PID/stat): a pid alone can be reused
    token: str  # this acquisition: tells a re-run of the same recovery from the run it replaces
    api: str  # the Prefect API the run reports to ("embedded" for the default set-up)
    acquired_at: float  # the master's clock, like expires_at
    expires_at: float

    def dumps(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)

    def describe(self, now: float) -> str:
        left = self.expires_at - now
        expiry = f"expires in {left:.0f}s" if left >= 0 else f"expired {-left:.0f}s ago"
        return (f"recovery {self.recovery_id} ({self.flow}, flow run {self.flow_run_id or '?'}, pid {self.pid} on "
                f"{self.host}, Prefect API {self.api}; {expiry})")


class LockUnreadable(ValueError):
    """A lock file that is not a record nova-dr wrote: nobody can say whose it is."""


def parse_holder(text: str) -> Holder | None:
    """None for no lock (an empty text); the record otherwise. Raises LockUnreadable."""
    if not text.strip():
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a nova-dr lock record")
        data.pop("format")
        holder = Holder(**data)
        # Types are checked: a record read back from disk is not trusted as it is.
        for name, kind in (("recovery_id", str), ("flow", str), ("flow_run_id", str), ("host", str),
                           ("pid", int), ("pid_start", str), ("token", str), ("api", str),
                           ("acquired_at", (int, float)), ("expires_at", (int, float))):
            if not isinstance(getattr(holder, name), kind) or isinstance(getattr(holder, name), bool):
                raise ValueError(f"{name} has the wrong type")
        return holder
    except (ValueError, TypeError) as err:
        raise LockUnreadable(str(err)) from None


class Verdict(str, Enum):
    FREE = "free"  # no lock: take it
    OURS = "ours"  # this very acquisition's record: renew it
    RESUME = "resume"  # the same recovery, from a run that is gone (or elsewhere): take it over at once
    EXPIRED = "expired"  # another recovery's, not renewed in time: take it
    FORCED = "forced"  # another recovery's, live, taken because the operator said force=true
    BUSY = "busy"  # another recovery's, live: wait, then refuse


TAKE = {Verdict.FREE, Verdict.OURS, Verdict.RESUME, Verdict.EXPIRED, Verdict.FORCED}


def decide(current: Holder | None, me: Holder, now: float, force: bool, holder_alive: bool | None) -> Verdict:
    """What `me` may do with `current`, found on a master whose clock reads `now`.

    `holder_alive`: whether the holder's process still runs, where this machine can tell (the
    holder ran here); None where it cannot (another machine)."""
    if current is None:
        return Verdict.FREE
    if current.token == me.token:
        return Verdict.OURS
    if current.recovery_id == me.recovery_id:
        # A re-run of the same recovery resumes it, unless that recovery's own process still
        # runs here: two copies of one recovery must not run at once.
        return Verdict.BUSY if holder_alive and not force else Verdict.RESUME
    if now >= current.expires_at:
        return Verdict.EXPIRED
    return Verdict.FORCED if force else Verdict.BUSY


def majority(n: int) -> int:
    return n // 2 + 1


@dataclass(frozen=True)
class Seen:
    """One master's answer during an acquisition round."""

    member: str
    verdict: Verdict | None = None  # None: unreachable or unreadable
    holder: Holder | None = None  # what was there before
    now: float = 0.0
    error: str = ""
    holder_alive: bool | None = None  # as decide() was told
    refused: bool = False  # the master refused us (login or sudo): asking again cannot help


def busy_message(cluster: str, seen: list[Seen], n_masters: int, waited: float, lock_path: str) -> str:
    """One refusal that names the holder and says what to do."""
    holders = {s.holder.token: s for s in seen if s.verdict == Verdict.BUSY and s.holder}
    errors = [f"{s.member}: {s.error}" for s in seen if s.error]
    if holders:
        s = next(iter(holders.values()))
        h = s.holder
        state = {True: "its process still runs here", False: "its process is gone",
                 None: "it runs on another machine"}[s.holder_alive]
        return (f"cluster {cluster}: another recovery holds it: {h.describe(s.now)}; {state}; waited "
                f"{waited:.0f}s. Let it finish, or cancel it. If it is dead, re-run that recovery "
                f"(recovery_id={h.recovery_id}) to resume it, wait for the expiry, or pass force=true; "
                f"by hand: `nova-dr lock release`, or remove {lock_path} on a majority of the masters")
    reachable = n_masters - len(errors)
    return (f"cluster {cluster}: could not lock a majority of the masters ({majority(n_masters)} of {n_masters}; "
            f"{reachable} answered). {'; '.join(errors) or 'another recovery raced for it'}. "
            "Every recovery needs a majority of the masters reachable; nothing was changed")
