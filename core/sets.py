"""Backup sets from a store's file list (SPEC "Backup contents"). Pure: names in, sets out.

The platform's daemon stamps each master's archive with its own time, seconds or minutes
apart, so a set is the etcd snapshot plus the files whose timestamps fall within a window
around it, not an exact timestamp match. Our own backup flow writes one timestamp per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from core.names import parse_name, parse_timestamp

WINDOW = timedelta(minutes=15)


@dataclass(frozen=True)
class StoredFile:
    name: str
    size: int = 0
    mtime: float = 0.0  # when the store says it was written (its own clock); 0: unknown


@dataclass
class BackupSet:
    ts: str  # the etcd snapshot's timestamp: the set's id
    etcd: str
    nova_version: str
    k8s_version: str
    nodes: dict[str, str] = field(default_factory=dict)  # archive name -> file
    starvault: str | None = None
    manifest: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def time(self) -> datetime:
        return parse_timestamp(self.ts)

    @property
    def files(self) -> list[str]:
        return [f for f in [self.etcd, *self.nodes.values(), self.starvault, self.manifest] if f]

    @property
    def size(self) -> int:
        return sum(self.sizes.get(f, 0) for f in self.files)

    @property
    def encrypted(self) -> list[str]:
        return [f for f in self.files if f.endswith(".age")]

    def plain(self) -> "BackupSet":
        """The same set as it looks once its encrypted files are decrypted."""
        from core.names import plain_name

        return BackupSet(self.ts, plain_name(self.etcd), self.nova_version, self.k8s_version,
                         {a: plain_name(f) for a, f in self.nodes.items()},
                         plain_name(self.starvault) if self.starvault else None, self.manifest,
                         {plain_name(f): n for f, n in self.sizes.items()})

    def missing(self, archive_names: list[str], require_starvault: bool = True) -> list[str]:
        out = [f"archive of {a}" for a in archive_names if a not in self.nodes]
        if require_starvault and not self.starvault:
            out.append("StarVault snapshot")
        return out

    def complete(self, archive_names: list[str], require_starvault: bool = True) -> bool:
        return not self.missing(archive_names, require_starvault)


def read_sets(files: list[StoredFile], window: timedelta = WINDOW) -> tuple[list[BackupSet], list[str]]:
    """Sets, newest first, and the names of ours that belong to no set (left alone)."""
    sizes = {f.name: f.size for f in files}
    parsed = [(f.name, p) for f in files if (p := parse_name(f.name))]
    sets = {p.ts: BackupSet(p.ts, name, p.nova_version, p.k8s_version, sizes=sizes)
            for name, p in parsed if p.kind == "etcd"}
    orphans = []
    for name, p in parsed:
        if p.kind == "etcd":
            continue
        t = parse_timestamp(p.ts)
        near = [s for s in sets.values() if abs(s.time - t) <= window]
        if p.kind == "manifest":
            near = [s for s in near if s.ts == p.ts]  # ours: written with the run's one timestamp
        if not near:
            orphans.append(name)
            continue
        best = min(near, key=lambda s: (abs(s.time - t), s.ts))
        if p.kind == "node":
            # Two archives of one master near one snapshot: keep the nearer in time.
            old = best.nodes.get(p.node)
            if old is None or abs(parse_timestamp(parse_name(old).ts) - best.time) > abs(t - best.time):
                best.nodes[p.node] = name
        elif p.kind == "starvault":
            best.starvault = best.starvault or name
        elif p.kind == "manifest":
            best.manifest = name
    return sorted(sets.values(), key=lambda s: s.ts, reverse=True), orphans


FUTURE = timedelta(minutes=5)  # clocks of masters and orchestrator may disagree by this much


def dated_ahead(sets: list[BackupSet], now: datetime) -> list[BackupSet]:
    """Sets stamped later than now: a wrong clock, or a set planted to become `latest` (and,
    once, to switch retention off). Never `latest`, never expired, always named."""
    return [s for s in sets if s.time > now + FUTURE]


def ahead_note(sets: list[BackupSet], now: datetime) -> str:
    ahead = dated_ahead(sets, now)
    if not ahead:
        return ""
    return ("left aside, dated in the future by this machine's clock (UTC): " + ", ".join(
        f"{s.ts} ({(s.time - now).total_seconds() / 3600:.1f}h ahead)" for s in ahead[:5])
        + " (a clock is wrong, or someone planted them)")


def choose_set(sets: list[BackupSet], which: str, archive_names: list[str], require_starvault: bool,
               now: datetime | None = None) -> BackupSet:
    """`latest` is the newest complete set up to now; otherwise the set with that timestamp."""
    from core.errors import NovaDRError

    if which == "latest":
        now = now or datetime.now(timezone.utc)
        ahead = dated_ahead(sets, now)
        for s in sets:
            if s not in ahead and s.complete(archive_names, require_starvault):
                return s
        raise NovaDRError("no complete backup set in the store (" + (
            "; ".join(f"{s.ts}: missing {', '.join(s.missing(archive_names, require_starvault))}" for s in sets[:3]
                      if s not in ahead) or "it holds no etcd snapshot dated up to now") + ")"
            + (f"; {ahead_note(sets, now)}" if ahead else ""))
    for s in sets:
        if s.ts == which:
            return s
    raise NovaDRError(f"no backup set {which!r} in the store; the sets are: "
                      f"{', '.join(s.ts for s in sets[:10]) or 'none'} (or use latest)")


def retention_clock(now: datetime, files: list[StoredFile]) -> tuple[datetime, str]:
    """The earlier of this machine's clock and the store's (the newest file's write time, right
    after a backup wrote it): a clock that runs ahead must not make sets expire early."""
    newest = max((f.mtime for f in files), default=0.0)
    if newest and datetime.fromtimestamp(newest, timezone.utc) < now - timedelta(minutes=5):
        store = datetime.fromtimestamp(newest, timezone.utc)
        return store, (f"the store's clock (its newest write, {store:%Y-%m-%d %H:%M:%S} UTC, is "
                       f"{(now - store).total_seconds() / 3600:.1f}h before this machine's clock)")
    return now, "this machine's clock (UTC)"


def expired(sets: list[BackupSet], now: datetime, days: int, archive_names: list[str],
            require_starvault: bool) -> tuple[list[str], str]:
    """Files to delete under RETENTION_PERIOD_DAYS, and why anything was kept.

    Never the newest complete set up to now (however old), never a set dated in the future
    (left aside and named: a planted one must not switch retention off, nor a wrong clock
    make a real one go), never a file that is not one of ours (only set members)."""
    if not sets:
        return [], "no sets"
    ahead = dated_ahead(sets, now)
    note = f"; {ahead_note(sets, now)}" if ahead else ""
    newest_complete = next((s for s in sets if s not in ahead and s.complete(archive_names, require_starvault)), None)
    if newest_complete is None:
        return [], "no complete set: nothing deleted" + note
    cutoff = now - timedelta(days=days)
    doomed = [f for s in sets if s is not newest_complete and s not in ahead and s.time < cutoff for f in s.files]
    return doomed, f"kept the newest complete set {newest_complete.ts}" + note


def spare_locked(sets: list[BackupSet], doomed: list[str], locks: dict[str, datetime],
                 now: datetime) -> tuple[list[str], str]:
    """Retention under Object Lock: a set any of whose files is still locked stays whole (the
    store would refuse half of it, and half a set restores nothing). Returns what may go, and
    a note naming the sets kept for their lock."""
    kept = [s for s in sets if any(f in doomed and f in locks and locks[f] > now for f in s.files)]
    spared = {f for s in kept for f in s.files}
    note = ("; locked, kept until their lock expires: "
            + ", ".join(f"{s.ts} (until {max(locks[f] for f in s.files if f in locks):%Y-%m-%d %H:%M} UTC)"
                        for s in kept)) if kept else ""
    return [f for f in doomed if f not in spared], note
