"""A malicious backup store: sets that no trusted key signed are refused by every reader
before anything on a master changes, unless the operator accepts them by name."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from core.errors import NovaDRError
from core.names import parse_timestamp, timestamp
from core.signing import check_doc, fingerprint, open_manifest, private_key, public_key, sign
from flows.restore import plan_restore, restore_etcd_cluster
from flows.verify import verify_backups
from tests.helpers import signer
from tests.test_cli import CLI
from tests.test_restore import error_of, fingerprint as lab_fingerprint
from tests.test_verify import base, case  # noqa: F401  (the fixtures: one lab, one good set, signed)


def _keypair(path: Path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "intruder", "-f", str(path)], check=True)
    return private_key(path.read_text(), None, "test"), Path(f"{path}.pub").read_text().strip()


DOC = {"format": 1, "timestamp": "2026-01-01_040000", "nova_version": "6.0.1", "masters": ["a"],
       "files": {"f.tar.gz": {"sha256": "a" * 64, "size": 3}}, "etcd_snapshot": {"status": {"revision": 7}}}


# -- pure: the envelope and the document ---------------------------------------------------
def test_a_signature_proves_the_signer_and_the_bytes(tmp_path):
    key, pub = _keypair(tmp_path / "k")
    other, other_pub = _keypair(tmp_path / "o")
    body = json.dumps(DOC).encode()
    signed = sign(body, key)
    ok = open_manifest(signed, "m.json", [pub])
    assert ok.problem is None and ok.doc == DOC and ok.signer == fingerprint(public_key(pub))
    # ssh-keygen prints the same fingerprint
    shown = subprocess.run(["ssh-keygen", "-l", "-f", f"{tmp_path / 'k'}.pub"], capture_output=True, text=True).stdout
    assert ok.signer in shown
    assert "not one of the inventory's backup_signers" in open_manifest(signed, "m.json", [other_pub]).problem
    assert open_manifest(body, "m.json", [pub]).problem == "its manifest is unsigned"
    # the body changed after signing, the signature kept
    env = json.loads(signed)
    env["manifest"] = env["manifest"].replace('"size": 3', '"size": 4')
    assert "does not match" in open_manifest(json.dumps(env).encode(), "m.json", [pub]).problem
    # an intruder's own key, named as the signer, over a body of theirs
    forged = sign(json.dumps(DOC).encode(), other)
    assert open_manifest(forged, "m.json", [pub]).signer is None


@pytest.mark.parametrize("change, field", [
    ({"files": ["x"]}, "files"),
    ({"files": {"f": {"sha256": 5}}}, "files['f'].sha256"),
    ({"files": {"f": {"sha256": "A" * 64}}}, "files['f'].sha256"),
    ({"files": {"f": {"size": "3"}}}, "files['f'].size"),
    ({"masters": "a"}, "masters"),
    ({"settings": []}, "settings"),
    ({"timestamp": 20260101}, "timestamp"),
    ({"etcd_snapshot": {"status": {"revision": "7"}}}, "etcd_snapshot.status.revision"),
])
def test_a_manifest_with_a_wrong_type_is_refused_by_name(change, field):
    with pytest.raises(NovaDRError, match=re.escape(f"m.json: field {field} must be")):
        check_doc({**DOC, **change}, "m.json")


def test_a_signer_that_is_not_an_ed25519_key_is_a_clear_error():
    for bad in ("ssh-rsa AAAAB3NzaC1yc2E", "age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs", ""):
        with pytest.raises(NovaDRError, match="not an Ed25519 public key"):
            public_key(bad)


# -- a store an intruder can write ------------------------------------------------------------
def _later(ts: str) -> str:
    """A minute after the real set: the intruder's set is the newest, `latest`."""
    return timestamp(parse_timestamp(ts) + timedelta(minutes=1))


def _plant(store: Path, ts: str, new_ts: str, manifest=None) -> None:
    """A complete set of the intruder's, newer than every real one: the real files under new
    names (their content could be anything), and a manifest the intruder wrote (made by
    `manifest()` once the files are there)."""
    for f in store.iterdir():
        if ts in f.name and not f.name.startswith("nova-dr-manifest_"):
            shutil.copy(f, store / f.name.replace(ts, new_ts))
    if manifest is not None:
        (store / f"nova-dr-manifest_{new_ts}.json").write_bytes(manifest())


def _their_manifest(store: Path, ts: str, new_ts: str) -> dict:
    real = json.loads((store / f"nova-dr-manifest_{ts}.json").read_text())
    doc = json.loads(real["manifest"])
    doc["timestamp"] = new_ts
    doc["files"] = {n.replace(ts, new_ts): {**e, "sha256": hashlib.sha256((store / n.replace(ts, new_ts)).read_bytes())
                                            .hexdigest()} for n, e in doc["files"].items()}
    return doc


def _refused_everywhere(lab, store: Path, says: str, refused: str, good: str | None = None) -> None:
    """restore-etcd-cluster and `backups fetch` refuse the set `refused` when it is named,
    verify-backups fails on it when it is the newest, and no master changed. `latest` passes it
    over for `good`, the newest set a trusted key signed, and says so (None: there is none)."""
    before = lab_fingerprint(lab)
    inv = str(lab.dir / "inventory.yaml")
    msg = error_of(restore_etcd_cluster(inventory=inv, store=str(store), backup=refused, auto_approve=True,
                                        return_state=True))
    assert says in msg and "allow_unsigned=true" in msg and "Nothing was changed" in msg, msg
    # (no StarVault in these sets: a set without a manifest must then not need one to be `latest`)
    msg = error_of(verify_backups(inventory=inv, store=str(store), INCLUDE_STARVAULT_DB_BACKUP=False,
                                  return_state=True))
    assert "origin failed" in msg, msg
    fetched = store.parent / "fetched"
    out = subprocess.run([CLI, "backups", "fetch", "--store", str(store), "--inventory", inv, "--backup", refused,
                          "--to", str(fetched)], capture_output=True, text=True)
    assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not any(fetched.glob("*.tar.gz"))  # refused before the files were read
    if good is None:
        msg = error_of(restore_etcd_cluster(inventory=inv, store=str(store), auto_approve=True, return_state=True))
        assert "is signed by a trusted key" in msg and says in msg and "nothing was changed" in msg, msg
    else:
        plan = plan_restore(inventory=inv, store=str(store), backup="latest").text()
        assert f"restoring {good}, the newest set a trusted key signed; newer sets passed over" in plan, plan
        assert f"{refused} (" in plan, plan
        out = subprocess.run([CLI, "backups", "fetch", "--store", str(store), "--inventory", inv, "--to",
                              str(fetched)], capture_output=True, text=True)
        assert out.returncode == 0 and f"fetching {good}" in out.stderr and refused in out.stderr, out.stderr
        assert all(good in f.name for f in fetched.glob("*.tar.gz")) and any(fetched.glob("*.tar.gz"))
    assert lab_fingerprint(lab) == before


def test_a_forged_set_with_its_own_manifest_is_refused(case):  # noqa: F811
    lab, st, ts = case
    new = _later(ts)
    _plant(st, ts, new, lambda: json.dumps(_their_manifest(st, ts, new)).encode())
    _refused_everywhere(lab, st, f"backup set {new}", new, ts)
    assert "its manifest is unsigned" in error_of(verify_backups(inventory=str(lab.dir / "inventory.yaml"),
                                                                  store=str(st), return_state=True))


def test_a_set_re_signed_by_an_unknown_key_is_refused(case, tmp_path):  # noqa: F811
    lab, st, ts = case
    theirs, _ = _keypair(tmp_path / "intruder")
    new = _later(ts)
    _plant(st, ts, new, lambda: sign(json.dumps(_their_manifest(st, ts, new)).encode(), theirs))
    _refused_everywhere(lab, st, "which is not one of the inventory's backup_signers", new, ts)


def test_a_signed_manifest_changed_after_signing_is_refused(case):  # noqa: F811
    lab, st, ts = case
    mf = st / f"nova-dr-manifest_{ts}.json"
    env = json.loads(mf.read_text())
    doc = json.loads(env["manifest"])
    doc["masters"] = doc["masters"][:1]  # fewer masters: a set that looks complete with less
    env["manifest"] = json.dumps(doc)
    mf.write_text(json.dumps(env))
    _refused_everywhere(lab, st, "does not match: the manifest was changed after signing", ts)


def test_a_manifest_of_wrong_types_is_refused_with_its_name(case):  # noqa: F811
    lab, st, ts = case
    new = _later(ts)

    def wrong():
        doc = _their_manifest(st, ts, new)
        doc["files"] = list(doc["files"])
        return json.dumps(doc).encode()

    _plant(st, ts, new, wrong)
    before = lab_fingerprint(lab)
    msg = error_of(restore_etcd_cluster(inventory=str(lab.dir / "inventory.yaml"), store=str(st), backup=new,
                                        auto_approve=True, return_state=True))
    assert f"nova-dr-manifest_{new}.json: field files must be" in msg, msg
    plan = plan_restore(inventory=str(lab.dir / "inventory.yaml"), store=str(st), backup="latest").text()
    assert f"restoring {ts}" in plan and f"{new} (nova-dr-manifest_{new}.json: field files must be" in plan, plan
    assert lab_fingerprint(lab) == before


def test_a_set_of_the_daemon_needs_allow_unsigned_and_the_plan_says_so(case):  # noqa: F811
    lab, st, ts = case
    new = _later(ts)
    _plant(st, ts, new, None)  # no manifest at all: the platform's daemon makes such sets
    _refused_everywhere(lab, st, "its origin is not verified", new, ts)
    plan = plan_restore(inventory=str(lab.dir / "inventory.yaml"), store=str(st), backup="latest",
                        allow_unsigned="true")
    assert f"backup set {new}: it has no manifest, so its origin is not verified" in plan.text()
    assert "accepted only because allow_unsigned=true" in plan.text()
    state = verify_backups(inventory=str(lab.dir / "inventory.yaml"), store=str(st), allow_unsigned=True,
                           INCLUDE_STARVAULT_DB_BACKUP=False, return_state=True)
    assert state.is_completed(), error_of(state)
    assert next(c for c in state.result()["checks"] if c["name"] == "origin")["status"] == "warn"


def test_the_signed_set_passes_and_says_who_signed_it(case):  # noqa: F811
    lab, st, ts = case
    state = verify_backups(inventory=str(lab.dir / "inventory.yaml"), store=str(st), return_state=True)
    assert state.is_completed(), error_of(state)
    origin = next(c for c in state.result()["checks"] if c["name"] == "origin")
    assert origin["status"] == "pass" and fingerprint(public_key(signer()[1])) in origin["evidence"]
    out = subprocess.run([CLI, "backups", "list", "--store", str(st), "--inventory", str(lab.dir / "inventory.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "signed, trusted" in out.stdout, out.stdout + out.stderr
