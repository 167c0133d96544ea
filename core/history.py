"""The cluster's history between full snapshots: etcd watch events, stored as segments, and
what a restore to a point needs from them. Pure: no network, no files.

A whole-keyspace watch sees every revision: etcd bumps its revision only for a write, and
every write changes a key. So a history is a run of consecutive revisions, each with its
events, and a missing revision is a gap, never a quiet one (etcd 3.5, server/mvcc/kvstore_txn.go:
a txn with no changes ends without a new revision).

Each event keeps what the watch's prev-kv gave of the key's previous state: its mod revision.
A fold checks it against the state it holds, so two segments that overlap or skip (Gardener's
etcd-backup-restore#1043 and #844) are refused, not merged.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from core.errors import NovaDRError

PUT, DELETE = "put", "del"


class HistoryError(NovaDRError):
    """A history that cannot be trusted to reach the point asked for."""


@dataclass(frozen=True)
class Event:
    kind: str  # put | del
    key: str  # base64, as etcd's JSON gives it: keys are bytes
    value: str = ""  # base64; "" for a delete
    lease: int = 0
    prev: int = 0  # the key's mod revision before this event; 0: it did not exist


@dataclass(frozen=True)
class Revision:
    rev: int
    at: float  # unix time this machine received it (watch events carry no time of their own)
    events: tuple[Event, ...]


@dataclass(frozen=True)
class WatchResponse:
    revision: int  # the header's: the store's revision when etcd sent it
    revisions: tuple[Revision, ...]
    compacted: int = 0  # >0: the watch asked for history etcd had already compacted away
    canceled: bool = False


def parse_watch(line: str, at: float) -> WatchResponse:
    """One line of `etcdctl watch -w json --prev-kv` (captured in tests/captured/watch_json.txt):
    a WatchResponse, its events grouped by the revision that made them."""
    doc = json.loads(line)
    by_rev: dict[int, list[Event]] = {}
    for e in doc.get("Events") or []:
        kv, prev = e["kv"], e.get("prev_kv") or {}
        kind = DELETE if e.get("type") == 1 else PUT
        by_rev.setdefault(int(kv["mod_revision"]), []).append(Event(
            kind, kv["key"], kv.get("value", "") if kind == PUT else "", int(kv.get("lease", 0)) if kind == PUT else 0,
            int(prev.get("mod_revision", 0))))
    revs = tuple(Revision(r, at, tuple(ev)) for r, ev in sorted(by_rev.items()))
    return WatchResponse(int(doc.get("Header", {}).get("revision", 0)), revs,
                         int(doc.get("CompactRevision", 0)), bool(doc.get("Canceled")))


# -- segments ---------------------------------------------------------------------------

SEGMENT_RE = re.compile(r"^etcd-history_r(\d{12})-r(\d{12})_(\d{4}-\d\d-\d\dT\d{6}\.\d{3}Z)\.jsonl\.gz$")


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H%M%S.%f")[:-3] + "Z"


def segment_name(first: int, last: int, newest_at: float) -> str:
    """Sorted by name is sorted by revision; the time is when its newest revision arrived."""
    return f"etcd-history_r{first:012d}-r{last:012d}_{_stamp(newest_at)}.jsonl.gz"


@dataclass(frozen=True)
class SegmentName:
    name: str
    first: int
    last: int
    newest_at: float


def parse_segment_name(name: str) -> SegmentName | None:
    m = SEGMENT_RE.match(name.rsplit("/", 1)[-1].removesuffix(".age"))
    if not m:
        return None
    at = datetime.strptime(m.group(3), "%Y-%m-%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    return SegmentName(name, int(m.group(1)), int(m.group(2)), at)


@dataclass(frozen=True)
class Segment:
    revisions: list[Revision]
    lease_ttls: dict[int, int]  # the granted TTL of each lease first seen in it, as etcd said
    unsigned: str | None = None  # why no trusted key vouches for it, when allow_unsigned let it through


def encode_segment(revs: list[Revision], lease_ttls: dict[int, int] | None = None, seal=None) -> tuple[str, bytes]:
    """(name, gzip of a header line, one JSON line per revision, and a last line with the
    sha256 of the lines before it and, with `seal(name, sha256) -> {signer, sig}`, their
    signature). The last line also proves the segment whole: one cut short has none."""
    check_consecutive(revs, "segment")
    name = segment_name(revs[0].rev, revs[-1].rev, revs[-1].at)
    head = json.dumps({"segment": 1, "leases": {str(k): v for k, v in sorted((lease_ttls or {}).items())}})
    lines = [head] + [json.dumps({"r": r.rev, "t": round(r.at, 3),
                                  "e": [[e.kind, e.key, e.value, e.lease, e.prev] for e in r.events]},
                                 separators=(",", ":")) for r in revs]
    body = "".join(line + "\n" for line in lines)
    digest = hashlib.sha256(body.encode()).hexdigest()
    trailer = {"end": revs[-1].rev, "sha256": digest, **(seal(name, digest) if seal else {})}
    return name, gzip.compress((body + json.dumps(trailer) + "\n").encode(), 6)


def decode_segment(name: str, data: bytes, problem=None, allow_unsigned: bool = False) -> Segment:
    """A segment read back from a store, checked before it is used: against its own name, its
    last line's digest, and (with `problem(name, sha256, last line) -> why not trusted | None`)
    its signature, refused unless allow_unsigned."""
    head, docs, why = open_segment(name, data, problem, allow_unsigned)
    try:
        leases = {int(k): int(v) for k, v in head["leases"].items()}
        revs = [Revision(int(d["r"]), float(d["t"]), tuple(_event(*e) for e in d["e"])) for d in docs]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HistoryError(f"{name}: unreadable ({err}); the segment is damaged") from None
    check_consecutive(revs, name)
    return Segment(revs, leases, why)


def open_segment(name: str, data: bytes, problem=None, allow_unsigned: bool = False) -> tuple[dict, list, str | None]:
    """(its header, its revisions' JSON documents, why no trusted key vouches for it) of a
    segment whose name, digest and signature were checked."""
    parsed = parse_segment_name(name)
    if parsed is None:
        raise HistoryError(f"{name}: not a history segment's name")
    plain = name.rsplit("/", 1)[-1].removesuffix(".age")
    try:
        text = gzip.decompress(data).decode()
        cut = text.rstrip("\n").rfind("\n") + 1  # the last line: the digest and the signature
        body, trailer = text[:cut], json.loads(text[cut:])
        if not body or not isinstance(trailer, dict) or "end" not in trailer:
            raise ValueError("no last line: the segment was cut short")
        digest = hashlib.sha256(body.encode()).hexdigest()
        if trailer.get("sha256") != digest:
            raise ValueError("its lines do not match the digest of its last line")
        # One parse for all its lines (json.dumps escapes newlines inside a line).
        head, *docs = json.loads("[" + body.rstrip("\n").replace("\n", ",") + "]")
        if not docs or (docs[0]["r"], docs[-1]["r"]) != (parsed.first, parsed.last):
            raise HistoryError(f"{name}: holds revisions other than its name says")
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise HistoryError(f"{name}: unreadable ({err}); the segment is damaged") from None
    why = problem(plain, digest, trailer) if problem else None
    if why and not allow_unsigned:
        raise HistoryError(f"history segment {name}: {why}. Whoever can write to the store can make such a "
                           "segment; if you know where it came from, pass allow_unsigned=true")
    return head, docs, why


def fold_segment(fold: "Fold", name: str, data: bytes, upto: int, problem=None,
                 allow_unsigned: bool = False) -> tuple[dict[int, int], str | None, float]:
    """A stored segment's revisions up to `upto` folded straight from its JSON (no objects per
    event: an hour of history is millions of them). Returns its lease TTLs, why it is not
    trusted (when allowed), and when the last revision folded arrived (0.0: none)."""
    head, docs, why = open_segment(name, data, problem, allow_unsigned)
    at = 0.0
    try:
        ttls = {int(k): int(v) for k, v in head["leases"].items()}
        for d in docs:
            if d["r"] > upto:
                break
            fold.apply(int(d["r"]), d["e"])
            at = float(d["t"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HistoryError(f"{name}: unreadable ({err}); the segment is damaged") from None
    return ttls, why, at


def _event(kind, key, value, lease, prev) -> Event:
    if kind not in (PUT, DELETE) or not isinstance(key, str) or not isinstance(value, str):
        raise ValueError(f"not an event: {kind!r}")
    return Event(kind, key, value, int(lease), int(prev))


def fold_chunk(base: int, upto: int, items, trusted: list[str],
               allow_unsigned: bool) -> tuple["Fold", dict[int, int], list[str], float]:
    """Consecutive stored segments (an iterable of name, bytes) folded from `base` up to `upto`:
    what one worker process does of a long history. Returns the fold, the lease TTLs, the warnings of
    segments let through by allow_unsigned, and when the last revision folded arrived."""
    from core.signing import segment_problem

    fold, ttls, warnings, at = Fold(base), {}, [], 0.0
    for name, data in items:
        t, why, a = fold_segment(fold, name, data, upto, lambda n, d, tr: segment_problem(n, d, tr, trusted),
                                 allow_unsigned)
        ttls.update(t)
        at = max(at, a)
        if why:
            warnings.append(f"history segment {name}: {why}; accepted only because allow_unsigned=true")
    return fold, ttls, warnings, at


def check_consecutive(revs: list[Revision], label: str) -> None:
    if not revs:
        raise HistoryError(f"{label}: no revisions")
    for a, b in zip(revs, revs[1:]):
        if b.rev != a.rev + 1:
            raise HistoryError(f"{label}: revision {a.rev} is followed by {b.rev}: {b.rev - a.rev - 1} missing")


# -- what a point needs ------------------------------------------------------------------

@dataclass(frozen=True)
class Chain:
    """The segments that continue a full snapshot at `base` without a gap, and where they end."""

    base: int
    segments: tuple[SegmentName, ...]
    reaches: int  # the newest revision recorded without a gap since `base`
    gap_after: int | None = None  # the first missing revision after `reaches`, when a later segment exists


def chain_from(base: int, names: list[str]) -> Chain:
    """Segments named in a store, from the one holding base + 1 onwards, stopping at the first
    gap. A segment that overlaps the last one kept (a capture restarted, two captures after a
    leader hand-off) is used only when it continues exactly: its revisions up to the overlap
    are the same events, or the fold's prev-revision checks refuse them."""
    segs = sorted((s for s in map(parse_segment_name, names) if s), key=lambda s: (s.first, s.last))
    kept: list[SegmentName] = []
    reaches = base
    for s in segs:
        if s.last <= reaches:
            continue  # wholly before the base, or wholly inside what is kept
        if s.first > reaches + 1:
            return Chain(base, tuple(kept), reaches, gap_after=reaches + 1)
        kept.append(s)
        reaches = s.last
    return Chain(base, tuple(kept), reaches)


def revision_at(point: float, revs: list[Revision]) -> int | None:
    """The newest revision that had arrived at `point` (unix time); None when none had."""
    best = None
    for r in revs:
        if r.at <= point:
            best = r.rev
        else:
            break
    return best


@dataclass
class Fold:
    """The net effect of a run of revisions on a keyspace: per key, its last value and lease, or
    its deletion. Applying it to a snapshot at `base` gives the keyspace at `reached`."""

    base: int
    reached: int = 0
    state: dict[str, tuple[str, int, int] | None] = field(default_factory=dict)  # key: (value, lease, mod rev)
    first: dict[str, int] = field(default_factory=dict)  # key: its mod revision before the first event seen

    def __post_init__(self):
        self.reached = self.reached or self.base

    def add(self, r: Revision) -> None:
        self.apply(r.rev, [(e.kind, e.key, e.value, e.lease, e.prev) for e in r.events])

    def apply(self, rev: int, events) -> None:
        """One revision's events as [kind, key, value, lease, prev], as a segment stores them."""
        if rev <= self.reached:
            return  # an overlap already folded: skipped whole (its events were checked once)
        if rev != self.reached + 1:
            raise HistoryError(f"revision {self.reached + 1} is missing before {rev}: the history has a gap")
        for kind, key, value, lease, prev in events:
            if kind not in (PUT, DELETE) or not isinstance(key, str) or not isinstance(value, str):
                raise HistoryError(f"revision {rev}: not an event: {kind!r}")
            known = self.state.get(key, ...)
            if known is ...:
                self.first[key] = prev
            elif (known[2] if known else 0) != prev:
                raise _discontinuous(f"revision {rev}", key, prev, known)
            self.state[key] = (value, int(lease), rev) if kind == PUT else None
        self.reached = rev

    def merge(self, later: "Fold") -> None:
        """Append a fold of the revisions right after this one's (folded apart, in parallel):
        the same checks as folding them here, at the seam."""
        if later.base != self.reached:
            raise HistoryError(f"revision {self.reached + 1} is missing before {later.base + 1}: the history has a gap")
        for key, prev in later.first.items():
            known = self.state.get(key, ...)
            if known is ...:
                self.first[key] = prev
            elif (known[2] if known else 0) != prev:
                raise _discontinuous(f"revision {later.base + 1} or after", key, prev, known)
        self.state.update(later.state)
        self.reached = later.reached

    @property
    def in_base(self) -> dict[str, bool]:
        """key: it existed before the first event seen"""
        return {k: p != 0 for k, p in self.first.items()}

    def puts(self) -> dict[str, tuple[str, int]]:
        return {k: (v[0], v[1]) for k, v in self.state.items() if v is not None}

    def deletes(self) -> list[str]:
        """Keys to delete from the base: a key made and deleted after it was never there."""
        return [k for k, v in self.state.items() if v is None and self.first[k] != 0]


def _discontinuous(where: str, key: str, prev: int, known) -> HistoryError:
    return HistoryError(f"{where}: key {_show(key)} was at revision {prev} before its event, the "
                        f"history says {known[2] if known else 0}: the segments do not continue each other")


def _show(key_b64: str) -> str:
    raw = base64.b64decode(key_b64)
    return repr(raw.decode(errors="replace")[:80])


# -- capture -----------------------------------------------------------------------------

class Recorder:
    """Turns a watch's responses into segments: continues `last` (the store's newest recorded
    revision) and cuts a segment every `flush_seconds` or `flush_bytes` of events. A response
    that does not continue `last`, or a watch canceled by a compaction, raises HistoryError:
    the capture reports it and takes a full snapshot; a gap is never stored as history."""

    def __init__(self, last: int, flush_seconds: float = 10, flush_bytes: int = 8 << 20):
        self.last, self.flush_seconds, self.flush_bytes = last, flush_seconds, flush_bytes
        self.pending: list[Revision] = []
        self.pending_bytes = 0
        self.lease_ids: set[int] = set()

    def take(self, resp: WatchResponse) -> None:
        if resp.compacted:
            raise HistoryError(f"etcd compacted its history to revision {resp.compacted} before the capture read "
                               f"revision {self.last + 1}: revisions {self.last + 1}..{resp.compacted} are lost "
                               "to this history")
        if resp.canceled:
            raise HistoryError(f"etcd canceled the watch at revision {self.last + 1}")
        for r in resp.revisions:
            if r.rev <= self.last:
                continue  # a re-sent revision after a reconnect: already recorded
            if r.rev != self.last + 1:
                raise HistoryError(f"the watch went from revision {self.last} to {r.rev}: "
                                   f"{r.rev - self.last - 1} revisions were not seen")
            self.pending.append(r)
            self.pending_bytes += sum(len(e.key) + len(e.value) + 40 for e in r.events)
            self.last = r.rev

    def due(self, now: float, lead: float = 0.0) -> bool:
        """A segment is due once its oldest revision would otherwise be stored later than
        flush_seconds after it arrived: `lead` is how long cutting and storing one takes (the
        last store's time, plus how often the capture looks), so the store's newest revision
        is never older than flush_seconds."""
        return bool(self.pending) and (self.pending_bytes >= self.flush_bytes
                                       or now - self.pending[0].at >= max(0.0, self.flush_seconds - lead))

    def pop(self) -> tuple[list[Revision], list[int]]:
        """The pending revisions, and the lease IDs first seen in them (whose TTL the segment
        records); nothing is pending afterwards."""
        revs, self.pending, self.pending_bytes = self.pending, [], 0
        fresh = sorted({e.lease for r in revs for e in r.events if e.lease} - self.lease_ids)
        self.lease_ids.update(fresh)
        return revs, fresh

    def cut(self, ttl_of=None, seal=None) -> tuple[str, bytes, list[Revision]] | None:
        """The pending revisions as a segment (name, bytes, revisions), or None. `ttl_of(ids)`
        gives the granted TTL of leases first seen here ({id: ttl}; a lease already gone is left
        out, and its keys' deletions are in the history)."""
        revs, fresh = self.pop()
        if not revs:
            return None
        name, data = encode_segment(revs, ttl_of(fresh) if ttl_of and fresh else {}, seal)
        return name, data, revs


# -- a restore to a point ----------------------------------------------------------------

BUMP_MARGIN = 1_000_000  # revisions above the newest recorded one, for writes the capture had not yet stored


@dataclass(frozen=True)
class PointPlan:
    base: str  # the full snapshot's set (its timestamp)
    base_revision: int
    target: int  # the revision the restore reaches
    segments: tuple[SegmentName, ...]  # what is folded onto the base, in order
    newest: int  # the newest revision anything recorded
    bump: int  # what the restore adds to its revision

    def lines(self, asked: str) -> list[str]:
        behind = self.newest - self.target
        return [f"point asked: {asked}",
                f"reached: revision {self.target}, from the full snapshot of {self.base} (revision "
                f"{self.base_revision}) and {len(self.segments)} history segments",
                f"behind the newest recorded revision ({self.newest}) by {behind} revisions" if behind else
                f"the newest recorded revision ({self.newest})",
                f"revision bump: +{self.bump} (past the newest recorded revision, plus {BUMP_MARGIN})"]


def bump_after(newest: int, target: int, margin: int = BUMP_MARGIN) -> int:
    """The restored store must start above every revision a client may have seen: the newest
    the capture recorded (not the point's, and not a guess from the store's own state, which
    no member has when all are lost), plus a margin for what was written but not yet stored."""
    return max(0, newest - target) + margin


def plan_point(bases: list[tuple[str, int, float]], names: list[str], load, revision: int | None = None,
               point: float | None = None) -> PointPlan:
    """Which full snapshot and which segments reach `revision`, or the newest revision that had
    arrived at `point` (unix time), or (neither given) the newest recorded without a gap.
    `bases`: (set timestamp, its snapshot's revision, unix time it was taken); `load(name)`: a segment's revisions,
    read only for the one a point falls inside. Refuses, naming the gap, what cannot be reached."""
    if revision is not None and point is not None:
        raise HistoryError("give a point in time or a revision, not both")
    if not bases:
        raise HistoryError("no full snapshot to start from: a restore to a point needs a backup set before it")
    bases = sorted(bases, key=lambda b: b[1])
    parsed = [s for s in map(parse_segment_name, names) if s]
    newest = max([b[1] for b in bases] + [s.last for s in parsed])
    target = revision
    if point is not None:
        target = _revision_at_point(bases, names, load, point)
    elif target is None:
        target = chain_from(bases[-1][1], names).reaches
    usable = [b for b in bases if b[1] <= target]
    if not usable:
        raise HistoryError(f"revision {target} is older than the oldest full snapshot ({bases[0][0]}, revision "
                           f"{bases[0][1]}): it cannot be restored")
    ts, base_rev, _ = usable[-1]
    chain = chain_from(base_rev, names)
    if chain.reaches < target:
        gap = f"; revision {chain.gap_after} is missing" if chain.gap_after else ""
        raise HistoryError(f"revision {target} cannot be reached: the history after the full snapshot of {ts} "
                           f"(revision {base_rev}) reaches revision {chain.reaches}{gap}")
    segs = tuple(s for s in chain.segments if s.first <= target)
    return PointPlan(ts, base_rev, target, segs, newest, bump_after(newest, target))


def _revision_at_point(bases, names, load, point: float) -> int:
    if point < bases[0][2]:
        raise HistoryError(f"{_stamp(point)} is before the oldest full snapshot ({bases[0][0]}): it cannot be restored")
    best = max(b[1] for b in bases if b[2] <= point)  # the newest full snapshot taken by then
    for _, base_rev, _ in bases:  # each base's history, up to the segment the point falls inside
        for seg in chain_from(base_rev, names).segments:
            if seg.newest_at <= point:
                best = max(best, seg.last)
                continue
            inside = revision_at(point, [r for r in load(seg.name) if r.rev > base_rev])
            if inside is not None:
                best = max(best, inside)
            break
    return best


def start_revision(segment_last: int | None, base_revisions: list[int], cluster_revision: int) -> int | None:
    """Where a capture continues: after the store's newest segment, else after its newest full
    snapshot; None when the store has neither (a full snapshot comes first). A history ahead of
    the cluster is refused: it is another cluster's, or this one was restored without a
    revision bump, and the two must not be woven into one timeline."""
    start = segment_last if segment_last is not None else max(base_revisions, default=None)
    if start is not None and start > cluster_revision:
        raise HistoryError(f"the store's history reaches revision {start}, the cluster is at {cluster_revision}: it is "
                           "another cluster's history, or this cluster was restored without a revision bump. Move "
                           "its history segments (etcd-history_*) aside to another folder or prefix, then start "
                           "again: the capture begins with a full snapshot")
    return start


def expired_segments(names: list[str], oldest_kept_set: float | None) -> list[str]:
    """Segments that go with the sets retention deleted: every revision in them arrived before
    the oldest set still kept was started, so no kept snapshot is older than they are."""
    if oldest_kept_set is None:
        return []  # no set left to continue: the history stays, for a person to decide
    return [s.name for s in map(parse_segment_name, names) if s and s.newest_at < oldest_kept_set]
