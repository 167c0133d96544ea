"""Backup stores: a directory (an NFS mount) and S3, behind one small interface.

Both pass the same test suite (tests/test_storage.py). Content is streamed: a writer function
fills a file-like object; nothing needs a full copy on the machine running the flow.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Callable, Protocol
from urllib.parse import urlsplit

from core.errors import NovaDRError
from core.names import parse_name
from core.sets import StoredFile

Writer = Callable[[BinaryIO], None]


class StoreError(NovaDRError):
    pass


class BackupStore(Protocol):
    url: str

    def list(self) -> list[StoredFile]: ...

    def put(self, name: str, write: Writer, mode: int = 0o600) -> tuple[int, str]:
        """Store `name` from what `write` writes; returns (size, sha256). Atomic: a failed put
        leaves no file under `name`."""

    def get(self, name: str, dest: str | Path) -> None: ...

    def delete(self, name: str) -> None: ...

    def clear_leftovers(self, older_than_s: float) -> list[str]:
        """Remove what killed puts left (never a stored file); returns what went."""

    def retention_of(self, name: str) -> tuple[str, datetime] | None:
        """The Object Lock a stored file carries: (mode, retain until), or None."""


class _Hashing:
    """Counts and hashes what passes through to `inner`."""

    def __init__(self, inner: BinaryIO):
        self.inner, self.size, self.sha = inner, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.inner.write(data)
        self.size += len(data)
        self.sha.update(data)
        return len(data)

    def flush(self) -> None:
        self.inner.flush()


def _private(dest: str | Path) -> BinaryIO:
    """A downloaded backup file may hold secrets: it is created 0600, never readable by others.
    O_NOFOLLOW: a symlink planted at the name (in a shared folder) is refused, not written through."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StoreError(f"{dest} is a symbolic link; refusing to write a backup file through it") from None
        raise
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise StoreError(f"{name!r} is not a plain file name")


_PART = re.compile(r"^\.(?P<name>.+)\.part-\d+-\d+$")  # DirectoryStore.put's temporary name


class DirectoryStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.url = str(self.path)

    def _ready(self) -> Path:
        if not self.path.is_dir():
            raise StoreError(f"store {self.path}: no such directory; mount it or create it first")
        return self.path

    def list(self) -> list[StoredFile]:
        return sorted((StoredFile(p.name, st.st_size, st.st_mtime) for p in self._ready().iterdir()
                       if p.is_file() and not p.name.startswith(".") for st in [p.stat()]), key=lambda f: f.name)

    def put(self, name: str, write: Writer, mode: int = 0o600) -> tuple[int, str]:
        _check_name(name)
        tmp = self._ready() / f".{name}.part-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                h = _Hashing(f)
                write(h)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, self.path / name)
            dfd = os.open(self.path, os.O_DIRECTORY)
            try:
                os.fsync(dfd)  # the rename itself must survive a crash
            finally:
                os.close(dfd)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"store {self.path}: writing {name} failed: {err.strerror or err}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return h.size, h.sha.hexdigest()

    def get(self, name: str, dest: str | Path) -> None:
        _check_name(name)
        src = self._ready() / name
        if not src.is_file():
            raise StoreError(f"store {self.path}: no file {name}")
        with open(src, "rb") as f, _private(dest) as out:
            while chunk := f.read(1 << 20):
                out.write(chunk)

    def delete(self, name: str) -> None:
        _check_name(name)
        (self._ready() / name).unlink(missing_ok=True)

    def retention_of(self, name: str) -> None:
        return None  # a directory cannot lock a file against its own admin

    def clear_leftovers(self, older_than_s: float) -> list[str]:
        """The `.NAME.part-*` files a killed backup left, untouched for `older_than_s` (a put
        in progress writes to its own all the time). Never a stored file, nor a NAME not ours."""
        now, gone = time.time(), []
        for p in self._ready().iterdir():
            try:
                part = _PART.match(p.name)
                if part and parse_name(part["name"]) and p.is_file() and now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    gone.append(p.name)
            except FileNotFoundError:
                pass  # its own put finished or cleaned it meanwhile
        return gone


class S3Store:
    """s3://bucket/prefix. Endpoint and credentials from a session (a Block) or boto3's own
    environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Multipart for large files, a
    SHA256 checksum on every part, optional server-side encryption, retries with backoff."""

    PART = 16 << 20

    def __init__(self, url: str, session=None, sse: str | None = None, attempts: int = 4):
        import boto3
        from botocore.config import Config

        parts = urlsplit(url)
        self.url, self.bucket, self.prefix = url, parts.netloc, parts.path.strip("/")
        if not self.bucket:
            raise StoreError(f"store {url!r}: write s3://BUCKET/PREFIX")
        self.sse = sse
        cfg = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        self.s3 = (session or boto3.session.Session()).client("s3", config=cfg)
        self.attempts = attempts
        self.lock: tuple[str, datetime] | None = None  # (mode, retain until) for every put; see lock_puts
        self._versioned: bool | None = None

    def lock_puts(self, mode: str, until: datetime) -> None:
        """Write every file from now on with Object Lock retention, once the bucket is known to
        have Object Lock (S3 allows it only on buckets created with it)."""
        try:
            conf = self.s3.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
            enabled = conf.get("ObjectLockEnabled") == "Enabled"
        except Exception as err:
            if "ObjectLockConfigurationNotFound" not in str(err):
                raise self._err("reading the bucket's Object Lock configuration", err) from None
            enabled = False
        if not enabled:
            raise StoreError(f"store {self.url}: bucket {self.bucket} has no Object Lock, so object_lock={mode} "
                             "cannot be kept. Object Lock can only be turned on when a bucket is created: create "
                             "one with it (aws s3api create-bucket --object-lock-enabled-for-bucket), or leave "
                             "object_lock empty. Nothing was written")
        self.lock = (mode, until)

    def retention_of(self, name: str) -> tuple[str, datetime] | None:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as err:
            raise self._err(f"reading the Object Lock of {name}", err) from None
        if head.get("ObjectLockMode") and head.get("ObjectLockRetainUntilDate"):
            return head["ObjectLockMode"], head["ObjectLockRetainUntilDate"]
        return None

    def _key(self, name: str) -> str:
        _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _err(self, what: str, err: Exception) -> StoreError:
        return StoreError(f"store {self.url}: {what} failed: {err}")

    def list(self) -> list[StoredFile]:
        out = []
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                    if "/" not in name:
                        out.append(StoredFile(name, obj["Size"], obj["LastModified"].timestamp()))
        except Exception as err:
            raise self._err("listing", err) from None
        return sorted(out, key=lambda f: f.name)

    def clear_leftovers(self, older_than_s: float) -> list[str]:
        """Abort the multipart uploads under this prefix that a killed backup left open (the
        server keeps, and bills, their parts), started more than `older_than_s` ago: only
        those of a name of ours (another tool may share the prefix)."""
        now, gone = time.time(), []
        try:
            pages = self.s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
            for page in pages:
                for up in page.get("Uploads", []):
                    if parse_name(up["Key"].rsplit("/", 1)[-1]) and now - up["Initiated"].timestamp() > older_than_s:
                        self.s3.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                        gone.append(f"{up['Key']} (upload {up['UploadId'][:12]})")
        except Exception as err:
            raise self._err("clearing unfinished uploads", err) from None
        return gone

    def put(self, name: str, write: Writer, mode: int = 0o600) -> tuple[int, str]:
        """Multipart upload fed part by part from the writer (bounded memory: one part)."""
        key = self._key(name)
        extra = {"ChecksumAlgorithm": "SHA256"}
        if self.sse:
            extra["ServerSideEncryption"] = self.sse
        if self.lock:
            extra.update(ObjectLockMode=self.lock[0], ObjectLockRetainUntilDate=self.lock[1])
        upload = self._retry(f"starting the upload of {name}",
                             lambda: self.s3.create_multipart_upload(Bucket=self.bucket, Key=key, **extra))
        uid, parts = upload["UploadId"], []
        sink = _PartSink(self, key, uid, parts, name)
        try:
            h = _Hashing(sink)
            write(h)
            sink.close()
            self._retry(f"finishing the upload of {name}", lambda: self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts}))
        except BaseException:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=uid)
            except Exception:
                pass  # the upload is already broken; the bucket's lifecycle rules clean up
            raise
        return h.size, h.sha.hexdigest()

    def _retry(self, what: str, call):
        """boto3 retries each request itself; this retries whole calls with backoff on top,
        then gives one clear error."""
        for attempt in range(self.attempts):
            try:
                return call()
            except Exception as err:
                if attempt == self.attempts - 1:
                    raise self._err(what, err) from None
                time.sleep(0.5 * 2**attempt)

    def get(self, name: str, dest: str | Path) -> None:
        try:
            with _private(dest) as out:
                self.s3.download_fileobj(self.bucket, self._key(name), out)
        except Exception as err:
            raise self._err(f"downloading {name}", err) from None

    def delete(self, name: str) -> None:
        """On a versioned bucket (Object Lock makes every bucket one) a plain delete only hides
        the file behind a delete marker and keeps, and bills, its bytes: every version goes."""
        key = self._key(name)
        try:
            if self._versioned is None:
                self._versioned = self.s3.get_bucket_versioning(Bucket=self.bucket).get("Status") in (
                    "Enabled", "Suspended")
            if not self._versioned:
                self.s3.delete_object(Bucket=self.bucket, Key=key)
                return
            pages = self.s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=key)
            for page in pages:
                for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    if v["Key"] == key:
                        self.s3.delete_object(Bucket=self.bucket, Key=key, VersionId=v["VersionId"])
        except Exception as err:
            raise self._err(f"deleting {name}", err) from None


class _PartSink:
    """Buffers one part, uploads it with its SHA256 checksum, keeps the part list."""

    def __init__(self, store: S3Store, key: str, uid: str, parts: list, name: str):
        self.store, self.key, self.uid, self.parts, self.name = store, key, uid, parts, name
        self.buf = bytearray()

    def write(self, data) -> int:
        self.buf += data
        while len(self.buf) >= self.store.PART:
            self._send(bytes(self.buf[: self.store.PART]))
            del self.buf[: self.store.PART]
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.buf or not self.parts:
            self._send(bytes(self.buf))
            self.buf.clear()

    def _send(self, body: bytes) -> None:
        import base64

        n = len(self.parts) + 1
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        resp = self.store._retry(f"uploading {self.name} (part {n})", lambda: self.store.s3.upload_part(
            Bucket=self.store.bucket, Key=self.key, UploadId=self.uid, PartNumber=n, Body=body,
            ChecksumAlgorithm="SHA256", ChecksumSHA256=digest))
        self.parts.append({"PartNumber": n, "ETag": resp["ETag"], "ChecksumSHA256": digest})


def open_store(url: str, s3_block: str | None = None) -> BackupStore:
    """A directory path (or file://...) or s3://bucket/prefix."""
    if not url:
        raise StoreError("no store given; pass store=/mnt/nfs/backups or store=s3://bucket/prefix")
    if url.startswith("s3://"):
        if s3_block:
            from blocks.storage import S3Credentials

            creds = S3Credentials.load(s3_block)
            return S3Store(url, session=creds.session(), sse=creds.server_side_encryption)
        return S3Store(url)
    if url.startswith("file://"):
        url = urlsplit(url).path
    if "://" in url:
        raise StoreError(f"store {url!r}: use a directory path or s3://bucket/prefix")
    return DirectoryStore(url)
