"""Reading backup sets back from a store: listing, fetching, checking. Used by every reader
(`nova-dr backups`, restore-etcd-cluster's store source, verify-backups)."""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path

from core.errors import NovaDRError
from core.signing import NO_MANIFEST, Opened, accept, matches_set, open_manifest
from core.sets import BackupSet, choose_set, dated_ahead, read_sets
from core.snapshot import scan_archive, sha256_file
from tasks.storage import BackupStore


def read_manifest(store: BackupStore, s: BackupSet, trusted: list[str] | None = None) -> Opened | None:
    """The set's manifest, parsed and its signature checked against `trusted` (None: no manifest)."""
    if not s.manifest:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        store.get(s.manifest, Path(tmp) / s.manifest)
        return open_manifest((Path(tmp) / s.manifest).read_bytes(), s.manifest, trusted or [])


def set_masters(s: BackupSet, manifest: dict | None, inventory_names: list[str] | None) -> list[str]:
    """Whose archives a complete set must hold: the inventory's masters, else the manifest's."""
    if inventory_names:
        return inventory_names
    return list((manifest or {}).get("masters") or s.nodes)  # check_doc made it a list of names


def find_set(store: BackupStore, which: str, archive_names: list[str], require_starvault: bool) -> BackupSet:
    sets, _ = read_sets(store.list())
    return choose_set(sets, which, archive_names, require_starvault)


LOOK_BACK = 20  # complete sets whose manifests `latest` reads, newest first, for a trusted one


def newest_trusted(store: BackupStore, which: str, archive_names: list[str], trusted: list[str],
                   allow_unsigned: bool) -> tuple[BackupSet, list[str]]:
    """The set to read, and the newer sets passed over on the way. `latest` means the newest
    complete set a trusted key signed: a set planted in the store (or the daemon's, unsigned)
    must neither be restored nor stand in the way of last night's. With allow_unsigned, or
    no trusted key, or a named set, the choice is choose_set's; fetch_set then decides."""
    sets, _ = read_sets(store.list())
    chosen = choose_set(sets, which, archive_names, False)
    if which != "latest" or allow_unsigned or not trusted:
        return chosen, []
    ahead = dated_ahead(sets, datetime.now(timezone.utc))
    passed = []
    for s in [x for x in sets if x not in ahead and x.complete(archive_names, False)][:LOOK_BACK]:
        try:
            opened = read_manifest(store, s, trusted)
            problem = NO_MANIFEST if opened is None else opened.problem
        except NovaDRError as err:
            problem = str(err)
        if problem is None:
            return s, passed
        passed.append(f"{s.ts} ({problem})")
    raise NovaDRError(f"no complete backup set in {store.url} is signed by a trusted key (of the newest "
                      f"{len(passed)}: {'; '.join(passed[:5])}). If you know where one came from, name it with "
                      "backup=TIMESTAMP and pass allow_unsigned=true; nothing was changed")


def passed_note(passed: list[str]) -> str:
    return ("newer sets passed over, no trusted key signed them (planted, made by the daemon, or by a backup "
            "killed before its manifest): " + "; ".join(passed[:5]) + ("; ..." if len(passed) > 5 else ""))


def fetch_set(store: BackupStore, s: BackupSet, dest: str | Path, names: list[str] | None = None,
              identity_block: str | None = None, trusted: list[str] | None = None,
              allow_unsigned: bool = False) -> dict:
    """Download a set's files (or the named ones) into `dest` and check them. First the
    manifest: a set that no trusted key signed is refused before anything else is read, unless
    allow_unsigned. Then every sha256 against the manifest when there is one (of the ciphertext
    as stored, then of the plaintext once decrypted); every gzip tar read to its end either way.
    `files` are the plain names."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    opened = None
    try:
        if s.manifest:
            store.get(s.manifest, dest / s.manifest)
            opened = open_manifest((dest / s.manifest).read_bytes(), s.manifest, trusted or [])
        warning = accept(s.ts, store.url, opened, allow_unsigned)
    except NovaDRError:
        if s.manifest:  # nothing of a refused set stays behind
            (dest / s.manifest).unlink(missing_ok=True)
        raise
    manifest = opened.doc if opened else None
    problems = matches_set(manifest, s.ts, s.nova_version, s.manifest) if manifest else []
    wanted = names or s.files
    for name in sorted(set(wanted) - {s.manifest}):
        store.get(name, dest / name)
    problems += check_files(wanted, dest, manifest)
    plain = wanted
    if not problems:
        plain = decrypt_files(wanted, dest, identity_block)
        problems = check_files([n for n in plain if n not in wanted], dest, manifest)
    return {"set": s.ts, "files": plain, "verified": manifest is not None and not problems, "problems": problems,
            "manifest": manifest, "encrypted": [n for n in wanted if n.endswith(".age")],
            "origin": warning or f"signed by {opened.signer}", "signed_by": opened.signer if opened else None}


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
