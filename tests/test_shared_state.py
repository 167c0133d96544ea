"""State that every worker shares (NOVA_DR_STATE=block:NAME): a recovery killed on one machine
is finished by a re-run on another, which finds the first one's checkpoints in the shared store
(the session's real S3 server), and a record planted there is never trusted."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import boto3
import pytest

from blocks.state import MAGIC, StateStore
from blocks.storage import S3Credentials
from tests.helpers import make_bucket, s3_env
from tests.test_lock_resume import finish, hold, kill, reached, restore_args, start
from tests.test_restore import _wait_for, assert_restored, prepare_lab


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


def test_a_restore_killed_on_one_machine_is_finished_on_another(lab3, tmp_path, state_block):
    bucket, st, _ = state_block
    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd3", "wipe")
    members = [m.member for m in lab3.masters()]

    def machine(name: str) -> dict:  # the same Prefect server, a local disk of its own
        return dict(os.environ, NOVA_DR_HOME=str(tmp_path / name), NOVA_DR_STATE=f"block:{bucket}")

    # Machine A: every member stopped, none swapped, then killed.
    holds = [hold(lab3, m, "systemctl-stop") for m in members]
    log_a = tmp_path / "a.log"
    proc = start(restore_args(lab3, snap), machine("a"), log_a)
    _wait_for(lambda: reached(holds) or proc.poll() is not None, 240, "the stops")
    later = [hold(lab3, m, "cat-/etc/etcd.env-") for m in members]
    for h in holds:
        h.unlink()
    _wait_for(lambda: reached(later) or proc.poll() is not None, 60, "the stops to finish")
    assert proc.poll() is None, log_a.read_text()[-3000:]
    rid = re.search(r"recovery id: (\S+)", log_a.read_text()).group(1)
    kill(proc, later)
    assert not list(Path(tmp_path / "a").glob("checkpoints/*"))  # nothing of it on A's own disk

    # Machine B: nothing on its disk; the checkpoints A wrote to the shared store.
    code, out = finish(restore_args(lab3, snap), machine("b"), tmp_path / "b.log")
    assert code == 0, out[-4000:]
    assert f"recovery id: {rid}" in out and f"Resuming recovery {rid}: " in out, out[-4000:]
    skipped = re.search(rf"Resuming recovery {rid}: (\d+) step", out).group(1)
    assert int(skipped) >= len(members), out[-4000:]  # at least every stop, done by A
    assert_restored(lab3, expected)
    # Done, for every machine: A would start the same restore afresh, as a new recovery.
    from flows.machinery import _is_done

    os.environ["NOVA_DR_STATE"] = f"block:{bucket}"
    try:
        assert _is_done(rid) and json.loads(st.read(f"{rid}.done.json"))
    finally:
        del os.environ["NOVA_DR_STATE"]
