"""StarVault (Vault-like): its Raft snapshot over the HTTP API, streamed into a store."""

from __future__ import annotations

import ssl

import httpx

from blocks.storage import StarVaultCredentials
from core.errors import NovaDRError
from tasks.storage import BackupStore


def store_raft_snapshot(creds: StarVaultCredentials, store: BackupStore, name: str) -> tuple[int, str]:
    """`GET /v1/sys/storage/raft/snapshot` with the token from the block; mode 0600."""
    url = creds.address.rstrip("/") + "/v1/sys/storage/raft/snapshot"
    verify: ssl.SSLContext | bool = True
    if creds.ca_cert:
        verify = ssl.create_default_context(cadata=creds.ca_cert)
    headers = {"X-Vault-Token": creds.token.get_secret_value()}
    try:
        with httpx.stream("GET", url, headers=headers, verify=verify, timeout=httpx.Timeout(30, read=300)) as r:
            if r.status_code != 200:
                body = r.read().decode(errors="replace")[:300]
                raise NovaDRError(f"StarVault {creds.address}: raft snapshot refused (HTTP {r.status_code}: {body}); "
                                  "check the token's policy in the StarVault block")

            def write(out):
                for chunk in r.iter_bytes(1 << 20):
                    out.write(chunk)

            return store.put(name, write, mode=0o600)
    except httpx.HTTPError as err:
        raise NovaDRError(f"StarVault {creds.address}: unreachable ({type(err).__name__}: {err})") from None
