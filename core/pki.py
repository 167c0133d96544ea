"""Which PKI files go into a node archive: every issued certificate with its key, never a CA's
private key. A key is a CA's when its public key is that of a certificate with CA:TRUE in
basicConstraints, whatever the files are called."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class PKIEntry:
    kind: str  # cert | key | file
    path: str
    is_ca: bool = False
    pubkey: str = ""  # sha256 of the public key
    not_after: str = ""  # openssl's enddate text
    holds_key: bool = False  # the file (also) contains a PRIVATE KEY block


def parse_pki_listing(text: str) -> list[PKIEntry]:
    """The tab-separated lines of tasks/archive.py's PKI_LIST script."""
    out = []
    for line in text.splitlines():
        f = line.split("\t")
        if f[0] == "cert" and len(f) >= 6:
            out.append(PKIEntry("cert", f[1], f[2] == "1", f[3], f[4], f[5] == "1"))
        elif f[0] == "key" and len(f) >= 3:
            out.append(PKIEntry("key", f[1], pubkey=f[2], holds_key=True))
        elif f[0] == "file" and len(f) >= 3:
            out.append(PKIEntry("file", f[1], holds_key=f[2] == "1"))
    return out


def select_pki_files(entries: list[PKIEntry]) -> tuple[list[str], list[str]]:
    """(files to archive, files left out with why)."""
    ca_keys = {e.pubkey for e in entries if e.kind == "cert" and e.is_ca and e.pubkey}
    keep, left = [], []
    for e in entries:
        if e.kind == "key" and e.pubkey in ca_keys:
            left.append(f"{e.path}: a CA private key")
        elif e.kind == "cert" and e.is_ca and e.holds_key:
            left.append(f"{e.path}: a CA certificate bundled with its private key")
        elif e.kind == "file" and e.holds_key:
            # An encrypted or unreadable key cannot be told apart from a CA's: leave it out.
            left.append(f"{e.path}: a private key that could not be read (encrypted?)")
        else:
            keep.append(e.path)
    return keep, left


def parse_enddate(text: str) -> datetime | None:
    """openssl's `notAfter` form, e.g. 'Mar  1 12:00:00 2027 GMT'."""
    try:
        return datetime.strptime(" ".join(text.split()), "%b %d %H:%M:%S %Y GMT").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
