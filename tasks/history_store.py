"""The cluster's history in its backup store: segments written as the capture cuts them
(encrypted to the inventory's recipients and signed with its signing key, as a set's files
are) and read back, checked, for a restore to a point; and the full snapshots, the backup
sets, that a history continues."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import NovaDRError
from core.history import Revision, Segment, decode_segment, parse_segment_name
from core.names import plain_name
from core.sets import BackupSet, read_sets
from core.signing import segment_problem
from tasks.backups import read_manifest
from tasks.storage import BackupStore


@dataclass(frozen=True)
class Base:
    """A full snapshot a history can start from: its set, the revision of the history whose
    keyspace it holds, the time by which that revision had been reached (None: a set written
    before nova-dr recorded it), and its file's own revision. The two revisions differ for a
    snapshot compact-history folded: its history was replayed in fewer txns than revisions."""

    set: BackupSet
    revision: int
    at: float | None
    file_revision: int = 0

    def __post_init__(self):
        if not self.file_revision:
            object.__setattr__(self, "file_revision", self.revision)


class HistoryStore:
    def __init__(self, store: BackupStore, trusted: list[str], allow_unsigned: bool = False,
                 identity_block: str | None = None):
        self.store, self.trusted, self.allow_unsigned = store, trusted, allow_unsigned
        self.identity_block = identity_block
        self._ids = None
        self._loaded: dict[str, Segment] = {}

    def names(self) -> list[str]:
        return sorted(f.name for f in self.store.list() if parse_segment_name(f.name))

    def write(self, name: str, data: bytes) -> None:
        self.store.put(name, lambda out: out.write(data), mode=0o600)

    def read(self, name: str) -> bytes:
        """A stored segment's bytes, decrypted; not yet checked (decode_segment, fold_chunk do)."""
        with tempfile.TemporaryDirectory(prefix="nova-dr-seg-") as tmp:
            path = Path(tmp) / name
            self.store.get(name, path)
            if name.endswith(".age"):
                from tasks.crypto import decrypt_file, identities_from_block

                if self._ids is None:
                    self._ids = identities_from_block(self.identity_block)
                decrypt_file(path, Path(tmp) / plain_name(name), self._ids, name)
                path = Path(tmp) / plain_name(name)
            return path.read_bytes()

    def load(self, name: str) -> Segment:
        """A stored segment, decrypted and checked (name, digest, signature)."""
        if name in self._loaded:  # the one read last: a point's segment is read to plan, then to fold
            return self._loaded[name]
        seg = decode_segment(name, self.read(name), lambda n, d, t: segment_problem(n, d, t, self.trusted),
                             self.allow_unsigned)
        self._loaded = {name: seg}  # never the whole history: an hour of it is millions of revisions
        return seg

    def revisions(self, name: str) -> list[Revision]:
        return self.load(name).revisions


def full_snapshots(store: BackupStore, trusted: list[str], allow_unsigned: bool = False) -> tuple[list[Base], list[str]]:
    """The sets a history may start from, oldest first: each one's manifest, signed by a
    trusted key (or accepted with allow_unsigned), says its snapshot file's own revision. And
    why each other set was left out."""
    sets, _ = read_sets(store.list())
    out, left = [], []
    for s in reversed(sets):  # oldest first
        try:
            opened = read_manifest(store, s, trusted)
        except NovaDRError as err:
            left.append(f"{s.ts}: {err}")
            continue
        if opened is None or (opened.problem and not allow_unsigned):
            left.append(f"{s.ts}: {'it has no manifest' if opened is None else opened.problem}")
            continue
        snap = opened.doc.get("etcd_snapshot", {})
        rev = snap.get("status", {}).get("revision")
        if not rev:
            left.append(f"{s.ts}: its manifest records no snapshot revision")
            continue
        out.append(Base(s, snap.get("history_revision") or rev, snap.get("saved_at"), rev))
    return out, left
