"""A StarVault (Vault) raft snapshot is a gzip tar of meta.json, state.bin and SHA256SUMS, whose
lines are "<sha256 hex>  <name>" (hashicorp/raft-snapshot archive.go, as Vault's
/v1/sys/storage/raft/snapshot writes it). An HTTP 200 whose body was cut off, or that ends in
an error text, would otherwise be stored as a good snapshot and found out at a restore."""

from __future__ import annotations

import hashlib
import re
import tarfile
import zlib
from pathlib import Path

from core.errors import SnapshotError

PARTS = ("meta.json", "state.bin")
_SUM = re.compile(r"^([0-9a-f]{64})  (\S+)$")


def _one_whole_gzip(path: str | Path) -> None:
    """The file is one gzip stream, complete, with nothing after it (tar stops reading at its
    end-of-archive blocks, so an error text appended to the body would go unseen)."""
    d = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if d.eof:
                break
            d.decompress(chunk, 1 << 20)  # bounded output: a gzip bomb costs time, not memory
            while d.unconsumed_tail and not d.eof:
                d.decompress(d.unconsumed_tail, 1 << 20)
    while not d.eof and d.decompress(b"", 1 << 20):
        pass  # output zlib held back at the output bound
    if not d.eof:
        raise SnapshotError("not a complete raft snapshot: the gzip stream is cut off")
    if d.unused_data or chunk:
        raise SnapshotError("not a complete raft snapshot: something follows the gzip stream "
                            f"({(d.unused_data or chunk)[:80]!r})")


def check_raft_snapshot(path: str | Path) -> dict[str, str]:
    """The sha256 of each part, once SHA256SUMS vouches for every one; SnapshotError otherwise."""
    try:
        _one_whole_gzip(path)
    except zlib.error as err:
        raise SnapshotError(f"not a complete raft snapshot (a gzip tar): {err}") from None
    digests: dict[str, str] = {}
    sums = b""
    try:
        with tarfile.open(path, "r:gz") as tar:
            for i, member in enumerate(tar):
                if i > 8 or not member.isfile() or member.name not in (*PARTS, "SHA256SUMS"):
                    raise SnapshotError(f"unexpected member {member.name!r}")
                f = tar.extractfile(member)
                if member.name == "SHA256SUMS":
                    sums = f.read(1 << 16)
                    continue
                h = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                digests[member.name] = h.hexdigest()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise SnapshotError(f"not a complete raft snapshot (a gzip tar): {err}") from None
    listed = {}
    for line in sums.decode(errors="replace").splitlines():
        m = _SUM.match(line.strip())
        if m:
            listed[m[2]] = m[1]
    missing = [p for p in PARTS if p not in digests or p not in listed]
    if missing:
        raise SnapshotError(f"incomplete raft snapshot: no {', '.join(missing)} "
                            + ("in SHA256SUMS" if all(p in digests for p in missing) else "in the archive"))
    bad = [p for p in PARTS if listed[p] != digests[p]]
    if bad:
        raise SnapshotError(f"raft snapshot damaged: sha256 of {', '.join(bad)} differs from its SHA256SUMS")
    return digests
