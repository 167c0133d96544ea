"""Signed manifests: a backup set whose origin can be proved.

age gives confidentiality only (its recipients are public keys: anyone can make a valid .age
file), and a sha256 list proves nothing when whoever changes a file can change the list too.
So the backup flow signs each manifest with an Ed25519 key (an OpenSSH key, as `ssh-keygen -t
ed25519` makes it, held in a block), and every reader checks the signature against the
inventory's `backup_signers` before it trusts a byte of the set.

The signature covers the manifest's exact bytes, which travel as a string inside an envelope:
no re-serialisation on the reader's side can make two parties see different documents.
Pure: bytes and key texts in, documents and verdicts out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass

from core.errors import NovaDRError

ENVELOPE = "nova-dr-signed-manifest"
# Domain separation: a signature made for a manifest can be nothing else, and nothing else
# signed with the same key can pass for a manifest.
CONTEXT = b"nova-dr backup manifest v1\n"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def public_key(text: str):
    """An `ssh-ed25519 AAAA... [comment]` line as a key; a clear error naming it otherwise."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    shown = (text or "").strip()[:40]
    try:
        key = load_ssh_public_key(" ".join(str(text).split()[:2]).encode())
    except (ValueError, TypeError, IndexError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise NovaDRError(f"backup signer {shown!r}...: not an Ed25519 public key; give the line of a `.pub` "
                          "file made by `ssh-keygen -t ed25519` (ssh-ed25519 AAAA...)")
    return key


def _raw(key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_line(key) -> str:
    """The `ssh-ed25519 AAAA...` line of a private key's public half."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def trusts(signer_text: str, key) -> bool:
    """Is `key` the public key in this backup_signers line?"""
    return _raw(public_key(signer_text)) == _raw(key)


def fingerprint(key) -> str:
    """As `ssh-keygen -l` prints it: SHA256:<base64 of the wire-format key, unpadded>."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    blob = base64.b64decode(key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def private_key(text: str, passphrase: str | None, label: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(text.encode(), passphrase.encode() if passphrase else None)
    except (ValueError, TypeError) as err:
        why = "a wrong or missing passphrase" if "passphrase" in str(err).lower() or "password" in str(err).lower() \
            else "not an OpenSSH private key"
        raise NovaDRError(f"{label}: cannot read the signing key ({why}); nothing was written") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise NovaDRError(f"{label}: the signing key is not Ed25519; make one with `ssh-keygen -t ed25519`")
    return key


def sign(body: bytes, key) -> bytes:
    """The envelope a signed manifest is stored as."""
    doc = {ENVELOPE: 1, "manifest": body.decode(), "signer": public_line(key),
           "signature": base64.b64encode(key.sign(CONTEXT + body)).decode()}
    return json.dumps(doc, indent=1, sort_keys=True).encode()


# A history segment is signed in the same way, under its own context: its plain name (which
# says its revisions and time) and the sha256 of its lines, so no segment passes for another.
SEGMENT_CONTEXT = b"nova-dr history segment v1\n"


def seal_segment(key):
    """What encode_segment's `seal` gives each segment's last line: the signer and signature."""

    def seal(name: str, digest: str) -> dict:
        msg = SEGMENT_CONTEXT + f"{name}\n{digest}".encode()
        return {"signer": public_line(key), "sig": base64.b64encode(key.sign(msg)).decode()}

    return seal


def segment_problem(name: str, digest: str, trailer: dict, trusted: list[str]) -> str | None:
    """None when a trusted key signed this segment (its name and digest); else why not."""
    from cryptography.exceptions import InvalidSignature

    signer, sig = trailer.get("signer"), trailer.get("sig")
    if not signer or not sig:
        return "it is unsigned"
    try:
        key = public_key(signer)
    except NovaDRError:
        return "its signer is not an Ed25519 public key"
    if _raw(key) not in {_raw(public_key(t)) for t in trusted}:
        return f"it is signed by {fingerprint(key)}, which is not one of the inventory's backup_signers"
    try:
        key.verify(base64.b64decode(str(sig), validate=True), SEGMENT_CONTEXT + f"{name}\n{digest}".encode())
    except (InvalidSignature, ValueError):
        return f"its signature by {fingerprint(key)} does not match: it was changed after signing"
    return None


@dataclass(frozen=True)
class Opened:
    doc: dict
    signer: str | None  # the trusted key's fingerprint, when the signature is good
    problem: str | None  # why the manifest is not trusted (None: signed by a trusted key)
    body: bytes = b""  # the signed bytes, as they were signed


def open_manifest(data: bytes, name: str, trusted: list[str]) -> Opened:
    """Parse a stored manifest, signed or not, and say whether a trusted key signed it. The
    document's field types are checked either way: a bad one is refused here, with its name."""
    try:
        outer = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise NovaDRError(f"{name}: not valid JSON; the set cannot be verified") from None
    if not isinstance(outer, dict):
        raise NovaDRError(f"{name}: not a JSON object; the set cannot be verified")
    if ENVELOPE not in outer:
        return Opened(check_doc(outer, name), None, "its manifest is unsigned", data)
    body, signer, sig = outer.get("manifest"), outer.get("signer"), outer.get("signature")
    if not all(isinstance(x, str) for x in (body, signer, sig)):
        raise NovaDRError(f"{name}: a signed manifest needs the strings manifest, signer and signature")
    try:
        doc = json.loads(body)
    except ValueError:
        raise NovaDRError(f"{name}: its signed document is not valid JSON") from None
    if not isinstance(doc, dict):
        raise NovaDRError(f"{name}: its signed document is not a JSON object")
    doc = check_doc(doc, name)
    try:
        key = public_key(signer)
    except NovaDRError:
        raise NovaDRError(f"{name}: its signer is not an Ed25519 public key; the manifest is refused") from None
    shown = fingerprint(key)
    if _raw(key) not in {_raw(public_key(t)) for t in trusted}:
        return Opened(doc, None, f"its manifest is signed by {shown}, which is not one of the inventory's "
                      "backup_signers", body.encode())
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(sig, validate=True), CONTEXT + body.encode())
    except (InvalidSignature, ValueError):
        return Opened(doc, None, f"its manifest's signature by {shown} does not match: the manifest was changed "
                      "after signing", body.encode())
    return Opened(doc, shown, None, body.encode())


NO_MANIFEST = ("it has no manifest, so its origin is not verified (the platform's daemon makes such sets; so does "
               "a backup killed before its end)")


def accept(ts: str, where: str, opened: Opened | None, allow_unsigned: bool) -> str | None:
    """None for a set a trusted key signed; a warning for one the operator accepted with
    allow_unsigned; a refusal otherwise."""
    problem = NO_MANIFEST if opened is None else opened.problem
    if problem is None:
        return None
    if not allow_unsigned:
        raise NovaDRError(f"backup set {ts} in {where}: {problem}. Whoever can write to the store can make such a "
                          "set; if you know where this one came from, pass allow_unsigned=true. Nothing was changed")
    return f"backup set {ts}: {problem}; accepted only because allow_unsigned=true"


def manifest_doc(data: bytes, name: str) -> dict:
    """The document of a manifest, signed or not, for a lookup where trust is not the question
    (a snapshot file the operator gave, with its manifest beside it)."""
    return open_manifest(data, name, []).doc


# -- the document's shape -------------------------------------------------------------------
def _need(ok: bool, name: str, field: str, want: str) -> None:
    if not ok:
        raise NovaDRError(f"{name}: field {field} must be {want}; the manifest is refused (made by another tool, "
                          "or changed?)")


def check_doc(doc: dict, name: str) -> dict:
    """Every field a reader uses, with its type, so that no reader fails deep inside on a
    planted manifest (an AttributeError was what a list in place of `files` gave)."""
    files = doc.get("files", {})
    _need(isinstance(files, dict), name, "files", "an object of file name -> entry")
    for fname, entry in files.items():
        _need(isinstance(entry, dict), name, f"files[{fname!r}]", "an object")
        for k in ("sha256", "plain_sha256", "previous_sha256", "previous_plain_sha256"):
            if k in entry:
                _need(isinstance(entry[k], str) and bool(SHA256_RE.match(entry[k])), name,
                      f"files[{fname!r}].{k}", "64 lowercase hex digits")
        for k in ("size", "plain_size"):
            if k in entry:
                _need(isinstance(entry[k], int) and not isinstance(entry[k], bool) and entry[k] >= 0, name,
                      f"files[{fname!r}].{k}", "a whole number of bytes")
    masters = doc.get("masters", [])
    _need(isinstance(masters, list) and all(isinstance(m, str) for m in masters), name, "masters", "a list of names")
    settings = doc.get("settings", {})
    _need(isinstance(settings, dict) and all(isinstance(v, (bool, int)) for v in settings.values()), name,
          "settings", "an object of switches")
    for k in ("timestamp", "nova_version", "k8s_version", "cluster"):
        if k in doc:
            _need(isinstance(doc[k], str), name, k, "a string")
    snap = doc.get("etcd_snapshot", {})
    _need(isinstance(snap, dict) and isinstance(snap.get("status", {}), dict), name, "etcd_snapshot",
          "an object with a status object")
    at = snap.get("saved_at")
    _need(at is None or (isinstance(at, (int, float)) and not isinstance(at, bool)), name, "etcd_snapshot.saved_at",
          "a unix time")
    hist = snap.get("history_revision")
    _need(hist is None or (isinstance(hist, int) and not isinstance(hist, bool)), name,
          "etcd_snapshot.history_revision", "a whole number")
    rev = snap.get("status", {}).get("revision")
    _need(rev is None or (isinstance(rev, int) and not isinstance(rev, bool)), name, "etcd_snapshot.status.revision",
          "a whole number")
    return doc


def matches_set(doc: dict, ts: str, nova_version: str, name: str) -> list[str]:
    """What a manifest says against what its set's file names say (the version check must not
    read the file name only)."""
    out = []
    if doc.get("timestamp", ts) != ts:
        out.append(f"{name}: written for set {doc['timestamp']}, stored as set {ts}")
    if doc.get("nova_version", nova_version) != nova_version:
        out.append(f"{name}: records Nova {doc['nova_version']}, the set's file names say {nova_version}")
    return out
