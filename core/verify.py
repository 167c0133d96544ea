"""Backup verification: check results, unseal token counting, registry counts. Pure."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from core.pki import PKIEntry, parse_enddate


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | warn | fail
    evidence: str


def count_tokens(files: dict[str, str]) -> int:
    """Distinct unseal tokens across every master's tokens file (one token per line)."""
    return len({line.strip() for text in files.values() for line in text.splitlines() if line.strip()})


def registry_counts(keys: list[str]) -> dict[str, int]:
    """Live keys under /registry/ per resource type (/registry/<type>/...; for an API group's
    resources, /registry/<group>/<type>/...: the first segment is enough to see a drop)."""
    c: Counter[str] = Counter()
    for k in keys:
        parts = k.split("/")
        if len(parts) >= 3 and parts[1] == "registry":
            c[parts[2]] += 1
    return dict(sorted(c.items()))


def compare_counts(previous: dict[str, int] | None, current: dict[str, int]) -> str | None:
    """A warning when the drill serves less than half of the previous drill's keys."""
    if not previous:
        return None
    before, now = sum(previous.values()), sum(current.values())
    if before and now < before / 2:
        return f"the snapshot holds {now} keys under /registry/, the previous drill {before}: a drop of more than half"
    return None


def expiring(certs: list[PKIEntry], now: datetime, days: int = 30) -> list[str]:
    out = []
    for e in certs:
        end = parse_enddate(e.not_after)
        if end is None:
            continue
        if end < now:
            out.append(f"{e.path} EXPIRED on {end:%Y-%m-%d}")
        elif end < now + timedelta(days=days):
            out.append(f"{e.path} expires on {end:%Y-%m-%d} ({(end - now).days} days)")
    return out


def summary_line(set_ts: str, checks: list[Check]) -> str:
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        return f"backup set {set_ts}: " + "; ".join(f"{c.name} failed: {c.evidence}" for c in failed)
    warned = [c.name for c in checks if c.status == "warn"]
    return f"backup set {set_ts}: every check passed" + (f" (warnings: {', '.join(warned)})" if warned else "")


def keyspace_digest(get_json: str) -> tuple[str, int]:
    """(sha256, key count) of a keyspace as `etcdctl get -w json` prints it: every key with its
    value and lease, in key order. Two keyspaces with one digest hold the same keys and values
    (mod revisions differ by design: a rebuilt point writes its keys in fewer revisions)."""
    import hashlib
    import json

    kvs = sorted((kv["key"], kv.get("value", ""), int(kv.get("lease", 0)))
                 for kv in json.loads(get_json).get("kvs") or [])
    h = hashlib.sha256()
    for k, v, lease in kvs:
        h.update(f"{k} {v} {lease}\n".encode())
    return h.hexdigest(), len(kvs)
