"""What the plan says a snapshot holds: objects' times read from the bytes Kubernetes stores
(protobuf and JSON), then a real snapshot's content in `nova-dr plan restore-etcd-cluster`."""

from __future__ import annotations

import base64
import json
import subprocess
from datetime import datetime, timedelta, timezone

from core.contents import Contents, object_time, parse_contents
from flows.restore import plan_restore
from lab.lab import etcd_bin_dir
from tests.helpers import put_keys, snapshot

T1 = datetime(2026, 11, 30, 4, 0, 0, tzinfo=timezone.utc)
T2 = datetime(2026, 12, 1, 22, 15, 7, tzinfo=timezone.utc)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _field(num: int, body: bytes | int) -> bytes:
    if isinstance(body, int):
        return _varint(num << 3) + _varint(body)
    return _varint(num << 3 | 2) + _varint(len(body)) + body


def proto_object(created: datetime, managed: list[datetime]) -> bytes:
    """A Deployment as the API server stores it: k8s\\0 + runtime.Unknown{typeMeta=1, raw=2}."""
    meta = _field(1, b"web") + _field(3, b"default") + _field(8, _field(1, int(created.timestamp())))
    for t in managed:  # ManagedFieldsEntry{manager=1, time=4{seconds=1, nanos=2}}
        meta += _field(17, _field(1, b"kubectl") + _field(4, _field(1, int(t.timestamp())) + _field(2, 5)))
    raw = _field(1, meta) + _field(2, b"\x08\x03")  # metadata, then a spec
    return b"k8s\x00" + _field(1, _field(1, b"apps/v1") + _field(2, b"Deployment")) + _field(2, raw)


def json_object(created: datetime, managed: list[datetime]) -> bytes:
    z = "%Y-%m-%dT%H:%M:%SZ"
    return json.dumps({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {
        "name": "w", "creationTimestamp": created.strftime(z),
        "managedFields": [{"manager": "m", "time": t.strftime(z)} for t in managed]}}).encode()


def test_object_time_is_the_newest_of_creation_and_managed_fields():
    assert object_time(proto_object(T1, [T1, T2])) == T2
    assert object_time(proto_object(T1, [])) == T1
    assert object_time(json_object(T1, [T2])) == T2


def test_values_that_are_no_kubernetes_object_give_no_time_and_no_error():
    assert object_time(b"value-1") is None
    assert object_time(b'{"metadata": "x"}') is None
    assert object_time(b"k8s\x00\x12\xff\xff") is None  # a length that runs past the end
    assert object_time(b"[1, 2]") is None


def test_parse_contents_and_the_line_the_approver_reads():
    kvs = [{"key": base64.b64encode(b"/registry/deployments/default/web").decode(), "mod_revision": 812,
            "value": base64.b64encode(proto_object(T1, [T2])).decode()},
           {"key": base64.b64encode(b"/x").decode(), "mod_revision": 800, "value": base64.b64encode(b"v").decode()}]
    c = parse_contents('"Revision" : 812\n"Count" : 301\n', json.dumps({"header": {"revision": 812}, "kvs": kvs}))
    assert c == Contents(812, 301, "/registry/deployments/default/web", 812, T2)
    line = c.line(T2 + timedelta(hours=6))
    assert "revision 812, 301 keys" in line and "2026-12-01T22:15:07Z (6.0 h ago)" in line
    assert "AHEAD" in c.line(T2 - timedelta(hours=1))  # a snapshot from the future is called that
    empty = parse_contents('"Count" : 0', '{"header": {"revision": 1}}')
    assert empty.keys == 0 and empty.newest_key is None and "no time readable" in empty.line(T2)


def test_the_restore_plan_shows_the_snapshots_revision_keys_and_newest_change(lab3, tmp_path):
    put_keys(lab3, "/registry/pods/p", 50)
    env = lab3.etcdctl_env()
    for key, value in [("/registry/deployments/default/web", proto_object(T1, [T1, T2])),
                       ("/registry/example.com/widgets/default/w", json_object(T1, [T1]))]:
        subprocess.run([str(etcd_bin_dir() / "etcdctl"), "put", key], input=value, env=env, check=True,
                       capture_output=True, timeout=30)
    status = json.loads(subprocess.run([str(etcd_bin_dir() / "etcdctl"), "endpoint", "status", "-w", "json"],
                                       env=env, check=True, capture_output=True, timeout=30).stdout)
    keys = len(subprocess.run([str(etcd_bin_dir() / "etcdctl"), "get", "", "--from-key", "--keys-only"], env=env,
                              check=True, capture_output=True, text=True).stdout.split())
    snap = snapshot(lab3, tmp_path / "snapshot.db")
    put_keys(lab3, "/later/k", 5)  # after the snapshot: not in what the plan describes
    plan = plan_restore(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap))
    revision = status[0]["Status"]["header"]["revision"]
    assert (f"What the snapshot holds: revision {revision}, {keys} keys, newest key "
            f"/registry/example.com/widgets/default/w (mod revision {revision}); "
            "newest object change 2026-12-01T22:15:07Z") in plan.summary, plan.summary
    assert not any("content" in w for w in plan.warnings)
