"""StarVault (Vault-like): its Raft snapshot over the HTTP API, streamed into a store."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from blocks.storage import StarVaultCredentials
from core.errors import NovaDRError, SnapshotError
from core.raft_snapshot import check_raft_snapshot
from tasks.scratch import scratch_dir
from tasks.storage import BackupStore


def store_raft_snapshot(creds: StarVaultCredentials, store: BackupStore, name: str) -> tuple[int, str]:
    """`GET /v1/sys/storage/raft/snapshot` with the token from the block, into a private scratch
    file, checked against its own SHA256SUMS, then stored (mode 0600)."""
    url = creds.address.rstrip("/") + "/v1/sys/storage/raft/snapshot"
    verify: ssl.SSLContext | bool = True
    if creds.ca_cert:
        verify = ssl.create_default_context(cadata=creds.ca_cert)
    headers = {"X-Vault-Token": creds.token.get_secret_value()}
    with scratch_dir("nova-dr-raft-") as tmp:
        local = Path(tmp) / "raft.snap"
        try:
            with httpx.stream("GET", url, headers=headers, verify=verify, timeout=httpx.Timeout(30, read=300)) as r:
                if r.status_code != 200:
                    body = r.read().decode(errors="replace")[:300]
                    raise NovaDRError(f"StarVault {creds.address}: raft snapshot refused (HTTP {r.status_code}: "
                                      f"{body}); check the token's policy in the StarVault block")
                with open(local, "xb") as out:
                    for chunk in r.iter_bytes(1 << 20):
                        out.write(chunk)
        except httpx.HTTPError as err:
            raise NovaDRError(f"StarVault {creds.address}: unreachable ({type(err).__name__}: {err})") from None
        try:
            check_raft_snapshot(local)
        except SnapshotError as err:
            raise NovaDRError(f"StarVault {creds.address}: the raft snapshot it sent is unusable ({err}); nothing "
                              "of it was stored. Retry; if it persists, check StarVault's log") from None

        def write(out):
            with open(local, "rb") as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)

        return store.put(name, write, mode=0o600)


def _client(creds: StarVaultCredentials) -> httpx.Client:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cadata=creds.ca_cert) if creds.ca_cert else True
    return httpx.Client(base_url=creds.address.rstrip("/"), verify=verify, timeout=30,
                        headers={"X-Vault-Token": creds.token.get_secret_value()})


def kv2_read(creds: StarVaultCredentials, mount: str, path: str) -> tuple[dict, int]:
    """The newest version of a KV v2 secret: (data, version); ({}, 0) when it does not exist."""
    try:
        with _client(creds) as c:
            r = c.get(f"/v1/{mount}/data/{path}")
    except httpx.HTTPError as err:
        raise NovaDRError(f"StarVault {creds.address}: unreachable ({type(err).__name__})") from None
    if r.status_code == 404:
        # Vault answers 404 for a soft-deleted newest version too, its metadata still in the body
        try:
            meta = ((r.json().get("data") or {}).get("metadata") or {})
        except ValueError:
            meta = {}
        if meta.get("version"):
            raise NovaDRError(f"StarVault {creds.address}: the newest version ({meta['version']}) of {mount}/{path} "
                              f"is deleted{' and destroyed' if meta.get('destroyed') else ''}, so its other keys "
                              "cannot be carried over. Undelete it first (vault kv undelete -mount="
                              f"{mount} -versions={meta['version']} {path}), or write the secret anew by hand; "
                              "nothing was changed")
        return {}, 0
    if r.status_code != 200:
        raise NovaDRError(f"StarVault {creds.address}: reading {mount}/{path} refused (HTTP {r.status_code}); "
                          "check the token's policy in the StarVault block")
    body = r.json()["data"]
    return body.get("data") or {}, int((body.get("metadata") or {}).get("version", 0))


def kv2_write(creds: StarVaultCredentials, mount: str, path: str, data: dict, cas: int) -> int:
    """A new version of a KV v2 secret, only if the newest is still `cas` (check-and-set)."""
    try:
        with _client(creds) as c:
            r = c.post(f"/v1/{mount}/data/{path}", json={"options": {"cas": cas}, "data": data})
    except httpx.HTTPError as err:
        raise NovaDRError(f"StarVault {creds.address}: unreachable ({type(err).__name__})") from None
    if r.status_code != 200:
        raise NovaDRError(f"StarVault {creds.address}: writing {mount}/{path} refused (HTTP {r.status_code}); "
                          "someone else may have written it meanwhile, or the token may not allow it")
    return int(r.json()["data"]["version"])
