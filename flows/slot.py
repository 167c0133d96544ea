"""One recovery per cluster at a time: a Prefect global concurrency slot named after the
cluster, held with a lease that the holder renews.

- A holder that dies stops renewing: on a shared server the lease expires (about a minute)
  and the server takes the slot back.
- A re-run on the same machine does not wait for that: the holder's host and pid are kept in
  a Prefect Variable, and a holder whose process is gone is taken over at once. (The
  embedded server keeps leases in the memory of a process that may be gone, so there this
  is the only way out.)
- A refusal names the run that holds the cluster.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.context import FlowRunContext
from prefect.logging import get_logger
from prefect.variables import Variable

from core.errors import ClusterBusy

LEASE_SECONDS = 60  # the server's minimum
RENEW_SECONDS = 15
log = get_logger("nova_dr.slot")


def slot_name(cluster: str) -> str:
    return "nova-dr-recovery-" + "".join(c if c.isalnum() else "-" for c in cluster.lower())


def _holder_dead(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    pid = int(holder["pid"])
    if pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return True


def _release(client, name: str, lease_id: str | None) -> None:
    if lease_id:
        try:
            client.release_concurrency_slots_with_lease(UUID(lease_id))
            return
        except httpx.HTTPStatusError as err:
            if err.response.status_code != 404:
                raise
    # The lease is unknown to this server (an embedded server that died with its holder):
    # give the slot back by name.
    client.release_concurrency_slots([name], slots=1, occupancy_seconds=1.0)


@contextmanager
def cluster_slot(cluster: str, recovery_id: str, wait_seconds: float) -> Iterator[None]:
    name = slot_name(cluster)
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx else ""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None
    deadline = time.monotonic() + wait_seconds
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        while True:
            try:
                resp = client.increment_concurrency_slots_with_lease([name], 1, "concurrency", LEASE_SECONDS, holder)
                lease_id = resp.json()["lease_id"]
                break
            except httpx.HTTPStatusError as err:
                if err.response.status_code != 423:
                    raise
            current = Variable.get(name, default={}) or {}
            if current and _holder_dead(current):
                log.warning("cluster %s: holder %s (pid %s) is gone; taking the slot over", cluster,
                            current.get("flow_run_id"), current.get("pid"))
                _release(client, name, current.get("lease_id"))
                Variable.set(name, {}, overwrite=True)
                continue
            if time.monotonic() > deadline:
                raise ClusterBusy(
                    f"cluster {cluster}: another recovery holds it (flow run {current.get('flow_run_id', '?')}, "
                    f"recovery {current.get('recovery_id', '?')}); waited {wait_seconds:.0f}s. Let it finish or "
                    "cancel it in the Prefect UI; a holder that died frees the cluster within about a minute")
            time.sleep(1)
    Variable.set(name, {"flow_run_id": run_id, "recovery_id": recovery_id, "host": socket.gethostname(),
                        "pid": os.getpid(), "lease_id": lease_id, "since": time.time()}, overwrite=True)
    stop = threading.Event()

    def renew() -> None:
        with get_client(sync_client=True) as c:
            while not stop.wait(RENEW_SECONDS):
                try:
                    c.renew_concurrency_lease(UUID(lease_id), LEASE_SECONDS)
                except Exception as err:  # keep trying: a blip must not drop the slot
                    log.warning("cluster %s: renewing the slot's lease failed: %s", cluster, err)

    t = threading.Thread(target=renew, daemon=True, name=f"slot-{name}")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        with get_client(sync_client=True) as client:
            _release(client, name, lease_id)
        Variable.set(name, {}, overwrite=True)
