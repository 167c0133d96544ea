"""State that every worker shares (NOVA_DR_STATE=block:NAME), on the session's real S3 server: a
record planted there is never trusted. (A recovery killed on one worker and finished on the other
from these records: tests/test_engine.py.)"""

from __future__ import annotations

import json
import uuid

import boto3
import pytest

from blocks.state import MAGIC, StateStore
from blocks.storage import S3Credentials
from tests.helpers import make_bucket, s3_env


@pytest.fixture
def state_block(s3_endpoint) -> tuple[str, StateStore, object]:
    """A Nova DR State Store block on a bucket of its own, and a raw client to that bucket."""
    bucket = f"state-{uuid.uuid4().hex[:10]}"
    make_bucket(s3_endpoint, bucket)
    env = s3_env(s3_endpoint)
    S3Credentials(endpoint_url=s3_endpoint, access_key_id=env["AWS_ACCESS_KEY_ID"],
                  secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).save(f"{bucket}-s3", overwrite=True)
    block = StateStore(url=f"s3://{bucket}/nova-dr-state", s3_block=f"{bucket}-s3")
    block.save(bucket, overwrite=True)
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    return bucket, StateStore.load(bucket), raw


def test_a_record_planted_in_the_shared_store_is_never_trusted(state_block):
    bucket, st, raw = state_block
    st.write("r-1-step@etcd1", b'{"ok": 1}')
    assert st.read("r-1-step@etcd1") == b'{"ok": 1}' and st.read("nothing-here") is None
    body = raw.get_object(Bucket=bucket, Key="nova-dr-state/r-1-step@etcd1")["Body"].read()
    assert body.startswith(MAGIC) and st.hmac_key.get_secret_value().encode() not in body
    # Someone with write access to the bucket: a pickle result (Prefect would unpickle it), a
    # record moved to another step's name, a changed byte.
    pickle = json.dumps({"metadata": {"serializer": {"type": "pickle"}}, "result": "gASV..."}).encode()
    raw.put_object(Bucket=bucket, Key="nova-dr-state/r-1-stop@etcd2", Body=pickle)
    raw.put_object(Bucket=bucket, Key="nova-dr-state/r-1-swap@etcd2", Body=body)
    raw.put_object(Bucket=bucket, Key="nova-dr-state/r-1-step@etcd1", Body=body.replace(b'"ok": 1', b'"ok": 2'))
    for name in ("r-1-stop@etcd2", "r-1-swap@etcd2", "r-1-step@etcd1"):
        assert st.read(name) is None
        with pytest.raises(Exception, match="no trusted record"):
            st.read_path(name, _sync=True)  # as Prefect's result store calls it: a cache miss
    # Another key (another fleet's block on the same bucket) cannot read this one's records either.
    assert StateStore(url=st.url, s3_block=st.s3_block).read("r-1-step@etcd1") is None


def test_fleet_state_saves_a_store_that_works_and_never_replaces_one(tmp_path):
    import subprocess

    from tests.test_deployments import CLI

    name, shared = f"state-{uuid.uuid4().hex[:8]}", tmp_path / "nfs"
    shared.mkdir()

    def save(n: str, url: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, "fleet", "state", "--name", n, "--url", url], capture_output=True, text=True,
                              timeout=120)

    out = save(name, str(shared))
    assert out.returncode == 0 and f"NOVA_DR_STATE=block:{name}" in out.stdout, out
    st = StateStore.load(name)
    st.write("r-2-stop@etcd1", b"{}")
    assert st.read("r-2-stop@etcd1") == b"{}"
    again = save(name, str(shared))  # a new key would disown every record written under the old one
    assert again.returncode == 2 and "exists" in again.stderr and StateStore.load(name).hmac_key == st.hmac_key
    bad = save(f"{name}-x", str(tmp_path / "not-mounted"))
    assert bad.returncode == 1 and "nothing was saved" in bad.stderr and "Traceback" not in bad.stderr, bad
    with pytest.raises(ValueError):
        StateStore.load(f"{name}-x")
