"""Getting the daemon's backup files back (SPEC P4, P5), the pure parts: Kopia's snapshot list,
which snapshot a point in time means, whose master a source is, and whether what came back
is a set the full restore can use."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from core.errors import NovaDRError
from core.names import parse_name
from core.sets import BackupSet, StoredFile, read_sets

_POD_UID = re.compile(r"/host_pods/([0-9a-f-]{36})/volumes/")


@dataclass(frozen=True)
class KopiaSnapshot:
    id: str
    host: str
    user: str
    path: str
    start: datetime
    end: datetime | None
    files: int | None

    @property
    def source(self) -> str:
        return f"{self.user}@{self.host}:{self.path}"


def _time(text: str) -> datetime:
    # kopia prints RFC 3339 with nanoseconds ("2026-11-27T04:00:05.123456789Z"); Python takes micro
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    frac = (m[2] or ".0")[:7]
    return datetime.fromisoformat(m[1] + frac + ("+00:00" if m[3] == "Z" else m[3]))


def parse_kopia_snapshots(text: str) -> list[KopiaSnapshot]:
    """`kopia snapshot list --all --json`: a JSON array of snapshot manifests."""
    try:
        items = json.loads(text)
        return [KopiaSnapshot(id=i["id"], host=i["source"]["host"], user=i["source"]["userName"],
                              path=i["source"]["path"], start=_time(i["startTime"]),
                              end=_time(i["endTime"]) if i.get("endTime") else None,
                              files=(i.get("stats") or {}).get("fileCount")) for i in items]
    except (ValueError, KeyError, TypeError) as err:
        raise NovaDRError(f"kopia snapshot list: output not understood ({err}); is this kopia 0.10 or newer?") from None


def parse_point(point: str) -> datetime | None:
    """`latest`, or a time (ISO 8601; UTC when no offset is given)."""
    if point == "latest":
        return None
    try:
        t = datetime.fromisoformat(point.replace("Z", "+00:00"))
    except ValueError:
        raise NovaDRError(f"point={point!r}: write latest or a time such as 2026-11-27T04:00:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def choose_snapshots(snaps: list[KopiaSnapshot], point: datetime | None) -> tuple[dict[str, KopiaSnapshot], list[str]]:
    """Per source, the newest snapshot started at or before point. Returns (chosen by source
    path, warnings for sources that have none then)."""
    if not snaps:
        raise NovaDRError("the Kopia repository holds no snapshots")
    chosen: dict[str, KopiaSnapshot] = {}
    warnings = []
    for path in sorted({s.path for s in snaps}):
        mine = sorted((s for s in snaps if s.path == path), key=lambda s: s.start)
        before = [s for s in mine if point is None or s.start <= point]
        if before:
            chosen[path] = before[-1]
        else:
            warnings.append(f"source {path}: no snapshot at or before {point:%Y-%m-%d %H:%M:%S}Z (its oldest is "
                            f"{mine[0].start:%Y-%m-%d %H:%M:%S}Z)")
    if not chosen:
        oldest = min(s.start for s in snaps)
        raise NovaDRError(f"no snapshot at or before {point:%Y-%m-%d %H:%M:%S}Z: the oldest in the repository is "
                          f"{oldest:%Y-%m-%d %H:%M:%S}Z; choose a later point")
    return chosen, warnings


def pod_uid(source_path: str) -> str | None:
    m = _POD_UID.search(source_path)
    return m[1] if m else None


def masters_in(names: list[str]) -> list[str]:
    """The masters whose archives are among these files (names carry the archive name)."""
    return sorted({p.node for n in names if (p := parse_name(n)) and p.kind == "node"})


def name_source(source_path: str, uid_to_node: dict[str, str], files: list[str]) -> str:
    """Whose files a source holds: the node of the daemon pod with the source's UID when the
    API answered, else the one archive name among the restored files."""
    uid = pod_uid(source_path)
    if uid and uid in uid_to_node:
        return uid_to_node[uid]
    found = masters_in(files)
    if len(found) == 1:
        return found[0]
    why = "no node archive among its files" if not found else f"archives of several masters ({', '.join(found)})"
    raise NovaDRError(f"source {source_path} maps to no master: its pod UID {uid or '?'} is not a running "
                      f"nova-backup-daemon pod, and it holds {why}")


def flat_collisions(by_origin: dict[str, list[str]]) -> list[str]:
    """Files that two origins (pods, sources) both hold: flattening them into one directory
    would lose one copy."""
    seen: dict[str, str] = {}
    out = []
    for origin, names in sorted(by_origin.items()):
        for n in names:
            if n in seen:
                out.append(f"{n} (from {seen[n]} and {origin})")
            seen[n] = origin
    return out


def check_gathered(files: list[StoredFile], origin: dict[str, str], expected_masters: list[str]) -> tuple[BackupSet, list[str]]:
    """The newest set among the gathered files and what is wrong with it: a missing archive,
    no etcd or StarVault snapshot, or the two snapshots from different masters."""
    sets, _ = read_sets(files)
    if not sets:
        raise NovaDRError("no backup set among the files that came back: "
                          + (", ".join(sorted(f.name for f in files)[:8]) or "no files at all"))
    s = sets[0]
    problems = [f"missing {m}" for m in s.missing(expected_masters, require_starvault=True)]
    if s.starvault and origin.get(s.etcd) != origin.get(s.starvault):
        problems.append(f"the etcd snapshot came from {origin.get(s.etcd)} but the StarVault snapshot from "
                        f"{origin.get(s.starvault)}; the daemon writes both on one master")
    return s, problems
