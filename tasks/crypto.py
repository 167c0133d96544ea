"""age encryption of backup files (the standard `age -d -i key.txt` opens them), streamed on
the way to the store: the plaintext never touches a disk. X25519 recipients only."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

from core.errors import NovaDRError

Writer = Callable[[object], None]


def recipients_from(texts: list[str] | None) -> list:
    """age1... public keys; a clear error naming the one that is not."""
    from pyrage import x25519

    out = []
    for t in texts or []:
        try:
            out.append(x25519.Recipient.from_str(t.strip()))
        except Exception:
            raise NovaDRError(f"backup recipient {t.strip()[:20]!r}...: not an age X25519 public key (age1...); "
                              "make one with `age-keygen` and give its public key") from None
    return out


def identities_from_block(name: str | None) -> list:
    """The identities saved in an AgeIdentity block. The secret is unwrapped only here."""
    from pyrage import x25519

    from blocks.storage import AgeIdentity

    if not name:
        raise NovaDRError("the set is encrypted: pass identity_block (a Nova Backup Age Identity block holding the "
                          "AGE-SECRET-KEY); nothing was read")
    try:
        text = AgeIdentity.load(name).identities.get_secret_value()
    except ValueError:
        raise NovaDRError(f"identity_block {name!r}: no such Nova Backup Age Identity block") from None
    keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    try:
        out = [x25519.Identity.from_str(k) for k in keys]
    except Exception:
        raise NovaDRError(f"identity_block {name!r}: holds a line that is not an AGE-SECRET-KEY-1...") from None
    if not out:
        raise NovaDRError(f"identity_block {name!r}: holds no identity")
    return out


class _PipeReader:
    """The read end of an os.pipe as the raw reader pyrage wants."""

    def __init__(self, fd):
        self.f = os.fdopen(fd, "rb", buffering=0)

    def readinto(self, b) -> int:
        return self.f.readinto(b)

    def read(self, n=-1):
        return self.f.read(n)


class Encrypting:
    """A file-like: plaintext written in comes out encrypted into `out`, through a pipe and a
    thread running pyrage's streaming encryption (64 KiB chunks; nothing held in memory)."""

    def __init__(self, out, recipients: list):
        self.plain = hashlib.sha256()
        self.plain_size = 0
        r, w = os.pipe()
        self._w = os.fdopen(w, "wb", buffering=1 << 16)
        self._error: BaseException | None = None
        reader = _PipeReader(r)

        def pump():
            import pyrage

            try:
                pyrage.encrypt_io(reader, out, recipients)
            except BaseException as err:  # surfaced by close()
                self._error = err
            finally:
                reader.f.close()

        self._t = threading.Thread(target=pump, name="age-encrypt", daemon=True)
        self._t.start()

    def write(self, data) -> int:
        self.plain.update(data)
        self.plain_size += len(data)
        try:
            self._w.write(data)
        except BrokenPipeError:
            self._t.join()
            raise NovaDRError(f"encryption stopped: {self._error}") from None
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._w.close()
        self._t.join()
        if self._error is not None:
            raise NovaDRError(f"encryption failed: {self._error}")


def encrypted_writer(write: Writer, recipients: list, into: dict) -> Writer:
    """store.put's writer, encrypted; the plaintext's sha256 and size go into `into`."""

    def run(out):
        enc = Encrypting(out, recipients)
        try:
            write(enc)
        finally:
            enc.close()
        into.update(plain_sha256=enc.plain.hexdigest(), plain_size=enc.plain_size)

    return run


def decrypt_file(src: Path, dest: Path, identities: list, label: str) -> str:
    """Streamed decryption into dest (mode 0600); returns the plaintext's sha256. A wrong
    identity or a changed byte is one clear error, and no partial file is left."""
    import pyrage

    h = hashlib.sha256()  # of the plaintext, as it is written

    class _Hashing:
        def __init__(self, f):
            self.f = f

        def write(self, data) -> int:
            h.update(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    try:  # O_NOFOLLOW: never the plaintext written through a link planted at its name
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise NovaDRError(f"{label}: cannot create {dest} ({err.strerror}); nothing was changed") from None
    try:
        with open(src, "rb") as inp, os.fdopen(fd, "wb") as out:
            pyrage.decrypt_io(inp, _Hashing(out), identities)
    except (pyrage.DecryptError, OSError, ValueError) as err:  # a damaged chunk surfaces as an I/O error
        dest.unlink(missing_ok=True)
        why = "no identity in the block opens it" if "no matching keys" in str(err).lower() \
            else "the file is damaged or was changed"
        raise NovaDRError(f"{label}: cannot decrypt ({why}: {err}); nothing was changed") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return h.hexdigest()


class EncryptingStore:
    """A backup store that encrypts the files of the given kinds on their way in, their names
    gaining `.age`. `stored` maps each plain name to what was written (name, plaintext sha256)."""

    def __init__(self, inner, recipients: list, kinds: set[str]):
        self.inner, self.url, self.recipients, self.kinds = inner, inner.url, recipients, kinds
        self.stored: dict[str, dict] = {}

    def list(self):
        return self.inner.list()

    def get(self, name, dest):
        return self.inner.get(name, dest)

    def delete(self, name):
        return self.inner.delete(name)

    def retention_of(self, name):
        return self.inner.retention_of(name)

    def put(self, name: str, write: Writer, mode: int = 0o600) -> tuple[int, str]:
        from core.history import parse_segment_name
        from core.names import parse_name

        p = parse_name(name)
        kind = p.kind if p else "history" if parse_segment_name(name) else None
        if kind not in self.kinds:
            return self.inner.put(name, write, mode)
        info: dict = {}
        size, sha = self.inner.put(name + ".age", encrypted_writer(write, self.recipients, info), mode)
        self.stored[name] = {"name": name + ".age", **info}
        return size, sha


def signing_key_from_block(name: str):
    """The Ed25519 key of a Nova Backup Signing Key block. The secret is unwrapped only here."""
    from blocks.storage import BackupSigningKey
    from core.signing import private_key

    try:
        block = BackupSigningKey.load(name)
    except ValueError:
        raise NovaDRError(f"backup_signing_block {name!r}: no such Nova Backup Signing Key block; save one with "
                          "the private key of `ssh-keygen -t ed25519`, or remove backup_signing_block") from None
    return private_key(block.private_key.get_secret_value(),
                       block.passphrase.get_secret_value() if block.passphrase else None,
                       f"backup_signing_block {name!r}")
