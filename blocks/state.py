"""State that every worker shares: checkpoints and "recovery done" records in one store (an
S3 prefix, or a directory every worker mounts), instead of the local disk of whichever machine
ran the flow. Selected by NOVA_DR_STATE=block:NAME; unset, state stays in NOVA_DR_HOME.

The block is also Prefect's result storage for the recovery steps (flows/machinery.py), so a
re-run on another worker finds the checkpoints of the one that died. Every record carries an
HMAC under the block's key: whoever can write the bucket could otherwise make a re-run skip a
step, or (Prefect reads a result with whatever serializer the record names, pickle included)
run code on the worker. A record that fails the check is treated as absent: the step runs
again, and every step reads the master's state first.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import tempfile
from functools import lru_cache
from pathlib import Path

from prefect.filesystems import WritableFileSystem
from pydantic import Field, SecretStr

from core.errors import NovaDRError

MAGIC = b"NOVA-DR-STATE-1 "


class StateStore(WritableFileSystem):
    """Where the workers of a fleet keep their checkpoints and finished-recovery records."""

    _block_type_name = "Nova DR State Store"
    _block_type_slug = "nova-dr-state-store"
    url: str = Field(description="s3://bucket/prefix, or a directory every worker mounts (NFS)")
    s3_block: str | None = Field(None, description="a Nova Backup S3 Credentials block (default: the environment)")
    hmac_key: SecretStr = Field(default_factory=lambda: SecretStr(secrets.token_hex(32)),
                                description="signs every record (made once, when the block is saved)")

    def _store(self):
        from tasks.storage import open_store

        return open_store(self.url, self.s3_block)

    def _mac(self, name: str, content: bytes) -> bytes:
        key = self.hmac_key.get_secret_value().encode()
        return hmac.new(key, name.encode() + b"\0" + content, hashlib.sha256).hexdigest().encode()

    def read(self, name: str) -> bytes | None:
        """The record's content, or None when there is none or its HMAC does not match."""
        from tasks.storage import StoreError

        with tempfile.TemporaryDirectory() as tmp:
            try:
                self._store().get(name, Path(tmp) / "r")
            except StoreError:  # none (or unreadable): the step runs again
                return None
            data = (Path(tmp) / "r").read_bytes()
        head, _, content = data.partition(b"\n")
        if not (head.startswith(MAGIC) and hmac.compare_digest(head[len(MAGIC):], self._mac(name, content))):
            return None
        return content

    def write(self, name: str, content: bytes) -> None:
        record = MAGIC + self._mac(name, content) + b"\n" + content
        self._store().put(name, lambda f: f.write(record))

    def modified(self) -> dict[str, float]:
        """Each record's name and when it was last written (unix seconds)."""
        return {f.name: f.mtime for f in self._store().list()}

    # Prefect's WritableFileSystem, as its result store calls it (sync with _sync=True, or a*)
    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        content = self.read(path)
        if content is None:
            raise NovaDRError(f"state {self.url}: no trusted record {path}")
        return content

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> None:
        self.write(path, content)

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> None:
        await asyncio.to_thread(self.write, path, content)


@lru_cache(maxsize=4)
def _load(name: str) -> StateStore:
    return StateStore.load(name)


def shared_state(ref: str | None) -> StateStore | None:
    """NOVA_DR_STATE: `block:NAME`, or empty for the local default."""
    if not ref:
        return None
    if not ref.startswith("block:"):
        raise NovaDRError(f"NOVA_DR_STATE={ref!r}: write block:NAME (a Nova DR State Store block), or leave it empty "
                          "for this machine's NOVA_DR_HOME")
    try:
        return _load(ref[len("block:"):])
    except ValueError as err:
        raise NovaDRError(f"NOVA_DR_STATE={ref}: {err}") from None
