"""Backup sets encrypted at rest with age: a round trip on the lab, the standard `age` command
(Debian's, written by no one here) opening what we wrote, wrong identities, flipped bytes,
re-keying, and no plaintext secret left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from pyrage import x25519

from blocks.storage import AgeIdentity
from flows.backup import backup_master_nodes
from flows.restore import restore_etcd_cluster
from flows.verify import verify_backups
from tests.helpers import ROOT, keys_on, put_keys, signer
from tests.test_backup import starvault  # noqa: F401  (the fixture)
from tests.test_restore import assert_restored, error_of, fingerprint

pytestmark = pytest.mark.slow


def keypair(name: str) -> tuple[str, Path]:
    """An age key pair: the public key, and the key file `age -d -i` reads; the identity is
    also saved as a block."""
    ident = x25519.Identity.generate()
    f = ROOT / f"{name}.txt"
    f.write_text(f"# {name}\n{ident}\n")
    f.chmod(0o600)
    AgeIdentity(identities=f.read_text()).save(name, overwrite=True)
    return str(ident.to_public()), f


def inventory_with(lab, recipients: list[str]) -> str:
    doc = yaml.safe_load((lab.dir / "inventory.yaml").read_text())
    doc["backup_recipients"] = recipients
    out = lab.dir / "inventory-encrypted.yaml"
    out.write_text(yaml.safe_dump(doc))
    return str(out)


def age_decrypt(path: Path, key: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["age", "-d", "-i", str(key), str(path)], capture_output=True, timeout=60)


def test_round_trip_on_the_lab(lab3, starvault, tmp_path):  # noqa: F811
    pub, key = keypair("age-ops")
    inv = inventory_with(lab3, [pub])
    put_keys(lab3, "/registry/pods/p", 200)
    expected = keys_on(lab3, "etcd1")
    store = tmp_path / "nfs"
    store.mkdir()
    before = time.time()
    result = backup_master_nodes(inventory=inv, store=str(store), starvault_block=starvault,
                                 encrypt_etcd_snapshot=True)
    names = sorted(os.listdir(store))
    sealed = [n for n in names if n.endswith(".age")]
    assert len(sealed) == 5 and [n for n in names if n not in sealed] == [result["manifest"]]
    assert {oct((store / n).stat().st_mode & 0o777) for n in names} == {"0o600"}
    # the standard age command opens a node archive and tar lists it: the seed's commands work after `age -d`
    node = next(store.glob("*_kubereresources_*.tar.gz.age"))
    out = age_decrypt(node, key)
    assert out.returncode == 0, out.stderr
    listing = subprocess.run(["tar", "-tzf", "-"], input=out.stdout, capture_output=True, check=True).stdout.decode()
    assert "etc/starvault/unseal-tokens" in listing
    assert b"PRIVATE KEY" not in node.read_bytes()
    # no plaintext secret anywhere a temporary file could be
    secrets = [b"nova-lab-unseal-share-", b"PRIVATE KEY-----"]  # what the lab's masters hold
    for where in (Path(tempfile.gettempdir()), store, Path(os.environ["NOVA_DR_HOME"])):
        # os.walk, not rglob: it skips a folder that another process removes during the walk
        for f in (Path(d, n) for d, _, names in os.walk(where) for n in names):
            try:
                if not (f.is_file() and ROOT not in f.parents and f.stat().st_mtime >= before - 1 and "lab-" not in str(f)):
                    continue
                data = f.read_bytes()
            except (FileNotFoundError, PermissionError):
                continue  # another process's temp file, gone during the walk
            assert not any(s in data for s in secrets if s), f"plaintext secret in {f}"
    # restore from the store: the snapshot decrypts with the identity block
    put_keys(lab3, "/later/k", 20)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd3", "wipe")
    state = restore_etcd_cluster(inventory=inv, store=str(store), backup="latest", identity_block="age-ops",
                                 auto_approve=True, return_state=True)
    assert state.is_completed(), error_of(state)
    assert_restored(lab3, expected)
    # verify-backups opens the set too, and says it is encrypted
    checks = {c["name"]: c for c in verify_backups(inventory=inv, store=str(store), identity_block="age-ops")["checks"]}
    assert checks["encryption"]["status"] == "pass" and checks["integrity"]["status"] == "pass"


def test_wrong_identity_flipped_byte_and_rekey(lab3, starvault, tmp_path):  # noqa: F811
    pub, key = keypair("age-old")
    inv = inventory_with(lab3, [pub])
    store = tmp_path / "nfs"
    store.mkdir()
    backup_master_nodes(inventory=inv, store=str(store), starvault_block=starvault, encrypt_etcd_snapshot=True)
    keypair("age-stranger")
    lab3.break_member("etcd2", "stop")
    lab3.break_member("etcd3", "stop")
    before = fingerprint(lab3)
    err = error_of(restore_etcd_cluster(inventory=inv, store=str(store), identity_block="age-stranger",
                                        auto_approve=True, return_state=True))
    assert "cannot decrypt (no identity in the block opens it" in err and "etcd_snapshot" in err
    assert fingerprint(lab3) == before
    err = error_of(restore_etcd_cluster(inventory=inv, store=str(store), auto_approve=True, return_state=True))
    assert "the set is encrypted: pass identity_block" in err

    # re-key to a new recipient with the CLI: the old identity no longer opens the set, the new one does
    new_pub, new_key = keypair("age-new")
    cli = Path(sys.executable).parent / "nova-dr"
    rekey = [str(cli), "backups", "rekey", "--store", str(store), "--to", new_pub, "--identity-block", "age-old",
             "--inventory", inv]
    p = subprocess.run(rekey, capture_output=True, text=True, timeout=300)  # a signed set, no key to re-sign it
    assert p.returncode == 1 and "pass --signing-block" in p.stderr and age_decrypt(
        next(store.glob("*_kubereresources_*.tar.gz.age")), key).returncode == 0, p.stderr
    p = subprocess.run(rekey + ["--signing-block", signer()[0]], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "5 file(s) re-keyed to 1 recipient(s)" in p.stdout
    node = next(store.glob("*_kubereresources_*.tar.gz.age"))
    assert age_decrypt(node, key).returncode != 0 and age_decrypt(node, new_key).returncode == 0
    state = verify_backups(inventory=inv, store=str(store), identity_block="age-old", return_state=True)
    assert "cannot decrypt" in error_of(state)
    p = subprocess.run([str(cli), "backups", "fetch", "--store", str(store), "--to", str(tmp_path / "got"),
                        "--identity-block", "age-new", "--inventory", inv], capture_output=True, text=True, timeout=300)
    # the rewritten manifest is signed again
    assert p.returncode == 0 and "signed by SHA256:" in p.stdout and "verified against its manifest" in p.stdout, \
        p.stderr
    assert not list((tmp_path / "got").glob("*.age"))

    # one flipped byte in a ciphertext is caught (against the manifest, and by age's own authentication)
    data = bytearray(node.read_bytes())
    data[len(data) // 2] ^= 0x01
    node.write_bytes(bytes(data))
    err = error_of(verify_backups(inventory=inv, store=str(store), identity_block="age-new", return_state=True))
    assert "integrity" in err
    out = age_decrypt(node, new_key)
    assert out.returncode != 0
    from tasks.crypto import decrypt_file, identities_from_block

    with pytest.raises(Exception, match="damaged or was changed"):
        decrypt_file(node, tmp_path / "x.tar.gz", identities_from_block("age-new"), node.name)
    assert not (tmp_path / "x.tar.gz").exists()


def test_unencrypted_backups_warn_every_time(lab3, tmp_path, monkeypatch):
    monkeypatch.setenv("INCLUDE_STARVAULT_DB_BACKUP", "false")
    put_keys(lab3, "/registry/pods/p", 10)
    inv = str(lab3.dir / "inventory.yaml")
    store = tmp_path / "nfs"
    store.mkdir()
    backup_master_nodes(inventory=inv, store=str(store))
    assert not list(store.glob("*.age"))
    checks = {c["name"]: c for c in verify_backups(inventory=inv, store=str(store))["checks"]}
    assert checks["encryption"]["status"] == "warn" and "unencrypted" in checks["encryption"]["evidence"]
    err = error_of(backup_master_nodes(inventory=inv, store=str(store), recipients=["age1notakey"], return_state=True))
    assert "not an age X25519 public key" in err


def test_history_segments_are_stored_encrypted_and_read_back_checked(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from core.errors import NovaDRError
    from core.history import encode_segment, parse_watch
    from core.signing import public_line, seal_segment
    from tasks.crypto import EncryptingStore, recipients_from
    from tasks.history_store import HistoryStore
    from tasks.storage import DirectoryStore

    pub, _ = keypair("nova-dr-test-history")
    key = Ed25519PrivateKey.generate()
    revs = list(parse_watch((Path(__file__).parent / "captured" / "watch_json.txt").read_text().strip(), 1.0).revisions)
    name, data = encode_segment(revs, {}, seal_segment(key))
    HistoryStore(EncryptingStore(DirectoryStore(tmp_path), recipients_from([pub]), {"history"}), []).write(name, data)
    stored = tmp_path / (name + ".age")
    assert os.listdir(tmp_path) == [stored.name] and stored.stat().st_mode & 0o777 == 0o600
    assert stored.read_bytes().startswith(b"age-encryption.org/v1")
    reader = HistoryStore(DirectoryStore(tmp_path), [public_line(key)], identity_block="nova-dr-test-history")
    assert reader.names() == [stored.name] and reader.load(stored.name).revisions == revs
    with pytest.raises(NovaDRError, match="pass identity_block"):
        HistoryStore(DirectoryStore(tmp_path), [public_line(key)]).load(stored.name)
