"""The cluster lock: its rules (pure), its file on real masters over SSH, and two locks racing."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import replace

import pytest

from core.errors import ClusterBusy, LockLost
from core.lock import Holder, LockUnreadable, Seen, Verdict, busy_message, decide, majority, parse_holder
from flows.lock import ClusterLock
from tasks.lock import read_lock, record_sha256, remove_lock, replace_lock
from tasks.remote import connect
from tests.helpers import REPO
from tests.test_cli import CLI
from tests.test_restore import _wait_for

ME = Holder(recovery_id="restore-etcd-cluster-lab0-abc", flow="restore-etcd-cluster", flow_run_id="run-2",
            host="orchestrator-b", pid=200, pid_start="555", token="tok-b", api="embedded", acquired_at=0,
            expires_at=0)
OTHER = Holder(recovery_id="replace-etcd-member-lab0-def", flow="replace-etcd-member", flow_run_id="run-1",
               host="orchestrator-a", pid=100, pid_start="444", token="tok-a", api="http://10.0.0.5:4200/api",
               acquired_at=1000, expires_at=1090)


@pytest.mark.parametrize("current, now, force, alive, verdict", [
    (None, 1000, False, None, Verdict.FREE),
    (replace(ME, expires_at=1090), 1000, False, None, Verdict.OURS),
    # The same recovery from a run that is gone here, or that ran elsewhere: taken over at once.
    (replace(ME, token="old", expires_at=1090), 1000, False, False, Verdict.RESUME),
    (replace(ME, token="old", expires_at=1090), 1000, False, None, Verdict.RESUME),
    # ...but not while that run's process still runs here.
    (replace(ME, token="old", expires_at=1090), 1000, False, True, Verdict.BUSY),
    (OTHER, 1089, False, None, Verdict.BUSY),
    (OTHER, 1089, False, False, Verdict.BUSY),  # gone, but another recovery: only the expiry or force
    (OTHER, 1090, False, None, Verdict.EXPIRED),
    (OTHER, 1089, True, None, Verdict.FORCED),
])
def test_decide(current, now, force, alive, verdict):
    assert decide(current, ME, now, force, alive) == verdict


def test_majority():
    assert [majority(n) for n in (1, 2, 3, 5, 7)] == [1, 2, 2, 3, 4]


def test_a_record_read_back_is_checked():
    assert parse_holder(OTHER.dumps()) == OTHER
    assert parse_holder("") is None
    good = json.loads(OTHER.dumps())
    for bad in ("{", "[]", json.dumps({**good, "format": "x"}), json.dumps({**good, "pid": "100"}),
                json.dumps({**good, "expires_at": True}), json.dumps({**good, "extra": 1}),
                json.dumps({k: v for k, v in good.items() if k != "token"})):
        with pytest.raises(LockUnreadable):
            parse_holder(bad)


def test_a_refusal_names_the_holder_and_the_way_out():
    msg = busy_message("lab0", [Seen("etcd1", Verdict.BUSY, OTHER, 1030), Seen("etcd2", error="etcd2: unreachable")],
                       3, 12, "/var/lib/nova-dr/lab0.lock")
    assert "recovery replace-etcd-member-lab0-def" in msg and "flow run run-1" in msg
    assert "pid 100 on orchestrator-a" in msg and "expires in 60s" in msg and "force=true" in msg
    assert "/var/lib/nova-dr/lab0.lock" in msg
    msg = busy_message("lab0", [Seen("etcd1", error="etcd1: no route"), Seen("etcd2", error="etcd2: refused"),
                                Seen("etcd3", Verdict.FREE)], 3, 0, "/x")
    assert "could not lock a majority of the masters (2 of 3; 1 answered)" in msg and "etcd2: refused" in msg


def test_the_lock_file_on_a_master_is_a_compare_and_swap(lab3):
    cluster = lab3.cluster()
    m = cluster.masters[0]
    conn = connect(cluster, m)
    try:
        first = read_lock(conn, m, "t")
        assert (first.sha256, first.result, first.text) == ("none", "read", "")
        assert first.now > 1.7e9  # the master's clock, for its expiries
        rec = OTHER.dumps()
        assert replace_lock(conn, m, "t", "none", rec).result == "done"
        assert replace_lock(conn, m, "t", "none", ME.dumps()).result == "conflict"  # someone was first
        seen = read_lock(conn, m, "t")
        assert seen.sha256 == record_sha256(rec) and parse_holder(seen.text) == OTHER
        assert remove_lock(conn, m, "t", "0" * 64).result == "conflict"
        assert remove_lock(conn, m, "t", seen.sha256).result == "done"
        assert read_lock(conn, m, "t").sha256 == "none"
        # Only the owner reads it: the file and its directory.
        out = conn.run(["sh", "-c", 'stat -c %a "$1" "$1"/t.guard', "sh", m.paths.lock_dir]).stdout.split()
        assert out == ["700", "600"]
    finally:
        conn.close()


def test_two_recoveries_racing_for_a_cluster_one_wins(lab3):
    cluster = lab3.cluster()
    locks = [ClusterLock(cluster, f"recovery-{i}", "restore-etcd-cluster", ttl=30) for i in range(2)]
    outcome: dict[int, object] = {}

    def take(i):
        try:
            locks[i].acquire(wait_seconds=3)  # the loser looks again, and then sees the winner
            outcome[i] = "held"
        except ClusterBusy as err:
            outcome[i] = str(err)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        winners = [i for i, o in outcome.items() if o == "held"]
        assert len(winners) == 1, outcome  # of three masters, one of two always takes two
        winner, loser = winners[0], 1 - winners[0]
        assert f"recovery recovery-{winner}" in outcome[loser]  # the refusal names the holder
        assert len(locks[winner].held) >= 2
        # A master the loser had for a moment is free again, and the winner's renewal takes it.
        _wait_for(lambda: len(locks[winner].held) == 3, 15, f"the renewal to spread the lock: {locks[winner].held}")
        # The loser left nothing behind: it can take the cluster once the winner is done.
        for lock in locks:
            lock.release()
        locks[1].acquire(wait_seconds=5)
        assert len(locks[1].held) == 3
    finally:
        for lock in locks:
            lock.release()
    conn = connect(cluster, cluster.masters[0])
    try:
        assert read_lock(conn, cluster.masters[0], cluster.name).sha256 == "none"
    finally:
        conn.close()


def test_force_takes_a_live_lock_and_its_holder_stops_before_its_next_step(lab3):
    cluster = lab3.cluster()
    first = ClusterLock(cluster, "first", "replace-etcd-member", ttl=60)
    second = ClusterLock(cluster, "second", "restore-etcd-cluster", ttl=60)
    forced = ClusterLock(cluster, "second", "restore-etcd-cluster", force=True, ttl=60)
    first.acquire(wait_seconds=0)
    try:
        with pytest.raises(ClusterBusy, match="another recovery holds it: recovery first"):
            second.acquire(wait_seconds=0)
        forced.acquire(wait_seconds=0)
        _, warnings = forced.plan_notes()
        assert len(warnings) == 1 and "force=true: it had NOT expired" in warnings[0] and "recovery first" in warnings[0]
        first.ensure_held()  # not seen yet: it learns at its next renewal, or when it asks
        with pytest.raises(LockLost, match="no longer holds the recovery lock .*names recovery second"):
            first.ensure_held(now=True)
    finally:
        first.release()  # gives back nothing: the records are the forcing run's now
        assert len(forced.held) == 3
        forced.release()
    assert all(read_lock(c, m, cluster.name).sha256 == "none" for m, c in _conns(cluster))


def _conns(cluster):
    for m in cluster.masters:
        conn = connect(cluster, m)
        try:
            yield m, conn
        finally:
            conn.close()


def _lock_cli(lab, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "lock", *args, "--inventory", str(lab.dir / "inventory.yaml")], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_an_operator_shows_and_releases_a_dead_holders_lock_by_hand(lab3):
    cluster = lab3.cluster()
    assert "free" in _lock_cli(lab3, "show").stdout
    # A live holder (this test's process) is not released by hand.
    live = ClusterLock(cluster, "held-by-the-test", "restore-etcd-cluster", ttl=60)
    live.acquire(wait_seconds=0)
    try:
        out = _lock_cli(lab3, "show")
        assert out.returncode == 0 and out.stdout.count("recovery held-by-the-test") == 3, out
        out = _lock_cli(lab3, "release", "--yes")
        assert out.returncode == 1 and "still runs here" in out.stderr and "Nothing was released" in out.stderr
        assert len(live.held) == 3 and not live.lost
        live.ensure_held(now=True)
    finally:
        live._stop.set()  # as if the process died: the records stay, with a pid that is gone
        live._thread.join()
    for m, conn in _conns(cluster):
        f = read_lock(conn, m, cluster.name)
        h = replace(parse_holder(f.text), pid=4_000_000 + os.getpid(), pid_start="1")  # above pid_max: gone
        assert replace_lock(conn, m, cluster.name, f.sha256, h.dumps()).result == "done"
    out = _lock_cli(lab3, "release", "--yes")
    assert out.returncode == 0 and out.stdout.count("released") == 3, out
    assert "free" in _lock_cli(lab3, "show").stdout
    assert all(read_lock(c, m, cluster.name).sha256 == "none" for m, c in _conns(cluster))
