"""Backup file names (SPEC "Backup contents"), built and parsed without I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

TS_FORMAT = "%Y-%m-%d_%H%M%S"
_TS = r"(?P<ts>\d{4}-\d{2}-\d{2}_\d{6})"
_V = r"v?(?P<{0}>\d+\.\d+\.\d+)"
_AGE = r"(?P<age>\.age)?"  # encrypted at rest (age); the name is otherwise the daemon's
ETCD_RE = re.compile(rf"^etcd_snapshot_nova-{_V.format('nova')}_k8s-{_V.format('k8s')}_{_TS}\.db(?P<tgz>\.tar\.gz)?{_AGE}$")
# The seed spells it three ways; we read all three and write `kubereresources`.
NODE_RE = re.compile(rf"^(?P<node>.+)_(?:kubereresources|kuberesources|kuberestores)_{_TS}\.tar\.gz{_AGE}$")
STARVAULT_RE = re.compile(rf"^starvault_snapshot_nova-{_V.format('nova')}_{_TS}1?\.db{_AGE}$")
MANIFEST_RE = re.compile(rf"^nova-dr-manifest_{_TS}\.json$")


def timestamp(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime(TS_FORMAT)


def parse_timestamp(ts: str) -> datetime:
    return datetime.strptime(ts, TS_FORMAT).replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class ParsedName:
    kind: str  # etcd | node | starvault | manifest
    ts: str
    nova_version: str | None = None
    k8s_version: str | None = None
    node: str | None = None
    encrypted: bool = False


def parse_name(name: str) -> ParsedName | None:
    """What a backup file is, or None when the name is not one of ours."""
    if m := ETCD_RE.match(name):
        return ParsedName("etcd", m["ts"], m["nova"], m["k8s"], encrypted=bool(m["age"]))
    if m := NODE_RE.match(name):
        return ParsedName("node", m["ts"], node=m["node"], encrypted=bool(m["age"]))
    if m := STARVAULT_RE.match(name):
        return ParsedName("starvault", m["ts"], m["nova"], encrypted=bool(m["age"]))
    if m := MANIFEST_RE.match(name):
        return ParsedName("manifest", m["ts"])
    return None


def etcd_snapshot_name(nova: str, k8s: str, ts: str, packed: bool = True) -> str:
    return f"etcd_snapshot_nova-v{nova}_k8s-v{k8s}_{ts}.db" + (".tar.gz" if packed else "")


def node_archive_name(archive_name: str, ts: str) -> str:
    return f"{archive_name}_kubereresources_{ts}.tar.gz"


def starvault_snapshot_name(nova: str, ts: str) -> str:
    return f"starvault_snapshot_nova-v{nova}_{ts}.db"


def manifest_name(ts: str) -> str:
    return f"nova-dr-manifest_{ts}.json"


def plain_name(name: str) -> str:
    """The name a file has once decrypted."""
    return name[:-4] if name.endswith(".age") else name
