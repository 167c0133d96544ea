"""Checks of an etcd snapshot file made before anything on a master is stopped. No network."""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
from contextlib import contextmanager
from typing import Iterator
from zlib import error as zlib_error

from isal import igzip
from isal.igzip_lib import IsalError
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from core.errors import NovaDRError, SnapshotError, UnsafeArchive
from core.names import parse_name

HASH_LEN = 32  # `snapshot save` appends sha256(db) to the bolt file
# What reading a damaged archive raises: tar's, gzip's (zlib's or isal's) and the OS's errors.
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib_error, IsalError)


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while True:
            n = 1 << 20 if remaining is None else min(1 << 20, remaining)
            if n == 0:
                break
            chunk = f.read(n)
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


def db_digest(path: str | Path) -> tuple[str, str]:
    """(trailer, sha256 of the whole file) in one read: trailer is 'ok', 'missing' (a db copied
    from a data dir) or 'mismatch' (corrupt).

    Mirrors etcd's own check: a saved snapshot is a whole number of 512-byte pages plus a
    32-byte sha256 of everything before it. The whole file's sha256 continues that hash with
    the trailer, so a multi-GB snapshot is read and hashed once, not twice."""
    size = Path(path).stat().st_size
    if size % 512 != HASH_LEN:
        return "missing", sha256_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size - HASH_LEN
        while remaining > 0 and (chunk := f.read(min(1 << 20, remaining))):
            h.update(chunk)
            remaining -= len(chunk)
        trailer = f.read(HASH_LEN)
    whole = h.copy()
    whole.update(trailer)
    return ("ok" if h.digest() == trailer else "mismatch"), whole.hexdigest()


def check_member_path(name: str) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not name.strip("./"):
        raise UnsafeArchive(f"archive member {name!r} would land outside the extraction folder; refusing the archive")


def check_link(m: tarfile.TarInfo) -> None:
    if m.issym() or m.islnk():
        base = posixpath.dirname(m.name) if m.issym() else ""
        target = posixpath.normpath(posixpath.join(base, m.linkname))
        if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
            raise UnsafeArchive(f"archive member {m.name!r} links to {m.linkname!r}, outside the folder; refusing")


# What the orchestrator will unpack from one archive read back from a store. etcd's database
# is at most 8 GiB (its largest quota); a master's archive holds hundreds of files. Beyond
# these, an archive is a bomb (a gzip of zeros, a tar of a million members), not a backup.
MAX_UNPACKED_BYTES = 16 << 30
MAX_MEMBERS = 100_000


class _Bound:
    def __init__(self, label: str, max_bytes: int, max_members: int):
        self.label, self.max_bytes, self.max_members = label, max_bytes, max_members
        self.bytes = self.members = 0

    def add(self, nbytes: int = 0, members: int = 0) -> None:
        self.bytes += nbytes
        self.members += members
        if self.bytes > self.max_bytes:
            raise UnsafeArchive(f"{self.label}: unpacks to more than {self.max_bytes >> 20} MiB; refusing the archive "
                                "(no backup of a master is that large: a gzip bomb?)")
        if self.members > self.max_members:
            raise UnsafeArchive(f"{self.label}: holds more than {self.max_members} members; refusing the archive "
                                "(no backup of a master has that many)")


@contextmanager
def _open_tar(path: str | Path) -> Iterator[tarfile.TarFile]:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if not gz:
        with tarfile.open(path, "r:*") as tar:
            yield tar
        return
    with igzip.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        yield tar


def safe_extract(archive: str | Path, dest: str | Path, max_bytes: int = MAX_UNPACKED_BYTES,
                 max_members: int = MAX_MEMBERS) -> list[Path]:
    """Extract a tar(.gz), refusing absolute paths, `..`, links that point out, devices, and
    more bytes or members than any backup holds (checked from the headers, before a byte is
    written). Returns the files extracted."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    bound = _Bound(Path(archive).name, max_bytes, max_members)
    try:
        # isal's gzip: the two passes below (headers, then files) decompress at ~700 MB/s, not
        # zlib's ~250 (a 1 GB snapshot's archive was seconds of the restore's preparation).
        with _open_tar(archive) as tar:
            members = []
            for m in tar:  # not getmembers(): a million members must not all be read first
                bound.add(m.size if m.isfile() else 0, 1)
                # `tar cf - -C dir .` starts with the folder itself ("./"): nothing to extract
                if not (m.isdir() and m.name.strip("/") in (".", "")):
                    members.append(m)
            for m in members:
                check_member(m)
            # The 'data' filter is a second guard (and drops setuid bits and ownership).
            tar.extractall(dest, members=members, filter="data")
            return [dest / m.name for m in members if m.isfile()]
    except READ_ERRORS as err:
        raise SnapshotError(f"{archive}: not a readable tar archive ({err}); fetch it again") from None


def check_member(m: tarfile.TarInfo) -> None:
    check_member_path(m.name)
    check_link(m)
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafeArchive(f"archive member {m.name!r} is a device or fifo; refusing the archive")


class _HashingReader:
    """A file read through, hashed as it goes: the archive's sha256 in the pass that unpacks it."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b

    def readinto(self, b) -> int:  # what isal's reader calls
        n = self.f.readinto(b)
        self.h.update(memoryview(b)[:n])
        return n


@dataclass(frozen=True)
class UnpackedDb:
    member: str  # as the archive spells it ("./x.db" or "x.db": what `tar -x NAME` must be given)
    path: Path | None  # where it was written; None when it was only hashed
    size: int
    trailer: str  # ok | missing | mismatch, as db_digest
    sha256: str  # of the .db
    archive_sha256: str


def unpack_db(archive: str | Path, dest: str | Path, write: bool = True, max_bytes: int = MAX_UNPACKED_BYTES,
              max_members: int = MAX_MEMBERS) -> UnpackedDb:
    """The one .db of a snapshot archive, in a single pass over it: the archive's sha256, gzip's
    CRC, the .db's sha256 and its trailer check are computed while it streams, and it is written
    (mode 0600) only when `write`. At 8 GiB, hashing the archive, listing it, extracting it and
    reading the .db back were four passes and 38 s of the restore. Every header is checked, and
    counted against the bounds, before its data is read; nothing but the .db is written."""
    dest = Path(dest)
    bound = _Bound(Path(archive).name, max_bytes, max_members)
    found: list[UnpackedDb] = []
    try:
        with open(archive, "rb") as raw_file:
            raw = _HashingReader(raw_file)
            gz = raw_file.read(2) == b"\x1f\x8b"
            raw_file.seek(0)
            stream = igzip.open(raw, "rb") if gz else raw
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for m in tar:
                    bound.add(m.size if m.isfile() else 0, 1)
                    if m.isdir() and m.name.strip("/") in (".", ""):
                        continue  # `tar cf - -C dir .` starts with the folder itself
                    check_member(m)
                    if m.isfile() and m.name.endswith(".db"):
                        found.append(_stream_db(tar, m, dest, write and not found))
            while stream.read(1 << 20):  # to gzip's CRC, and the whole file into its hash
                pass
            while raw.read(1 << 20):
                pass
    except READ_ERRORS as err:
        _discard(found)
        raise SnapshotError(f"{archive}: not a readable tar archive ({err}); fetch it again") from None
    except UnsafeArchive:
        _discard(found)
        raise
    if len(found) != 1:
        _discard(found)
        raise SnapshotError(f"snapshot {Path(archive).name}: expected one .db inside, found {len(found)}")
    return UnpackedDb(found[0].member, found[0].path, found[0].size, found[0].trailer, found[0].sha256,
                      raw.h.hexdigest())


def _stream_db(tar: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, write: bool) -> UnpackedDb:
    has_trailer = m.size % 512 == HASH_LEN
    body = m.size - HASH_LEN if has_trailer else m.size  # etcd's trailer is the sha256 of the body
    h, tail, done = hashlib.sha256(), b"", 0
    path = dest / PurePosixPath(m.name).name if write else None
    out = None
    if path is not None:
        dest.mkdir(parents=True, exist_ok=True)
        out = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb")
    try:
        src = tar.extractfile(m)
        while chunk := src.read(4 << 20):
            if out is not None:
                out.write(chunk)
            if done + len(chunk) <= body:
                h.update(chunk)
            else:
                cut = max(0, body - done)
                h.update(chunk[:cut])
                tail += chunk[cut:]
            done += len(chunk)
        if done != m.size:
            raise EOFError(f"{m.name}: {done} of {m.size} bytes")
    except BaseException:
        if path is not None:
            path.unlink(missing_ok=True)
        raise
    finally:
        if out is not None:
            out.close()
    whole = h.copy()
    whole.update(tail)
    trailer = ("ok" if h.digest() == tail else "mismatch") if has_trailer else "missing"
    return UnpackedDb(m.name, path, m.size, trailer, whole.hexdigest(), "")


def _discard(found: list[UnpackedDb]) -> None:
    for f in found:
        if f.path is not None:
            f.path.unlink(missing_ok=True)


def unpacked_size(source: str | Path) -> int:
    """The bytes unpacking `source` writes: its first member's size, from the first header
    alone (a nova-dr archive holds the .db only); 0 for a plain .db, which is not unpacked."""
    src = Path(source)
    if not src.name.endswith((".tar.gz", ".tgz", ".tar")):
        return 0
    try:
        with open(src, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = igzip.open if gz else open
        with opener(src, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            first = tar.next()  # pax and GNU long-name headers are read through, the data is not
            return first.size if first is not None else 0
    except (*READ_ERRORS, ValueError):
        return 0  # unreadable: prepare_snapshot says so, in its own words


@dataclass
class SnapshotCheck:
    """What we know of a snapshot before touching the cluster."""

    source: str  # what the operator gave
    db_path: str  # the plain .db on this machine; "" when an archive's .db was not kept
    sha256: str  # of the .db
    size: int
    trailer: str  # ok | missing
    nova_version: str | None  # from the file name; None for a plain `etcdctl snapshot save` output
    k8s_version: str | None
    manifest_checked: bool = False
    # When the source is a tar(.gz) holding the .db: its member name, so the archive itself,
    # about 4x smaller than the .db, can be sent and unpacked on each master.
    archive_member: str | None = None
    warnings: list[str] = field(default_factory=list)


def find_manifest_entry(path: Path) -> dict | None:
    """The entry for `path` in a nova-dr manifest lying next to it, if any."""
    from core.signing import manifest_doc

    for mf in sorted(path.parent.glob("nova-dr-manifest_*.json")):
        try:  # integrity only: the operator chose this file; trust in a store's set is checked on fetch
            files = manifest_doc(mf.read_bytes(), mf.name).get("files", {})
        except (OSError, NovaDRError):
            continue
        if path.name in files:
            return files[path.name]
    return None


def prepare_snapshot(source: str | Path, workdir: str | Path, nova_version: str,
                     allow_version_mismatch: bool = False, keep_db: bool = True) -> SnapshotCheck:
    """Unpack (safely) and check a snapshot: manifest sha256, etcd's hash trailer, version.
    `keep_db=False`: an archive's .db is checked as it streams and not written on this machine
    (the archive itself is what goes to the masters); `db_path` is then empty."""
    src = Path(source)
    if not src.is_file():
        raise SnapshotError(f"snapshot {src}: no such file on this machine; give the path of an "
                            "etcd_snapshot_*.db.tar.gz or a .db")
    warnings = []
    entry = find_manifest_entry(src)
    damaged = SnapshotError(f"snapshot {src.name}: sha256 differs from its manifest; the file is damaged, "
                            "take another backup set")
    if src.name.endswith((".tar.gz", ".tgz", ".tar")):
        db = unpack_db(src, Path(workdir) / "unpacked", write=keep_db)
        if entry is not None and db.archive_sha256 != entry.get("sha256"):
            _discard([db])
            raise damaged
        member, db_path, size, trailer, digest = db.member, db.path, db.size, db.trailer, db.sha256
    else:
        member, db_path, size = None, src, src.stat().st_size
        trailer, digest = db_digest(src)
        if entry is not None and digest != entry.get("sha256"):
            raise damaged
    if trailer == "mismatch":
        raise SnapshotError(f"snapshot {src.name}: its sha256 trailer does not match its content (corrupt); "
                            "nothing was changed, use another backup")
    if trailer == "missing":
        raise SnapshotError(f"snapshot {src.name}: no integrity hash (a db copied from a data dir, or "
                            "truncated); take a snapshot with `etcdctl snapshot save` instead")
    parsed = parse_name(src.name) or parse_name(PurePosixPath(member or src.name).name)
    nova = parsed.nova_version if parsed else None
    k8s = parsed.k8s_version if parsed else None
    if nova is None:
        warnings.append(f"the snapshot's name ({src.name}) carries no Nova version: compatibility with "
                        f"{nova_version} cannot be checked")
    elif nova != nova_version:
        msg = (f"snapshot {src.name} was made by Nova {nova}, the cluster runs {nova_version}: only the "
               "same x.y.Z restores fully")
        if not allow_version_mismatch:
            raise SnapshotError(msg + "; nothing was changed (allow_version_mismatch=true overrides)")
        warnings.append(msg + " (allowed by allow_version_mismatch)")
    return SnapshotCheck(str(src), str(db_path or ""), digest, size, trailer, nova, k8s,
                         manifest_checked=entry is not None, warnings=warnings, archive_member=member)


def scan_archive(path: str | Path, max_bytes: int = MAX_UNPACKED_BYTES, max_members: int = MAX_MEMBERS) -> list[str]:
    """Read a gzip tar to its end (a truncated or corrupt one fails) and check every member's
    path, without extracting anything, within the same bounds as safe_extract. Returns the
    member names."""
    names = []
    bound = _Bound(Path(path).name, max_bytes, max_members)
    try:
        # The whole gzip stream first: tarfile stops at the end-of-archive blocks and never
        # reaches gzip's CRC, so a flipped bit in the data would pass unseen.
        with igzip.open(path, "rb") as gz:
            while chunk := gz.read(1 << 20):
                bound.add(len(chunk))
        bound.bytes = 0
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                bound.add(0, 1)
                check_member_path(m.name)
                check_link(m)
                if m.isfile():
                    f = tar.extractfile(m)
                    while f.read(1 << 20):
                        pass
                names.append(m.name)
    except READ_ERRORS as err:
        raise SnapshotError(f"{Path(path).name}: unreadable ({err})") from None
    return names
