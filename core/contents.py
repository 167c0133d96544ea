"""What a snapshot holds, for the approver: its revision, its live keys, and when its newest
objects changed, so that "last night" can be told from "something else".

Kubernetes stores objects in etcd as protobuf (`k8s\\0` + runtime.Unknown) or, for custom
resources, as JSON. The time of an object's last change is the newest of its
metadata.creationTimestamp and metadata.managedFields[].time. Field numbers follow
k8s.io/apimachinery pkg/runtime/generated.proto (Unknown: raw = 2) and
pkg/apis/meta/v1/generated.proto (every object: metadata = 1; ObjectMeta: creationTimestamp = 8,
managedFields = 17; ManagedFieldsEntry: time = 4; Time: seconds = 1).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from core.etcd import parse_count_fields

PROTO_MAGIC = b"k8s\x00"


@dataclass(frozen=True)
class Contents:
    revision: int
    keys: int
    newest_key: str | None
    newest_mod_revision: int | None
    newest_time: datetime | None  # None: no object among the newest carried a readable time

    def line(self, now: datetime) -> str:
        when = "no time readable in its newest objects"
        if self.newest_time:
            hours = (now - self.newest_time).total_seconds() / 3600
            when = f"newest object change {self.newest_time:%Y-%m-%dT%H:%M:%SZ} ({_ago(hours)})"
        newest = f", newest key {self.newest_key} (mod revision {self.newest_mod_revision})" if self.newest_key else ""
        return f"revision {self.revision}, {self.keys} keys{newest}; {when}"


def _ago(hours: float) -> str:
    if hours < 0:
        return f"{-hours:.1f} h AHEAD of this machine's clock"
    return f"{hours * 60:.0f} min ago" if hours < 2 else f"{hours:.1f} h ago" if hours < 72 else f"{hours / 24:.0f} days ago"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            value, i = buf[i:i + n], i + n
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield num, value


def _proto_time(buf: bytes) -> datetime | None:
    for num, value in _fields(buf):
        if num == 1 and isinstance(value, int):
            return datetime.fromtimestamp(value, timezone.utc)
    return None


def _proto_times(value: bytes) -> list[datetime]:
    raw = next((v for n, v in _fields(value[len(PROTO_MAGIC):]) if n == 2 and isinstance(v, bytes)), b"")
    meta = next((v for n, v in _fields(raw) if n == 1 and isinstance(v, bytes)), b"")
    times = []
    for num, v in _fields(meta):
        if num == 8 and isinstance(v, bytes):
            times.append(_proto_time(v))
        elif num == 17 and isinstance(v, bytes):
            times += [_proto_time(t) for n, t in _fields(v) if n == 4 and isinstance(t, bytes)]
    return [t for t in times if t]


def _json_times(value: bytes) -> list[datetime]:
    meta = json.loads(value).get("metadata") or {}
    stamps = [meta.get("creationTimestamp")] + [m.get("time") for m in meta.get("managedFields") or []
                                                 if isinstance(m, dict)]
    return [datetime.fromisoformat(s.replace("Z", "+00:00")) for s in stamps if isinstance(s, str) and s]


def object_time(value: bytes) -> datetime | None:
    """When a stored Kubernetes object last changed, as far as its metadata says; None when the
    value is no Kubernetes object (or is damaged: the plan never fails on this)."""
    try:
        times = _proto_times(value) if value.startswith(PROTO_MAGIC) else _json_times(value)
    except (ValueError, AttributeError, TypeError, OverflowError, OSError):
        return None
    return max(times) if times else None


def parse_contents(count_fields: str, newest_json: str) -> Contents:
    """From `etcdctl get "" --from-key --count-only -w fields` (etcdctl 3.5.1 counts in no other
    form) and `etcdctl get "" --from-key --sort-by=MODIFY --order=DESCEND --limit=N -w json`,
    both asked of an etcd that nothing writes to."""
    newest = json.loads(newest_json)
    kvs = newest.get("kvs") or []
    times = [t for kv in kvs if (t := object_time(base64.b64decode(kv.get("value", ""))))]
    top = kvs[0] if kvs else None
    return Contents(revision=int(newest["header"]["revision"]), keys=parse_count_fields(count_fields),
                    newest_key=base64.b64decode(top["key"]).decode(errors="replace") if top else None,
                    newest_mod_revision=int(top["mod_revision"]) if top else None,
                    newest_time=max(times) if times else None)
