"""One recovery per cluster at a time: a Prefect global concurrency slot named after the
cluster, held with a lease that the holder renews.

- A holder that dies stops renewing: on a shared server the lease expires (about a minute)
  and the server takes the slot back.
- A re-run on the same machine does not wait for that: the holder's host and pid are kept in
  a Prefect Variable, and a holder whose process is gone is taken over at once. (The
  embedded server keeps leases in the memory of a process that may be gone, so there this
  is the only way out.)
- A refusal names the run that holds the cluster.
- Writing the holder and giving the slot back run beside the flow, not in its way: during a
  run the server answered each Variable write in about a second (measured, 2 cores), two
  seconds of a ten-second restore. The process does not exit before the release is done
  (the thread is not a daemon), and the next recovery in this process waits for it.
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
from prefect.context import FlowRunContext, SettingsContext
from prefect.logging import get_logger
from prefect.variables import Variable

from core.errors import ClusterBusy

LEASE_SECONDS = 60  # the server's minimum
RENEW_SECONDS = 15
log = get_logger("nova_dr.slot")
_releasing: dict[str, threading.Thread] = {}  # slot name -> its release, still running


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


def _thread(fn, name: str, daemon: bool) -> threading.Thread:
    """A thread that sees this run's Prefect settings (a new thread has none, and may then not
    find the API) but not the flow's clients, which close when the flow ends."""
    ctx = SettingsContext.get()
    settings = ctx.model_copy() if ctx else None

    def main() -> None:
        if settings is None:
            return fn()
        with settings:
            fn()

    return threading.Thread(target=main, name=name, daemon=daemon)


@contextmanager
def cluster_slot(cluster: str, recovery_id: str, wait_seconds: float) -> Iterator[None]:
    name = slot_name(cluster)
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx else ""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None
    deadline = time.monotonic() + wait_seconds
    if (pending := _releasing.get(name)) is not None:
        pending.join()  # our own previous recovery on this cluster is still giving the slot back
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
                if not current:
                    raise ClusterBusy(
                        f"cluster {cluster}: its recovery slot is busy and no holder is recorded; waited "
                        f"{wait_seconds:.0f}s. If no recovery of this cluster runs (see the Prefect UI), free it: "
                        f"`prefect gcl update {name} --active-slots 0`")
                raise ClusterBusy(
                    f"cluster {cluster}: another recovery holds it (flow run {current.get('flow_run_id', '?')}, "
                    f"recovery {current.get('recovery_id', '?')}); waited {wait_seconds:.0f}s. Let it finish or "
                    "cancel it in the Prefect UI; a holder that died frees the cluster within about a minute")
            time.sleep(1)
    stop = threading.Event()

    def renew() -> None:
        try:
            Variable.set(name, {"flow_run_id": run_id, "recovery_id": recovery_id, "host": socket.gethostname(),
                                "pid": os.getpid(), "lease_id": lease_id, "since": time.time()}, overwrite=True)
        except Exception as err:  # only a re-run's takeover needs it; the lease still guards the cluster
            log.warning("cluster %s: recording the slot's holder failed: %s", cluster, err)
        with get_client(sync_client=True) as c:
            while not stop.wait(RENEW_SECONDS):
                try:
                    c.renew_concurrency_lease(UUID(lease_id), LEASE_SECONDS)
                except Exception as err:  # keep trying: a blip must not drop the slot
                    log.warning("cluster %s: renewing the slot's lease failed: %s", cluster, err)

    t = _thread(renew, f"slot-{name}", daemon=True)
    t.start()

    def release() -> None:
        stop.set()
        t.join(timeout=5)
        try:
            with get_client(sync_client=True) as client:
                _release(client, name, lease_id)
            # Cleared only while it still names us: the next holder may have written its own.
            # (Cleared before the release instead, a failed release would leave a busy slot
            # that nobody can take over.)
            if (Variable.get(name, default={}) or {}).get("lease_id") == lease_id:
                Variable.set(name, {}, overwrite=True)
        except Exception as err:
            log.warning("cluster %s: giving the slot back failed (%s); the server takes it back when the "
                        "lease expires, a re-run here takes it over", cluster, err)

    try:
        yield
    finally:
        _releasing[name] = _thread(release, f"release-{name}", daemon=False)
        _releasing[name].start()
