"""The capture of the cluster's history: `etcdctl watch` of the whole keyspace, from one member,
run on that master over SSH, its JSON lines turned into segments (core/history.Recorder) and
handed to `write` as they come due. A segment is written before the next is cut, in order, so
the store's newest segment always continues the one before.

The watch runs on the master with that member's own ETCDCTL_* settings and aims at that member
alone: a follower's watch serves the same history as the leader's, without adding to the
leader's load, and it survives a leader change (the member keeps serving its watchers).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable

from core.errors import CommandError, NovaDRError
from core.etcd import etcdctl_command
from core.history import HistoryError, Recorder, encode_segment, parse_watch
from core.inventory import Master
from tasks.etcd import etcdctl
from tasks.remote import Connector

Write = Callable[[str, bytes, list], None]  # (name, data, revisions)
TICK = 0.25  # how often the flusher looks whether a segment is due
# Kept for what a revision takes from etcd's commit to this machine (the watch, etcdctl's JSON,
# SSH), which `at` does not see: without it the newest stored revision was up to 10.13 s old
# under 1,000 writes/s on the lab (bench/history.py), with it 9.59 s.
DELIVERY = 0.5


class Stopped(Exception):
    """The capture was asked to stop (the flow's deadline, or a test)."""


def lease_ttls(conn: Connector, master: Master, env: dict[str, str]) -> Callable[[list[int]], dict[int, int]]:
    """What a segment records of leases first seen in it: the TTL etcd granted each."""

    def ttl_of(ids: list[int]) -> dict[int, int]:
        out = {}
        for lid in ids:
            res = etcdctl(conn, master, env, "lease", "timetolive", f"{lid:x}", "-w", "json", own=True, check=False)
            try:
                granted = int(json.loads(res.stdout).get("grantedTTL", 0))
            except ValueError:
                granted = 0
            if granted > 0:  # 0: the lease is already gone, and its keys' deletions are history
                out[lid] = granted
        return out

    return ttl_of


def capture(conn: Connector, master: Master, env: dict[str, str], rec: Recorder, write: Write,
            stop: threading.Event, ttl_of: Callable[[list[int]], dict[int, int]] | None = None, seal=None) -> None:
    """Watch from rec.last + 1 until `stop` is set (raises Stopped), the watch ends (raises
    NovaDRError: the member went away; the caller resumes from rec.last on another), or the
    history breaks (raises HistoryError: a gap, which the caller must answer with a full
    snapshot). Whatever was received before any of these is written first. `seal`: signs each
    segment (core.signing.seal_segment)."""
    lock = threading.Lock()
    failure: list[BaseException] = []
    partial = b""

    took = [0.0]  # how long the last segment took to cut and store

    def flush(force: bool = False) -> None:
        with lock:
            if not (force and rec.pending) and not rec.due(time.time(), took[0] + TICK + DELIVERY):
                return
            revs, fresh = rec.pop()
        # Outside the lock: the TTL look-ups and the store's write must not hold up the reading.
        # One thread flushes at a time (the flusher, then the last flush after it ends), in order.
        began = time.monotonic()
        name, data = encode_segment(revs, ttl_of(fresh) if ttl_of and fresh else {}, seal)
        write(name, data, revs)
        took[0] = min(time.monotonic() - began, rec.flush_seconds / 2)  # a stalled store must not flush constantly

    def sink(chunk: bytes) -> None:
        nonlocal partial
        if stop.is_set():
            raise Stopped()
        partial += chunk
        *lines, partial = partial.split(b"\n")
        for line in lines:
            if line.strip():
                with lock:
                    rec.take(parse_watch(line.decode(), time.time()))
        flush_now.set()

    flush_now = threading.Event()
    done = threading.Event()

    def flusher() -> None:  # cuts on time even when no new event arrives to wake the sink
        while not done.is_set():
            flush_now.wait(TICK)
            flush_now.clear()
            if stop.is_set():
                conn.close()  # the capture's own connection: the watch ends now, not at its next event
                return
            try:
                flush()
            except BaseException as err:  # the store failed: the capture stops, and says why
                failure.append(err)
                conn.close()
                return

    t = threading.Thread(target=flusher, daemon=True, name="capture-flush")
    t.start()
    prefix, secrets = etcdctl_command(env, [master.client_url])
    argv = [*prefix, master.paths.etcdctl, "watch", "--prefix", "", f"--rev={rec.last + 1}", "--prev-kv",
            "--progress-notify", "-w", "json"]
    try:
        conn.stream(argv, _Sink(sink), timeout=365 * 86400, stdin=secrets or None)
        ended = "the watch ended"
    except HistoryError:
        raise
    except Exception as err:
        if failure:
            raise failure[0] from None  # the store failed, and the connection was closed for it
        if stop.is_set():
            raise Stopped() from None  # the connection was closed to stop it
        if not isinstance(err, CommandError):
            raise
        ended = f"the watch ended (exit {err.code}): {err.stderr.strip()[-300:]}"  # etcdctl exits 5 when canceled
    finally:
        done.set()
        flush_now.set()
        t.join(60)
        if not failure:
            flush(force=True)  # what was received is history, whatever ended the watch
    if failure:
        raise failure[0]
    if stop.is_set():
        raise Stopped()
    raise NovaDRError(f"{master.etcd_member}: {ended}")


class _Sink:
    def __init__(self, fn):
        self.write = fn
