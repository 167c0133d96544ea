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


def fetch_set(store: BackupStore, s: BackupSet, dest: str | Path, names: list[str] | None = None) -> dict:
    """Download a set's files (or the named ones) into `dest` and check them: every sha256
    against the manifest when there is one; every gzip tar read to its end either way."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = names or s.files
    for name in sorted(set(wanted) | ({s.manifest} if s.manifest else set())):
        store.get(name, dest / name)
    manifest = json.loads((dest / s.manifest).read_text()) if s.manifest else None
    problems = check_files(wanted, dest, manifest)
    return {"set": s.ts, "files": wanted, "verified": manifest is not None and not problems, "problems": problems,
            "manifest": manifest}


def check_files(names: list[str], folder: Path, manifest: dict | None) -> list[str]:
    """Every sha256 against the manifest (when there is one); every gzip tar read to its end
    with no member escaping. Returns the problems found."""
    problems = []
    for name in names:
        if manifest is not None and not name.startswith("nova-dr-manifest_"):
            entry = manifest.get("files", {}).get(name)
            if entry is None:
                problems.append(f"{name}: not in the manifest")
            elif sha256_file(folder / name) != entry["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
        if name.endswith(".tar.gz"):
            try:
                scan_archive(folder / name)
            except NovaDRError as err:
                problems.append(str(err))
    return problems
