"""Re-encrypt stored sets to new recipients (after a key leak or a team change).

Per set: every encrypted file is fetched, decrypted and re-encrypted in one stream (the
plaintext never touches a disk) into a staged copy, which is checked: its plaintext digest
matches the manifest's, and its header names exactly the new recipients. Only when every file
of the set is staged and checked are the old files replaced, one atomic put each. Meanwhile
the manifest lists both the old and the new digest of each file, so that a reader at any
moment (or after a crash) finds every file valid; a re-run finishes the set."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from core.errors import NovaDRError
from core.sets import BackupSet, read_sets
from core.snapshot import sha256_file
from core.signing import accept, public_line, sign
from tasks.backups import read_manifest
from tasks.crypto import Encrypting
from tasks.scratch import scratch_dir


def header_recipients(path: Path) -> int:
    """How many X25519 recipient stanzas an age file's header holds."""
    n = 0
    with open(path, "rb") as f:
        if f.readline().strip() != b"age-encryption.org/v1":
            raise NovaDRError(f"{path.name}: not an age file")
        for line in f:
            if line.startswith(b"---"):
                return n
            n += line.startswith(b"-> X25519 ")
    raise NovaDRError(f"{path.name}: the age header does not end")


def _reencrypt(src: Path, dest: Path, identities: list, recipients: list, label: str) -> str:
    import pyrage

    with open(src, "rb") as inp, open(dest, "wb") as out:
        enc = Encrypting(out, recipients)
        try:
            pyrage.decrypt_io(inp, enc, identities)
        except (pyrage.DecryptError, OSError, ValueError) as err:
            try:
                enc.close()
            except NovaDRError:
                pass
            raise NovaDRError(f"{label}: cannot decrypt with the identity given ({err}); the set was not changed") \
                from None
        enc.close()
    dest.chmod(0o600)
    return enc.plain.hexdigest()


def _put_file(store, name: str, path: Path) -> str:
    def write(out):
        with open(path, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)

    return store.put(name, write, mode=0o600)[1]


def _put_manifest(store, name: str, doc: dict, signer) -> None:
    body = json.dumps(doc, indent=1, sort_keys=True).encode()
    if signer is not None:
        body = sign(body, signer)
    store.put(name, lambda out: out.write(body), mode=0o600)


def rekey_set(store, s: BackupSet, identities: list, recipients: list, signer=None, trusted: list[str] | None = None,
              allow_unsigned: bool = False) -> list[str]:
    """Re-key one set; returns the files re-keyed. Its manifest is rewritten, so it must be one a
    trusted key signed (re-signing it would launder a planted one), and it is signed again."""
    opened = read_manifest(store, s, [*(trusted or []), *([public_line(signer)] if signer else [])])
    accept(s.ts, store.url, opened, allow_unsigned)
    if opened and opened.signer and signer is None:
        raise NovaDRError(f"set {s.ts}: its manifest is signed; pass --signing-block so that the rewritten one is "
                          "signed too. Nothing was changed")
    manifest = opened.doc if opened else None
    files = (manifest or {}).get("files", {})
    with scratch_dir("nova-dr-rekey-") as tmp:
        work = Path(tmp)
        staged: dict[str, tuple[Path, str]] = {}
        for name in s.encrypted:  # 1. stage and check every file; nothing in the store changes yet
            store.get(name, work / name)
            entry = files.get(name)
            if entry and sha256_file(work / name) not in (entry["sha256"], entry.get("previous_sha256")):
                raise NovaDRError(f"set {s.ts}: {name} does not match its manifest; the set was not re-keyed")
            new = work / (name + ".new")
            plain = _reencrypt(work / name, new, identities, recipients, f"set {s.ts}: {name}")
            if entry and entry.get("plain_sha256") not in (None, plain):
                raise NovaDRError(f"set {s.ts}: {name} decrypts to other bytes than the manifest records; not re-keyed")
            if header_recipients(new) != len(recipients):
                raise NovaDRError(f"set {s.ts}: {name}: the new file does not name the {len(recipients)} recipients")
            staged[name] = (new, sha256_file(new))
            (work / name).unlink()
        if not staged:
            return []
        if manifest:  # 2. readers accept the old and the new file from here on
            for name, (_, sha) in staged.items():
                files[name]["previous_sha256"] = files[name]["sha256"]
                files[name]["sha256"] = sha
            _put_manifest(store, s.manifest, manifest, signer)
        for name, (path, sha) in staged.items():  # 3. one atomic replacement per file, checked
            if _put_file(store, name, path) != sha:
                raise NovaDRError(f"set {s.ts}: {name} was not stored intact; run rekey again")
        if manifest:  # 4. only the new files are valid now
            for name in staged:
                files[name].pop("previous_sha256", None)
                files[name]["size"] = staged[name][0].stat().st_size
            manifest["encrypted_to"] = len(recipients)
            manifest["rekeyed"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            _put_manifest(store, s.manifest, manifest, signer)
    return sorted(staged)


def rekey_store(store, identities: list, recipients: list, which: str = "all", signer=None,
                trusted: list[str] | None = None, allow_unsigned: bool = False) -> dict[str, list[str]]:
    sets, _ = read_sets(store.list())
    chosen = [s for s in sets if which in ("all", s.ts)]
    if not chosen:
        raise NovaDRError(f"no backup set {which!r} in {store.url}")
    return {s.ts: rekey_set(store, s, identities, recipients, signer, trusted, allow_unsigned) for s in chosen}
