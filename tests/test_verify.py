"""verify-backups on a real backup of the lab, and on copies of it broken in every way the
issue names. The drill runs a real scratch etcd; it must leave nothing behind."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

import pytest
import yaml

from flows.backup import backup_master_nodes
from flows.verify import verify_backups
from lab.certs import make_leaf
from tests.helpers import make_lab, put_keys
from tests.test_restore import error_of


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One lab and one good backup set (StarVault switched off: none runs in this module)."""
    lab = make_lab(3)
    put_keys(lab, "/registry/pods/p", 120)
    put_keys(lab, "/registry/secrets/s", 30)
    store = tmp_path_factory.mktemp("base-store")
    result = backup_master_nodes(inventory=str(lab.dir / "inventory.yaml"), store=str(store),
                                 INCLUDE_STARVAULT_DB_BACKUP=False)
    yield lab, store, result["timestamp"]
    lab.destroy()


@pytest.fixture
def case(base, tmp_path):
    lab, store, ts = base
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return lab, copy, ts


def run(lab, store: Path, inventory: str | None = None, **kw):
    mine = os.path.join(tempfile.gettempdir(), f"nova-dr-drill-{os.getpid()}-")  # this process's drills
    kw.setdefault("INCLUDE_STARVAULT_DB_BACKUP", False)  # for sets without a manifest
    # A set whose manifest the test dropped is of the daemon's kind: accepted by name, as an
    # operator would (test_signing checks that it is refused otherwise).
    kw.setdefault("allow_unsigned", not any(store.glob("nova-dr-manifest_*")))
    state = verify_backups(inventory=inventory or str(lab.dir / "inventory.yaml"), store=str(store),
                           return_state=True, **kw)
    # The drill leaves no process and no directory behind, whatever happened.
    assert glob.glob(mine + "*") == []
    assert subprocess.run(["pgrep", "-f", mine], capture_output=True).stdout == b""
    return state


def rewrite(path: Path, add: dict[str, bytes] = None, drop: set[str] = frozenset()) -> None:
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers() if m.name not in drop]
    with tarfile.open(path, "w:gz") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data) if data is not None else None)
        for name, data in (add or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def node_archive(store: Path, n: int = 1) -> Path:
    return next(store.glob(f"nova-master-{n}-*_kubereresources_*.tar.gz"))


def etcd_archive(store: Path) -> Path:
    return next(store.glob("etcd_snapshot_*.db.tar.gz"))


def flip_a_byte_that_matters(p: Path) -> None:
    """Flip one byte of the gzip so that the snapshot inside changes or the stream breaks.
    Not every flip does: one in a back-reference that copies zeros to where zeros already
    were decompresses to the very same bytes (CI hit one), and then only a manifest can tell."""
    packed = p.read_bytes()
    plain = gzip.decompress(packed)
    with tarfile.open(fileobj=io.BytesIO(plain)) as t:
        db = next(m for m in t.getmembers() if m.name.endswith(".db"))
    inside = slice(db.offset_data, db.offset_data + db.size)
    for i in range(len(packed) // 2, len(packed)):
        data = bytearray(packed)
        data[i] ^= 0x40
        try:
            changed = gzip.decompress(bytes(data))[inside] != plain[inside]
        except (OSError, EOFError, zlib.error):
            changed = True
        if changed:
            p.write_bytes(data)
            return
    raise AssertionError(f"{p}: no flip from the middle on changes the snapshot")


def drop_manifest(store: Path) -> None:
    for m in store.glob("nova-dr-manifest_*.json"):
        m.unlink()


def test_a_good_set_passes_and_the_drill_serves_its_keys(case):
    lab, store, ts = case
    state = run(lab, store)
    assert state.is_completed(), error_of(state)
    checks = {c["name"]: c for c in state.result()["checks"]}
    # this set is not encrypted and a directory cannot lock it: the two warnings, every time
    # (test_encryption covers encrypted sets, test_object_lock locked ones)
    assert {n: c["status"] for n, c in checks.items() if c["status"] != "pass"} == {"encryption": "warn",
                                                                                     "object lock": "warn"}
    assert "a directory store cannot lock files" in checks["object lock"]["evidence"]
    assert "150 keys under /registry/ in 2 resource types" in checks["drill key counts"]["evidence"]
    assert state.result()["set"] == ts


def test_a_set_older_than_max_age(case):
    lab, store, ts = case
    assert f"backup set {ts}: freshness failed" in error_of(run(lab, store, max_age_hours=0.00001))


def test_a_missing_master_archive(case):
    lab, store, ts = case
    node_archive(store, 2).unlink()
    msg = error_of(run(lab, store))
    assert "completeness failed: missing: archive of nova-master-2-nova-internal" in msg


@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_flipped_byte_in_the_etcd_archive(case, with_manifest):
    lab, store, _ = case
    if not with_manifest:
        drop_manifest(store)
    flip_a_byte_that_matters(etcd_archive(store))
    msg = error_of(run(lab, store))
    assert "integrity failed" in msg
    assert ("sha256 differs from the manifest" in msg) == with_manifest
    assert "restore drill failed" in msg


def test_a_truncated_gzip(case):
    lab, store, _ = case
    p = node_archive(store, 3)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert "integrity failed" in error_of(run(lab, store))


def test_a_member_escaping_the_archive(case):
    lab, store, _ = case
    drop_manifest(store)
    rewrite(node_archive(store, 1), add={"../../etc/passwd": b"root::0:0::/:/bin/sh\n"})
    msg = error_of(run(lab, store))
    assert "integrity failed" in msg and "'../../etc/passwd' would land outside" in msg


def test_a_version_mismatch(case, tmp_path):
    lab, store, _ = case
    inv = yaml.safe_load((lab.dir / "inventory.yaml").read_text())
    inv["nova_version"] = "6.0.2"
    inv["ssh"] = {k: str(lab.dir / v) if k.endswith("_file") else v for k, v in inv["ssh"].items()}
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(inv))
    msg = error_of(run(lab, store, inventory=str(tmp_path / "inv.yaml")))
    assert "compatibility failed: set made by Nova 6.0.1, cluster runs 6.0.2" in msg


def test_too_few_unseal_tokens(case):
    lab, store, _ = case
    drop_manifest(store)
    for n in (1, 2):  # the lab spreads 5 shares as 2, 2, 1
        rewrite(node_archive(store, n), drop={"etc/starvault/unseal-tokens"})
    msg = error_of(run(lab, store))
    assert "unseal tokens failed: 1 distinct tokens across 1 archives, 3 needed" in msg


def test_a_ca_private_key_inside_an_archive(case):
    lab, store, _ = case
    drop_manifest(store)
    key = (lab.dir / "pki/k8s/custom-root.key").read_bytes()
    rewrite(node_archive(store, 2), add={"etc/kubernetes/pki/innocent-looking.key": key})
    msg = error_of(run(lab, store))
    assert "no CA private key failed" in msg and "innocent-looking.key: a CA private key" in msg


def test_a_certificate_expiring_in_ten_days_is_a_warning(case, tmp_path):
    lab, store, _ = case
    drop_manifest(store)
    make_leaf(tmp_path / "c", "soon", "soon-to-expire", lab.dir / "pki/k8s", "ca", days=10)
    rewrite(node_archive(store, 1), add={"etc/kubernetes/pki/soon.crt": (tmp_path / "c/soon.crt").read_bytes()})
    state = run(lab, store)
    assert state.is_completed(), error_of(state)
    checks = {c["name"]: c for c in state.result()["checks"]}
    assert checks["certificate expiry"]["status"] == "warn" and "soon.crt expires on" in checks["certificate expiry"]["evidence"]
    assert checks["integrity"]["status"] == "warn"  # and without a manifest the set is unverified


def test_a_snapshot_etcd_refuses_to_restore(case, tmp_path):
    lab, store, _ = case
    drop_manifest(store)
    p = etcd_archive(store)
    with tarfile.open(p) as t:
        name = t.getnames()[0]
    body = os.urandom(512 * 64)  # not a bolt database, with a valid sha256 trailer
    db = body + hashlib.sha256(body).digest()
    p.unlink()
    with tarfile.open(p, "w:gz") as t:
        info = tarfile.TarInfo(name)
        info.size = len(db)
        t.addfile(info, io.BytesIO(db))
    msg = error_of(run(lab, store))
    assert "restore drill failed" in msg and "integrity failed" not in msg


def test_a_drop_of_more_than_half_against_the_previous_drill_warns(case, tmp_path):
    lab, store, _ = case
    assert run(lab, store).is_completed()  # this drill's counts become "the previous drill"
    lab.etcdctl("del", "/registry/pods/", "--prefix")  # the cluster was emptied, and backed up like that
    emptied = tmp_path / "emptied"
    emptied.mkdir()
    backup_master_nodes(inventory=str(lab.dir / "inventory.yaml"), store=str(emptied),
                        INCLUDE_STARVAULT_DB_BACKUP=False)
    state = run(lab, emptied)
    assert state.is_completed(), error_of(state)  # still a "valid" backup...
    checks = {c["name"]: c for c in state.result()["checks"]}
    assert checks["drill key counts"]["status"] == "warn"  # ...of an emptied cluster
    assert "30 keys under /registry/, the previous drill 150" in checks["drill key counts"]["evidence"]


def test_the_drill_serves_the_snapshot_on_a_private_socket_only(base, tmp_path):
    """The scratch etcd holds every Secret of the cluster, with no auth: no TCP port of it may
    answer any local user; its unix sockets sit in a 0700 dir."""
    from core.snapshot import prepare_snapshot
    from tasks.drill import find_etcd_bins, registry_keys, scratch_etcd

    _, store, _ = base
    snap = prepare_snapshot(etcd_archive(store), tmp_path / "w", "6.0.1")
    with scratch_etcd(snap.db_path, find_etcd_bins(None)) as drill:
        sock_dir = Path(drill["endpoint"].removeprefix("unix://")).parent
        assert (sock_dir.stat().st_mode & 0o777) == 0o700
        etcd_pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _cwd(p) == sock_dir]
        assert etcd_pids, "the scratch etcd was not found"
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
        assert not [ln for ln in listening.splitlines() if any(f"pid={pid}," in ln for pid in etcd_pids)], listening
        assert any(k.startswith("/registry/pods/") for k in registry_keys(drill))  # and it does serve


def _cwd(p: Path) -> Path | None:
    try:
        return Path(os.readlink(p / "cwd"))
    except OSError:
        return None


def test_plaintext_a_killed_verification_left_is_cleared_by_the_next(case):
    """A kill leaves the scratch dir (keys, tokens, the db) behind; the next run removes it,
    and never the dir of a process that still runs."""
    lab, store, _ = case
    p = subprocess.Popen(["true"])
    p.wait()
    dead = Path(tempfile.gettempdir()) / f"nova-dr-verify-{p.pid}-abc123"
    live = Path(tempfile.gettempdir()) / "nova-dr-verify-1-abc123"  # pid 1 always runs
    for d in (dead, live):
        d.mkdir(mode=0o700)
        (d / "unseal-tokens").write_text("token")
    try:
        state = run(lab, store)
        assert state.is_completed(), error_of(state)
        assert not dead.exists() and (live / "unseal-tokens").exists()
    finally:
        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(dead, ignore_errors=True)
