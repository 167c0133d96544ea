"""A fold of the cluster's history applied to a scratch etcd (tasks/drill.scratch_etcd), over
etcd's own JSON gateway on the scratch's unix socket (etcd 3.5 serves /v3/kv/txn, /v3/lease/*
beside gRPC on every client listener: server/embed/serve.go).

The lease rule, decided here and documented in the README:
- every key comes back attached to the lease it had at the point;
- a lease granted after the full snapshot is granted again with its own ID and the TTL etcd
  granted it (the capture records it when it first sees the lease), or DEFAULT_LEASE_TTL when
  that was not recorded: a key on a lease is ephemeral, and expiring early is the safe side;
- while the history is applied and until the point's snapshot is taken, every lease in the
  scratch etcd is kept alive, so none expires halfway and takes its keys with it (what
  broke Gardener's restores: gardener/etcd-backup-restore#1046, #583). A lease that expired in
  the cluster before the point did so as DELETE events, which the fold applies at their place.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

from core.errors import NovaDRError
from core.history import Fold

DEFAULT_LEASE_TTL = 60
# Per txn; the scratch etcd is started with --max-txn-ops and --max-request-bytes above these.
TXN_OPS = 1000
TXN_BYTES = 8 << 20


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Gateway:
    """etcd's JSON gateway on a unix socket (`unix://PATH` as the scratch etcd is given it)."""

    def __init__(self, endpoint: str, timeout: float = 60):
        self.path = endpoint.removeprefix("unix://")
        self.conn = _UnixHTTP(self.path, timeout)

    def call(self, api: str, body: dict) -> dict:
        try:
            self.conn.request("POST", api, json.dumps(body), {"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as err:
            self.conn.close()
            raise NovaDRError(f"the scratch etcd did not answer {api}: {err}") from None
        doc = json.loads(data or b"{}")
        if resp.status != 200 or "error" in doc:
            raise NovaDRError(f"the scratch etcd refused {api}: {doc.get('message') or doc.get('error') or data[:300]}")
        return doc

    def close(self) -> None:
        self.conn.close()


def leases(gw: Gateway) -> tuple[set[int], int]:
    """The scratch etcd's lease IDs, and its revision as the same answer's header gives it."""
    doc = gw.call("/v3/lease/leases", {})
    return {int(x["ID"]) for x in doc.get("leases", [])}, int(doc["header"]["revision"])


@contextmanager
def kept_alive(endpoint: str, every: float = 1.0) -> Iterator[set[int]]:
    """Every lease of the scratch etcd, and every one added to the yielded set, is renewed each
    `every` seconds until the block ends (a lease's TTL is at least etcd's minimum, 5 s or more)."""
    first = Gateway(endpoint)
    try:
        ids, _ = leases(first)
    finally:
        first.close()
    stop = threading.Event()
    failed: list[str] = []

    def renew():
        gw = Gateway(endpoint, timeout=10)
        try:
            while not stop.wait(every):
                for lid in list(ids):
                    try:
                        gw.call("/v3/lease/keepalive", {"ID": lid})
                    except NovaDRError as err:
                        failed.append(str(err))
        finally:
            gw.close()

    t = threading.Thread(target=renew, daemon=True)
    t.start()
    try:
        yield ids
    finally:
        stop.set()
        t.join(15)
    if failed:
        raise NovaDRError(f"leases could not be kept alive while the history was applied: {failed[0]}")


def apply_fold(endpoint: str, fold: Fold, lease_ttls: dict[int, int], alive: set[int],
               start_revision: int | None = None) -> dict:
    """Put and delete what the fold says, in txns of TXN_OPS, granting the leases the scratch
    etcd lacks first. `alive`: the set kept_alive renews (granted leases are added to it).
    `start_revision`: the scratch etcd's revision before (default the fold's base; a folded
    snapshot's file is at a lower revision than the history it holds)."""
    gw = Gateway(endpoint)
    try:
        puts = fold.puts()
        have, start = leases(gw)
        want = fold.base if start_revision is None else start_revision
        if start != want:
            raise NovaDRError(f"the scratch etcd is at revision {start}, not the full snapshot's {want}: something "
                              "wrote to it before the history was applied (a lease expired and took its keys: "
                              "gardener/etcd-backup-restore#1045); nothing was applied")
        granted = 0
        for lid in sorted({lease for _, lease in puts.values() if lease} - have):
            gw.call("/v3/lease/grant", {"ID": lid, "TTL": lease_ttls.get(lid, DEFAULT_LEASE_TTL)})
            alive.add(lid)
            granted += 1
        ops = [{"requestPut": {"key": k, "value": v, **({"lease": lease} if lease else {})}}
               for k, (v, lease) in puts.items()]
        ops += [{"requestDeleteRange": {"key": k}} for k in fold.deletes()]
        txns, last = 0, start
        for batch in batches(ops):
            last = int(gw.call("/v3/kv/txn", {"success": batch})["header"]["revision"])
            txns += 1
        # Every txn changes something (a delete is only of a key the base holds), so each adds
        # exactly one revision; any other revision is a write that was not ours.
        if last != start + txns:
            raise NovaDRError(f"the scratch etcd reached revision {last} after {txns} txns from {start}: something "
                              "else wrote to it while the history was applied (a lease expired?); the result is "
                              "not the point's keyspace")
        return {"puts": len(puts), "deletes": len(ops) - len(puts), "leases_granted": granted, "txns": txns}
    finally:
        gw.close()


def batches(ops: list[dict]) -> Iterator[list[dict]]:
    """Runs of at most TXN_OPS ops and TXN_BYTES of base64 (a value may be 1.5 MiB)."""
    batch, size = [], 0
    for op in ops:
        body = op.get("requestPut") or op["requestDeleteRange"]
        n = len(body["key"]) + len(body.get("value", ""))
        if batch and (len(batch) >= TXN_OPS or size + n > TXN_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(op)
        size += n
    if batch:
        yield batch
