"""One test suite for every BackupStore: a directory and S3 (a real S3 server process)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import uuid

import pytest

from core.errors import NovaDRError
from tasks.storage import DirectoryStore, StoreError, open_store
from tests.helpers import make_bucket, s3_env, shared_s3, start_s3


@pytest.fixture(params=["dir", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "dir":
        (tmp_path / "store").mkdir()
        return DirectoryStore(tmp_path / "store")
    endpoint = shared_s3()
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    make_bucket(endpoint, bucket)
    return open_store(f"s3://{bucket}/backups/nova")


def test_put_list_get_delete(store, tmp_path):
    data = os.urandom(100_000)
    size, sha = store.put("a.tar.gz", lambda out: out.write(data))
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    store.put("b.json", lambda out: out.write(b"{}"))
    assert [(f.name, f.size) for f in store.list()] == [("a.tar.gz", len(data)), ("b.json", 2)]
    store.get("a.tar.gz", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    store.delete("a.tar.gz")
    assert [f.name for f in store.list()] == ["b.json"]


def test_large_file_goes_in_parts_and_round_trips(store, tmp_path):
    chunk = os.urandom(1 << 20)
    size, sha = store.put("big.db", lambda out: [out.write(chunk) for _ in range(40)])  # 40 MiB, 3 parts on S3
    assert size == 40 << 20 and sha == hashlib.sha256(chunk * 40).hexdigest()
    store.get("big.db", tmp_path / "big")
    assert hashlib.sha256((tmp_path / "big").read_bytes()).hexdigest() == sha


def test_a_symlink_planted_at_a_download_name_is_refused(store, tmp_path):
    """Fetching into a folder others can write: a link at the file's name must not make us
    write a backup (keys, tokens) through it to wherever it points."""
    from tasks.crypto import decrypt_file

    store.put("a.tar.gz", lambda out: out.write(b"secret bytes"))
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    (tmp_path / "got").symlink_to(target)
    with pytest.raises(StoreError, match="is a symbolic link; refusing"):
        store.get("a.tar.gz", tmp_path / "got")
    with pytest.raises(NovaDRError, match="cannot create"):
        decrypt_file(tmp_path / "x.age", tmp_path / "got", [], "x.age")
    assert target.read_text() == "keep me"


def test_a_failed_writer_leaves_nothing(store):
    def boom(out):
        out.write(b"half")
        raise RuntimeError("the master went away")

    with pytest.raises(RuntimeError, match="went away"):
        store.put("x.tar.gz", boom)
    assert store.list() == []


def test_names_are_plain(store):
    with pytest.raises(StoreError, match="not a plain file name"):
        store.put("../etc/passwd", lambda out: None)


def test_directory_store_modes_and_missing_dir(tmp_path):
    st = DirectoryStore(tmp_path)
    st.put("secret.tar.gz", lambda out: out.write(b"x"), mode=0o600)
    assert (tmp_path / "secret.tar.gz").stat().st_mode & 0o777 == 0o600
    with pytest.raises(StoreError, match="no such directory; mount it or create it first"):
        DirectoryStore(tmp_path / "nope").list()


def test_full_directory_store_is_a_clear_failure(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        st = DirectoryStore(mnt)
        with pytest.raises(StoreError, match="writing big failed: No space left on device"):
            st.put("big", lambda out: [out.write(os.urandom(1 << 16)) for _ in range(64)])
        assert os.listdir(mnt) == []  # no partial file left
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_s3_server_stopped_mid_upload_is_retried_then_fails_clearly(monkeypatch):
    p, endpoint = start_s3("s3-dying")
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    make_bucket(endpoint, "dying")
    st = open_store("s3://dying/p")
    st.attempts = 2
    killed = threading.Event()
    calls: list[int] = []  # UploadPart calls nova-dr made, by part number (botocore's events: not our code)
    st.s3.meta.events.register("provide-client-params.s3.UploadPart",
                               lambda params, **kw: calls.append(params["PartNumber"]))

    def writer(out):
        out.write(os.urandom(20 << 20))  # the first part goes up
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        killed.set()
        out.write(os.urandom(20 << 20))

    with pytest.raises(StoreError, match=r"store s3://dying/p: uploading big.db \(part 2\) failed"):
        st.put("big.db", writer)
    assert killed.is_set()
    assert calls.count(1) == 1 and calls.count(2) == st.attempts, calls  # part 2 tried again, then given up
    from lab import s3

    s3.remove_sockets(p.ports)  # a killed weed leaves them in /tmp
