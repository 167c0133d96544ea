"""Backups that the store's admin cannot destroy: S3 Object Lock on a real S3 server
(SeaweedFS), written by backup-master-nodes, honoured by retention, reported by verify-backups."""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import boto3
import pytest

from core.errors import NovaDRError
from core.names import etcd_snapshot_name, node_archive_name, timestamp
from flows.backup import backup_master_nodes
from flows.verify import verify_backups
from tasks.storage import S3Store
from tests.helpers import make_bucket, s3_env
from tests.test_restore import error_of


@pytest.fixture
def s3(lab3, monkeypatch):
    endpoint = lab3.state()["s3"]["endpoint"]
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    return endpoint


def locked_bucket(endpoint: str) -> str:
    bucket = f"nova-locked-{uuid.uuid4().hex[:8]}"
    env = s3_env(endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(
        Bucket=bucket, ObjectLockEnabledForBucket=True)
    return bucket


def plant(st: S3Store, lab, ts: str, mode: str, until: datetime) -> list[str]:
    """An old set's etcd snapshot and archives, locked until `until`."""
    cluster = lab.cluster()
    st.lock_puts(mode, until)
    names = [etcd_snapshot_name(cluster.nova_version, cluster.k8s_version, ts)]
    names += [node_archive_name(m.archive_name, ts) for m in cluster.masters]
    for n in names:
        st.put(n, lambda out: out.write(b"old"))
    st.lock = None
    return names


def versions(st: S3Store, name: str) -> list[str]:
    page = st.s3.list_object_versions(Bucket=st.bucket, Prefix=st._key(name))
    return [v["VersionId"] for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            if v["Key"] == st._key(name)]


def test_locked_sets_survive_their_admin_and_retention_removes_only_expired_ones(lab3, s3):
    inv = str(lab3.dir / "inventory.yaml")
    url = f"s3://{locked_bucket(s3)}/cluster-a"
    st = S3Store(url)
    now = datetime.now(timezone.utc)
    still = plant(st, lab3, timestamp(now - timedelta(days=10)), "COMPLIANCE", now + timedelta(days=2))
    lapsing = plant(st, lab3, timestamp(now - timedelta(days=9)), "GOVERNANCE", now + timedelta(seconds=3))
    time.sleep(4)  # the second set's lock has expired; the first one's holds for two more days

    state = backup_master_nodes(inventory=inv, store=url, INCLUDE_STARVAULT_DB_BACKUP=False, RETENTION_PERIOD_DAYS=1,
                                object_lock="COMPLIANCE", return_state=True)
    assert state.is_completed(), error_of(state)
    result = state.result()
    # Every file of the new set carries the lock, for the retention period.
    for f in result["files"] + [{"name": result["manifest"]}]:
        mode, until = st.retention_of(f["name"])
        assert mode == "COMPLIANCE" and abs(until - (now + timedelta(days=1))) < timedelta(minutes=10), f["name"]
    # ... and the server itself refuses to delete it: this is what stops ransomware.
    new_etcd = next(f["name"] for f in result["files"] if f["kind"] == "etcd")
    with pytest.raises(Exception, match="AccessDenied"):
        st.s3.delete_object(Bucket=st.bucket, Key=st._key(new_etcd), VersionId=versions(st, new_etcd)[0])
    # Retention removed the set whose lock expired, every version of it (not hidden behind a
    # delete marker, still billed), and kept the locked one whole, naming it.
    assert sorted(result["retention"]["deleted"]) == sorted(lapsing)
    assert all(versions(st, n) == [] for n in lapsing)
    listed = {f.name for f in st.list()}
    assert set(still) <= listed and not set(lapsing) & listed
    assert f"locked, kept until their lock expires: {timestamp(now - timedelta(days=10))}" in result["retention"]["kept"]

    verify = verify_backups(inventory=inv, store=url, INCLUDE_STARVAULT_DB_BACKUP=False, allow_unsigned=True,
                            return_state=True)
    checks = {c["name"]: c for c in verify.result()["checks"]}
    assert checks["object lock"]["status"] == "pass", checks["object lock"]
    assert "every file locked (COMPLIANCE) until at least" in checks["object lock"]["evidence"]


def test_an_unlocked_s3_set_is_reported_as_such(lab3, s3):
    url = f"s3://nova-plain-{uuid.uuid4().hex[:8]}/c"
    make_bucket(s3, url[5:].split("/")[0])
    inv = str(lab3.dir / "inventory.yaml")
    assert backup_master_nodes(inventory=inv, store=url, INCLUDE_STARVAULT_DB_BACKUP=False,
                               return_state=True).is_completed()
    verify = verify_backups(inventory=inv, store=url, INCLUDE_STARVAULT_DB_BACKUP=False, allow_unsigned=True)
    lock = next(c for c in verify["checks"] if c["name"] == "object lock")
    assert lock["status"] == "warn" and lock["evidence"].startswith("not locked: whoever holds the store's keys")


@pytest.mark.parametrize("store, mode, error", [
    ("s3://{plain}/c", "COMPLIANCE", "bucket {plain} has no Object Lock, so object_lock=COMPLIANCE cannot be kept"),
    ("{dir}", "GOVERNANCE", "object_lock=GOVERNANCE needs an s3:// store"),
    ("s3://{plain}/c", "compliance", "object_lock='compliance': give GOVERNANCE, COMPLIANCE or leave it empty"),
])
def test_object_lock_that_cannot_be_kept_is_refused_before_anything_is_written(lab3, s3, tmp_path, store, mode,
                                                                               error):
    plain = f"nova-plain-{uuid.uuid4().hex[:8]}"
    make_bucket(s3, plain)
    store = store.format(plain=plain, dir=tmp_path)
    before = {m.member: lab3.etcd_pid(m.member) for m in lab3.masters()}
    with pytest.raises(NovaDRError, match=re.escape(error.format(plain=plain))):
        backup_master_nodes(inventory=str(lab3.dir / "inventory.yaml"), store=store, INCLUDE_STARVAULT_DB_BACKUP=False,
                            object_lock=mode)
    assert S3Store(f"s3://{plain}/c").list() == [] and list(tmp_path.iterdir()) == []
    assert before == {m.member: lab3.etcd_pid(m.member) for m in lab3.masters()}
