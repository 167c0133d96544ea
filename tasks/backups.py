"""Reading backup sets back from a store: listing, fetching, checking. Used by every reader
(`nova-dr backups`, restore-etcd-cluster's store source, verify-backups)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from core.errors import NovaDRError
from core.sets import BackupSet, choose_set, read_sets
from core.snapshot import scan_archive, sha256_file
from tasks.storage import BackupStore


def read_manifest(store: BackupStore, s: BackupSet) -> dict | None:
    if not s.manifest:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        store.get(s.manifest, Path(tmp) / s.manifest)
        try:
            return json.loads((Path(tmp) / s.manifest).read_text())
        except ValueError:
            raise NovaDRError(f"{s.manifest}: not valid JSON; the set {s.ts} cannot be verified") from None


def set_masters(s: BackupSet, manifest: dict | None, inventory_names: list[str] | None) -> list[str]:
    """Whose archives a complete set must hold: the inventory's masters, else the manifest's."""
    if inventory_names:
        return inventory_names
    return list((manifest or {}).get("masters") or s.nodes)


def find_set(store: BackupStore, which: str, archive_names: list[str], require_starvault: bool) -> BackupSet:
    sets, _ = read_sets(store.list())
    return choose_set(sets, which, archive_names, require_starvault)


def fetch_set(store: BackupStore, s: BackupSet, dest: str | Path, names: list[str] | None = None,
              identity_block: str | None = None) -> dict:
    """Download a set's files (or the named ones) into `dest` and check them: every sha256
    against the manifest when there is one (of the ciphertext as stored, then of the plaintext
    once decrypted); every gzip tar read to its end either way. `files` are the plain names."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = names or s.files
    for name in sorted(set(wanted) | ({s.manifest} if s.manifest else set())):
        store.get(name, dest / name)
    manifest = json.loads((dest / s.manifest).read_text()) if s.manifest else None
    problems = check_files(wanted, dest, manifest)
    plain = wanted
    if not problems:
        plain = decrypt_files(wanted, dest, identity_block)
        problems = check_files([n for n in plain if n not in wanted], dest, manifest)
    return {"set": s.ts, "files": plain, "verified": manifest is not None and not problems, "problems": problems,
            "manifest": manifest, "encrypted": [n for n in wanted if n.endswith(".age")]}


def decrypt_files(names: list[str], folder: Path, identity_block: str | None) -> list[str]:
    """Each .age file decrypted beside itself (then removed); the names after."""
    from core.names import plain_name
    from tasks.crypto import decrypt_file, identities_from_block

    sealed = [n for n in names if n.endswith(".age")]
    if not sealed:
        return names
    ids = identities_from_block(identity_block)
    for n in sealed:
        decrypt_file(folder / n, folder / plain_name(n), ids, n)
        (folder / n).unlink()
    return [plain_name(n) for n in names]


def check_files(names: list[str], folder: Path, manifest: dict | None) -> list[str]:
    """Every sha256 against the manifest (when there is one); every gzip tar read to its end
    with no member escaping. Returns the problems found."""
    problems = []
    for name in names:
        if manifest is not None and not name.startswith("nova-dr-manifest_"):
            files = manifest.get("files", {})
            entry, want = files.get(name), "sha256"
            if entry is None and name + ".age" in files:  # decrypted: the plaintext's digest
                entry, want = files[name + ".age"], "plain_sha256"
            if entry is None or want not in entry:
                problems.append(f"{name}: not in the manifest")
            elif sha256_file(folder / name) not in (entry[want], entry.get("previous_" + want)):  # mid-rekey
                problems.append(f"{name}: sha256 differs from the manifest"
                                + (" (after decryption)" if want == "plain_sha256" else ""))
        if name.endswith(".tar.gz"):
            try:
                scan_archive(folder / name)
            except NovaDRError as err:
                problems.append(str(err))
    return problems
