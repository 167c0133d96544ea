"""Getting the daemon's backup files back (SPEC P4, P5), the pure parts: Kopia's snapshot list,
which snapshot a point in time means, whose master a source is, and whether what came back
is a set the full restore can use."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from core.errors import NovaDRError
from core.names import parse_name
from core.sets import BackupSet, StoredFile, read_sets

# Velero's pod-volume sources: through 1.16 the pod's volume dir on the node; from 1.17 the
# "real source" <requester>/kopia/<namespace>/<pod>/<volume or PVC> (velero pkg/podvolume/util.go
# GetRealSource, pkg/uploader/provider/kopia.go RunBackup, v1.17.0).
_HOST_PODS = re.compile(r"/host_pods/([0-9a-f-]{36})/volumes/")
_REAL_SOURCE = re.compile(r"^/?snapshot-pod-volume/kopia/([^/]+)/([^/]+)/([^/]+)$")


@dataclass(frozen=True)
class KopiaSnapshot:
    id: str
    host: str
    user: str
    path: str
    start: datetime
    end: datetime | None
    files: int | None
    tags: dict = field(default_factory=dict)  # Velero's: backup, backup-uid, pod, pod-uid, ns, volume, ...
    incomplete: str | None = None  # kopia's "checkpoint" or "canceled": never a point to restore

    @property
    def source(self) -> str:
        return f"{self.user}@{self.host}:{self.path}"

    @property
    def pod_uid(self) -> str | None:
        m = _HOST_PODS.search(self.path)
        return self.tags.get("pod-uid") or (m[1] if m else None)

    @property
    def pod(self) -> str | None:
        m = _REAL_SOURCE.match(self.path)
        return self.tags.get("pod") or (m[2] if m else None)


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
                              files=(i.get("stats") or {}).get("fileCount"),
                              tags={str(k): str(v) for k, v in (i.get("tags") or {}).items()},
                              incomplete=i.get("incomplete") or None) for i in items]
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
    """The snapshots of one point in time, at or before `point`, by source, and notes.

    Velero tags each of a backup's snapshots with the backup's name: the newest backup whose
    snapshots all started by `point` is the point, whole (the daemon pods' sources change with
    every pod, so per source would mix a dead pod's old files in). Snapshots without that tag
    (kopia run by hand): per source, the newest at or before `point`. `snapshot list --json`
    lists incomplete snapshots too (only its text output hides them): they are skipped."""
    complete = [s for s in snaps if not s.incomplete]
    notes = [f"skipped {len(snaps) - len(complete)} incomplete snapshot(s) (kopia's checkpoints or cancelled "
             "uploads)"] if len(complete) < len(snaps) else []
    if not complete:
        raise NovaDRError("the Kopia repository holds no complete snapshots" if snaps else
                          "the Kopia repository holds no snapshots")
    if all(s.tags.get("backup") for s in complete):
        backups: dict[str, list[KopiaSnapshot]] = {}
        for s in complete:
            backups.setdefault(s.tags["backup"], []).append(s)
        at = {name: max(s.start for s in group) for name, group in backups.items()}
        fit = [name for name in backups if point is None or at[name] <= point]
        if not fit:
            _too_early(complete, point)
        name = max(fit, key=lambda n: at[n])
        group = backups[name]
        notes.append(f"the point: Velero backup {name} ({len(group)} pod volumes, started by "
                     f"{at[name]:%Y-%m-%d %H:%M:%S}Z)")
        return {s.source: s for s in sorted(group, key=lambda s: s.start)}, notes
    chosen: dict[str, KopiaSnapshot] = {}
    for path in sorted({s.source for s in complete}):
        mine = sorted((s for s in complete if s.source == path), key=lambda s: s.start)
        before = [s for s in mine if point is None or s.start <= point]
        if before:
            chosen[path] = before[-1]
        else:
            notes.append(f"source {path}: no snapshot at or before {point:%Y-%m-%d %H:%M:%S}Z (its oldest is "
                         f"{mine[0].start:%Y-%m-%d %H:%M:%S}Z)")
    if not chosen:
        _too_early(complete, point)
    return chosen, notes


def _too_early(snaps: list[KopiaSnapshot], point: datetime) -> None:
    oldest = min(s.start for s in snaps)
    raise NovaDRError(f"no snapshot at or before {point:%Y-%m-%d %H:%M:%S}Z: the oldest in the repository is "
                      f"{oldest:%Y-%m-%d %H:%M:%S}Z; choose a later point")


def masters_in(names: list[str]) -> list[str]:
    """The masters whose archives are among these files (names carry the archive name)."""
    return sorted({p.node for n in names if (p := parse_name(n)) and p.kind == "node"})


def name_source(snap: KopiaSnapshot, pods: dict[str, str], files: list[str]) -> str:
    """Whose files a source holds: the node of the daemon pod with the snapshot's pod UID (or,
    failing that, pod name) when the API answered, else the one archive name among the
    restored files."""
    for key in (snap.pod_uid, snap.pod):
        if key and key in pods:
            return pods[key]
    found = masters_in(files)
    if len(found) == 1:
        return found[0]
    why = "no node archive among its files" if not found else f"archives of several masters ({', '.join(found)})"
    raise NovaDRError(f"source {snap.path} maps to no master: its pod {snap.pod or '?'} (UID {snap.pod_uid or '?'}) "
                      f"is not a running nova-backup-daemon pod, and it holds {why}")


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
