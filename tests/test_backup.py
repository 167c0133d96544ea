"""backup-master-nodes on the lab, to a directory and to S3 (the lab's S3 server process).

No StarVault runs here: a small HTTP server in this file speaks its raft snapshot endpoint.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from blocks.storage import StarVaultCredentials
from flows.backup import backup_master_nodes
from flows.restore import restore_etcd_cluster
from lab.lab import etcd_bin_dir
from tasks.remote import connect
from tasks.storage import open_store
from core.signing import open_manifest
from tests.helpers import keys_on, make_bucket, put_keys, raft_snapshot_bytes, signer
from tests.test_restore import assert_restored, error_of

RAFT = raft_snapshot_bytes(os.urandom(300_000))
TOKEN = "s.nova-test-token"
BAD_TOKEN = "s.nova-refused-token-5c1e"  # what the sv-bad block sends: the secret a refusal must not show


class _StarVault(BaseHTTPRequestHandler):
    tokens: list[str] = []  # every token it was sent
    stall: threading.Event | None = None  # set: a request waits for it before it is answered
    body: bytes | None = None  # set: sent instead of a good snapshot (a cut-off or damaged one)

    def do_GET(self):
        self.tokens.append(self.headers.get("X-Vault-Token", ""))
        if self.stall is not None:
            self.stall.wait(120)
        if self.path != "/v1/sys/storage/raft/snapshot":
            self.send_error(404)
        elif self.headers.get("X-Vault-Token") != TOKEN:
            self.send_error(403, "permission denied")
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            body = RAFT if self.body is None else self.body
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def starvault():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _StarVault)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    StarVaultCredentials(address=f"http://127.0.0.1:{srv.server_address[1]}", token=TOKEN).save("sv-test", overwrite=True)
    StarVaultCredentials(address=f"http://127.0.0.1:{srv.server_address[1]}", token=BAD_TOKEN).save("sv-bad", overwrite=True)
    yield "sv-test"
    srv.shutdown()


@pytest.fixture
def lab_s3(lab3, monkeypatch):
    endpoint = lab3.state()["s3"]["endpoint"]
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "nova-test", "AWS_SECRET_ACCESS_KEY": "x",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    bucket = f"nova-backups-{uuid.uuid4().hex[:8]}"  # the session's server is shared
    make_bucket(endpoint, bucket)
    return f"s3://{bucket}/cluster-a"


def _members(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return t.getnames()


def _check_set(lab, folder: Path, result: dict) -> None:
    ts = result["timestamp"]
    cluster = lab.cluster()
    expected = {f"etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_{ts}.db.tar.gz", f"starvault_snapshot_nova-v6.0.1_{ts}.db",
                f"nova-dr-manifest_{ts}.json"} | {f"{m.archive_name}_kubereresources_{ts}.tar.gz" for m in cluster.masters}
    assert {p.name for p in folder.iterdir()} == expected
    opened = open_manifest((folder / f"nova-dr-manifest_{ts}.json").read_bytes(), "m", [signer()[1]])
    assert opened.signer, opened.problem  # signed, by the key the inventory trusts
    manifest = opened.doc
    assert set(manifest["files"]) == expected - {f"nova-dr-manifest_{ts}.json"}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
        assert (folder / name).stat().st_size == entry["size"]
    assert manifest["nova_version"] == "6.0.1" and manifest["etcd_snapshot"]["status"]["revision"] > 0
    assert (folder / f"starvault_snapshot_nova-v6.0.1_{ts}.db").read_bytes() == RAFT
    # The etcd archive untars to opt/backup/<name>.db, and etcd restores it.
    etcd_tgz = folder / f"etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_{ts}.db.tar.gz"
    db = f"opt/backup/etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_{ts}.db"
    assert _members(etcd_tgz) == [db]
    subprocess.run(["tar", "-xzf", str(etcd_tgz), "-C", str(folder.parent / "x")], check=True)
    subprocess.run([str(etcd_bin_dir() / "etcdutl"), "snapshot", "restore", str(folder.parent / "x" / db),
                    "--data-dir", str(folder.parent / "x/restored")], check=True, capture_output=True)
    assert (folder.parent / "x/restored/member/snap/db").exists()
    # Each node archive: that master's certificates and keys, the config, the tokens; no CA key.
    for m in cluster.masters:
        names = _members(folder / f"{m.archive_name}_kubereresources_{ts}.tar.gz")
        assert {"etc/kubernetes/pki/apiserver.crt", "etc/kubernetes/pki/apiserver.key", "etc/kubernetes/pki/ca.crt",
                "etc/kubernetes/encryption-config.yaml", "etc/starvault/unseal-tokens"} <= set(names)
        assert not {"etc/kubernetes/pki/ca.key", "etc/kubernetes/pki/custom-root.key",
                    "etc/kubernetes/pki/front-proxy-ca.key", "etc/kubernetes/pki/etcd/ca.key"} & set(names)
        with tarfile.open(folder / f"{m.archive_name}_kubereresources_{ts}.tar.gz") as t:
            cert = t.extractfile("etc/kubernetes/pki/apiserver.crt").read()
        assert m.node.encode() in subprocess.run(["openssl", "x509", "-noout", "-text"], input=cert,
                                                 capture_output=True, check=True).stdout  # this master's own
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert all(mode == 0o600 for name, mode in modes.items() if not name.endswith(".json"))


def _leader(lab) -> str:
    from core.etcd import parse_endpoint_status

    st = parse_endpoint_status(lab.etcdctl("endpoint", "status", "-w", "json").stdout)
    leader = next(s for s in st if s.is_leader)
    return next(m.member for m in lab.masters() if leader.endpoint == f"https://{m.address}:2379")


def test_backup_to_a_directory(lab3, starvault, tmp_path):
    put_keys(lab3, "/registry/a/", 30)
    store = tmp_path / "nfs"
    store.mkdir()
    (tmp_path / "x").mkdir()
    leader = _leader(lab3)
    state = backup_master_nodes(inventory=str(lab3.dir / "inventory.yaml"), store=str(store), starvault_block=starvault,
                                return_state=True)
    assert state.is_completed(), error_of(state)
    result = state.result()
    _check_set(lab3, store, result)
    snap = next(f for f in result["files"] if f["kind"] == "etcd")
    assert snap["member"] != leader  # taken once, from a follower


def test_each_switch_removes_exactly_its_part(lab3, tmp_path, monkeypatch):
    inv = str(lab3.dir / "inventory.yaml")
    monkeypatch.setenv("INCLUDE_STARVAULT_DB_BACKUP", "false")  # the environment counts too
    seen = {}
    for switch in ("INCLUDE_PKI_DATA", "INCLUDE_DATA_ENCRYPTION_CONFIG", "INCLUDE_STARVAULT_UNSEAL_TOKENS"):
        store = tmp_path / switch
        store.mkdir()
        result = backup_master_nodes(inventory=inv, store=str(store), **{switch: False})
        assert not any(n.startswith("starvault_") for n in os.listdir(store))
        node = next(store.glob("nova-master-1-*_kubereresources_*.tar.gz"))
        seen[switch] = set(_members(node))
        assert result["settings"][switch] is False and result["settings"]["INCLUDE_STARVAULT_DB_BACKUP"] is False
    pki = {n for n in seen["INCLUDE_DATA_ENCRYPTION_CONFIG"] if n.startswith("etc/kubernetes/pki/")}
    assert pki and seen["INCLUDE_PKI_DATA"] == {"etc/kubernetes/encryption-config.yaml", "etc/starvault/unseal-tokens"}
    assert seen["INCLUDE_DATA_ENCRYPTION_CONFIG"] == pki | {"etc/starvault/unseal-tokens"}
    assert seen["INCLUDE_STARVAULT_UNSEAL_TOKENS"] == pki | {"etc/kubernetes/encryption-config.yaml"}


def test_s3_round_trip_restores_the_cluster(lab3, lab_s3, starvault, tmp_path):
    inv = str(lab3.dir / "inventory.yaml")
    put_keys(lab3, "/registry/pods/p", 200)
    expected = keys_on(lab3, "etcd1")
    state = backup_master_nodes(inventory=inv, store=lab_s3, starvault_block=starvault, return_state=True)
    assert state.is_completed(), error_of(state)
    ts = state.result()["timestamp"]
    from tasks.backups import fetch_set, find_set
    from tasks.storage import open_store

    st = open_store(lab_s3)
    got = tmp_path / "got"
    (tmp_path / "x").mkdir()
    names = [m.archive_name for m in lab3.cluster().masters]
    report = fetch_set(st, find_set(st, "latest", names, True), got, trusted=lab3.cluster().backup_signers)
    assert report["set"] == ts and report["verified"] and not report["problems"]
    _check_set(lab3, got, state.result())
    put_keys(lab3, "/later/k", 20)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd3", "wipe")
    state = restore_etcd_cluster(inventory=inv, store=lab_s3, backup="latest", auto_approve=True, return_state=True)
    assert state.is_completed(), error_of(state)
    assert_restored(lab3, expected)


def test_faults_write_no_manifest(lab3, lab_s3, starvault, tmp_path):
    inv = str(lab3.dir / "inventory.yaml")
    store = tmp_path / "nfs"
    store.mkdir()
    state = backup_master_nodes(inventory=inv, store=str(store), starvault_block="sv-bad", return_state=True)
    assert "raft snapshot refused (HTTP 403" in error_of(state) and BAD_TOKEN not in error_of(state)
    assert BAD_TOKEN in _StarVault.tokens  # it was sent: so its absence from the error means something
    assert not list(store.glob("nova-dr-manifest_*"))
    state = backup_master_nodes(inventory=inv, store=str(store), return_state=True)
    assert "no starvault_block is given" in error_of(state)
    # an HTTP 200 whose snapshot is cut off, or whose SHA256SUMS disagrees: not stored
    for body, says in ((RAFT[:len(RAFT) // 2], "not a complete raft snapshot"),
                       (raft_snapshot_bytes(b"state", damage="sums"), "sha256 of state.bin differs")):
        _StarVault.body = body
        try:
            state = backup_master_nodes(inventory=inv, store=str(store), starvault_block=starvault,
                                        return_state=True)
        finally:
            _StarVault.body = None
        assert "the raft snapshot it sent is unusable" in error_of(state) and says in error_of(state)
        assert not list(store.glob("starvault_snapshot_*")) and not list(store.glob("nova-dr-manifest_*"))

    manifests = lambda: {f.name for f in open_store(lab_s3).list() if f.name.startswith("nova-dr-manifest_")}  # noqa: E731
    before = manifests()
    lab3.stop_sshd("etcd2")
    state = backup_master_nodes(inventory=inv, store=lab_s3, starvault_block=starvault, return_state=True)
    assert "nova-master-2.lab.local" in error_of(state) and "No manifest was written" in error_of(state)
    assert manifests() == before  # as the store itself says, not only the message


def test_the_next_backup_clears_what_killed_backups_left(lab3, lab_s3, tmp_path):
    """A kill leaves a partial file in a directory store, an open multipart upload in S3 and
    the snapshot copy on a master. None has a final name or a manifest; the next backup
    removes the ones old enough, and leaves a fresh one (a backup running beside it) alone."""
    inv = str(lab3.dir / "inventory.yaml")
    store = tmp_path / "nfs"
    store.mkdir()
    old = store / ".etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-12-01_030000.db.tar.gz.part-1-2"
    fresh = store / ".nova-master-1-nova-internal_kubereresources_2026-12-01_030000.tar.gz.part-3-4"
    foreign = store / ".someone-elses.tar.gz.part-5-6"  # not a name of ours: never touched
    for p in (old, fresh, foreign):
        p.write_bytes(b"half")
    for p in (old, foreign):
        os.utime(p, (time.time() - 6 * 3600,) * 2)
    cluster = lab3.cluster()
    conn = connect(cluster, cluster.master("etcd2"))
    copy = f"{cluster.master('etcd2').paths.backup_dir}/.nova-dr-2026-12-01_030000.db"
    conn.run(["sh", "-c", 'head -c 100000 /dev/zero > "$1" && touch -d "6 hours ago" "$1"', "sh", copy])
    state = backup_master_nodes(inventory=inv, store=str(store), INCLUDE_STARVAULT_DB_BACKUP=False, return_state=True)
    assert state.is_completed(), error_of(state)
    assert not old.exists() and fresh.exists() and foreign.exists()
    assert conn.run(["test", "-e", copy], check=False).code == 1
    assert len(list(store.glob("nova-dr-manifest_*"))) == 1  # and the backup itself is whole

    st = open_store(lab_s3)
    bucket, prefix = st.bucket, st.prefix
    killed = "etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-12-01_030000.db.tar.gz"
    up = st.s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/{killed}")
    st.s3.upload_part(Bucket=bucket, Key=f"{prefix}/{killed}", UploadId=up["UploadId"],
                      PartNumber=1, Body=b"x" * (5 << 20))
    other = st.s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/someone-elses.bin")["UploadId"]
    open_uploads = lambda: {u["UploadId"] for u in st.s3.list_multipart_uploads(  # noqa: E731
        Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", [])}
    assert open_uploads() == {up["UploadId"], other}  # the server keeps them open
    state = backup_master_nodes(inventory=inv, store=lab_s3, INCLUDE_STARVAULT_DB_BACKUP=False,
                                leftover_age_minutes=0, return_state=True)
    assert state.is_completed(), error_of(state)
    assert open_uploads() == {other}  # ours aborted, the other tool's left alone
    assert killed not in {f.name for f in st.list()}


def test_a_backup_killed_half_way_is_never_read_as_a_complete_set(lab3, starvault, tmp_path):
    """The orchestrator dies once the etcd snapshot and the master archives are stored, while
    StarVault's snapshot is on its way. Only whole files have final names; with no StarVault
    snapshot and no manifest the set is not complete, and verify-backups' `latest` is the set
    before it (it took the killed one, and failed it). An etcd restore needs no StarVault
    snapshot: for it the killed set is whole (its log says it has no manifest)."""
    import signal
    import sys

    from core.names import parse_name
    from flows.verify import verify_backups
    from tasks.backups import find_set
    from tests.helpers import REPO
    from tests.test_restore import _wait_for

    inv = str(lab3.dir / "inventory.yaml")
    store = tmp_path / "nfs"
    store.mkdir()
    first = backup_master_nodes(inventory=inv, store=str(store), starvault_block=starvault)["timestamp"]
    time.sleep(1.1)  # a set's name has the second
    stored = lambda: [p.name for p in store.iterdir() if parse_name(p.name) and first not in p.name]  # noqa: E731
    code = ("from flows.backup import backup_master_nodes as f; "
            f"f(inventory={inv!r}, store={str(store)!r}, starvault_block={starvault!r})")
    asked = len(_StarVault.tokens)
    _StarVault.stall = threading.Event()
    try:
        with open(tmp_path / "killed.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True, stdout=log,
                                    stderr=log)
        _wait_for(lambda: (len(stored()) == 4 and len(_StarVault.tokens) > asked) or proc.poll() is not None,
                  180, "the archives and the StarVault request")
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _StarVault.stall.set()
        _StarVault.stall = None
    killed = {parse_name(n).ts for n in stored()}
    assert len(killed) == 1 and first not in killed and sorted(parse_name(n).kind for n in stored()) == [
        "etcd", "node", "node", "node"]  # whole files under final names, and nothing else
    names = [m.archive_name for m in lab3.cluster().masters]
    assert find_set(open_store(str(store)), "latest", names, True).ts == first
    restoring = find_set(open_store(str(store)), "latest", names, False)
    assert restoring.ts in killed and restoring.manifest is None
    verified = verify_backups(inventory=inv, store=str(store))
    assert verified["set"] == first, verified["summary"]


def test_a_backup_dir_without_room_for_the_snapshot_is_named_before_the_save(lab3, tmp_path):
    """etcd's snapshot is saved in paths.backup_dir on a master first: a disk without room for
    it is refused in one line that says how much is needed, and nothing is stored."""
    put_keys(lab3, "/registry/pods/p", 200)
    inv = str(lab3.dir / "inventory.yaml")
    store = tmp_path / "nfs"
    store.mkdir()
    mounted = []
    try:
        for m in lab3.masters():  # whichever member the backup picks
            ns = lab3.enter(m.member)
            subprocess.run(ns + ["sh", "-c", 'mkdir -p /opt/backup && mount -t tmpfs -o size=1m tmpfs /opt/backup'],
                           check=True)
            mounted.append(ns)
        state = backup_master_nodes(inventory=inv, store=str(store), INCLUDE_STARVAULT_DB_BACKUP=False,
                                    return_state=True)
        msg = error_of(state)
        assert not state.is_completed() and "/opt/backup has 1 MiB free, the snapshot needs about" in msg, msg
        assert "Traceback" not in msg and not list(store.glob("nova-dr-manifest_*"))
        assert not list(store.glob("etcd_snapshot_*"))
    finally:
        for ns in mounted:
            subprocess.run(ns + ["umount", "/opt/backup"], check=True)
