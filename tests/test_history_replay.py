"""A full snapshot plus the history a real watch recorded, folded to a revision and applied to
a scratch etcd, gives exactly the keyspace the cluster had at that revision (real etcd 3.5 with
TLS on the lab's masters, real `etcdctl watch`, a real scratch etcd)."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time

import pytest

from core.errors import NovaDRError
from core.etcd import parse_snapshot_status
from core.history import Fold, Recorder, decode_segment, parse_watch
from tasks.drill import find_etcd_bins, scratch_etcd
from tasks.replay import apply_fold, kept_alive
from tests.helpers import _etcdctl, snapshot


def keyspace(text: str) -> dict[str, tuple[str, int]]:
    """`get "" --prefix -w json`: key -> (value, lease), all base64 as etcd prints them."""
    return {kv["key"]: (kv.get("value", ""), int(kv.get("lease", 0))) for kv in json.loads(text).get("kvs") or []}


def revision(lab) -> int:
    return json.loads(lab.etcdctl("endpoint", "status", "-w", "json",
                                  endpoints=[lab.state()["endpoints"][0]]).stdout)[0]["Status"]["header"]["revision"]


def lease_id(out: str) -> str:
    return out.split()[1]  # "lease 694d8a1b2c3d4e5f granted with TTL(600s)"


def test_a_history_restores_each_recorded_revision_exactly(lab_factory, tmp_path):
    lab = lab_factory(1)
    ctl = lambda *a, **kw: lab.etcdctl(*a, **kw)  # noqa: E731
    for i in range(40):
        ctl("put", f"/registry/base/{i:03d}", f"v{i}")
    # A short lease from before the full snapshot, kept alive in the cluster: the replay below
    # takes longer than its TTL, and its key must survive it (gardener/etcd-backup-restore#1046).
    short = lease_id(ctl("lease", "grant", "5").stdout)
    ctl("put", "--lease=" + short, "/registry/masterleases/10.0.0.1", "m1")
    keeper = subprocess.Popen([str(_etcdctl()), "lease", "keep-alive", short], env=lab.etcdctl_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_db = snapshot(lab, tmp_path / "base.db")
    base = parse_snapshot_status(subprocess.run(
        [str(find_etcd_bins(None) / "etcdutl"), "snapshot", "status", str(base_db), "-w", "json"],
        capture_output=True, text=True, check=True).stdout).revision
    watch = subprocess.Popen([str(_etcdctl()), "watch", "--prefix", "", f"--rev={base + 1}", "--prev-kv", "-w", "json"],
                             env=lab.etcdctl_env(), stdout=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: [lines.append((time.time(), ln)) for ln in watch.stdout], daemon=True)
    reader.start()
    try:
        points = {}
        long = lease_id(ctl("lease", "grant", "600").stdout)  # granted after the full snapshot
        for i in range(0, 40, 3):
            ctl("put", f"/registry/base/{i:03d}", f"over{i}")
        ctl("put", "--lease=" + long, "/registry/events/e1", "event")
        points["overwrites"] = revision(lab)
        ctl("del", "/registry/base/01", "--prefix")  # one revision deleting ten keys
        subprocess.run([str(_etcdctl()), "txn"], input="\nput /registry/new/a A\nput /registry/new/b B\n"
                       "del /registry/base/002\n\n\n", env=lab.etcdctl_env(), check=True, capture_output=True, text=True)
        points["deletes"] = revision(lab)
        gone = lease_id(ctl("lease", "grant", "600").stdout)
        ctl("put", "--lease=" + gone, "/registry/events/e2", "event2")
        ctl("lease", "revoke", gone)  # its key goes as a DELETE event
        ctl("put", "/registry/base/003", "again")
        ctl("del", "/registry/new/a")
        points["revoked"] = revision(lab)
        expected = {name: keyspace(ctl("get", "", "--prefix", "-w", "json", f"--rev={r}").stdout)
                    for name, r in points.items()}
        deadline = time.monotonic() + 20
        while not any(f'"revision":{points["revoked"]}' in ln for _, ln in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        watch.terminate()
        watch.wait(10)

    rec = Recorder(last=base, flush_seconds=0.5)
    segments = []
    ttls = {int(long, 16): 600}
    for at, ln in lines:
        rec.take(parse_watch(ln, at))
        if rec.due(at + 1):
            segments.append(rec.cut(ttl_of=lambda ids: {i: ttls[i] for i in ids if i in ttls})[:2])
    if (last := rec.cut(ttl_of=lambda ids: {i: ttls[i] for i in ids if i in ttls})):
        segments.append(last[:2])
    history = [decode_segment(name, data) for name, data in segments]
    assert history[-1].revisions[-1].rev == points["revoked"]

    bins = find_etcd_bins(None)
    for name, point in points.items():
        fold = Fold(base)
        for seg in history:
            for r in seg.revisions:
                if r.rev <= point:
                    fold.add(r)
        assert fold.reached == point
        with scratch_etcd(str(base_db), bins) as drill:
            with kept_alive(drill["endpoint"]) as alive:
                time.sleep(7)  # longer than the short lease's TTL
                apply_fold(drill["endpoint"], fold, {k: v for s in history for k, v in s.lease_ttls.items()}, alive)
                got = subprocess.run([str(bins / "etcdctl"), "get", "", "--prefix", "-w", "json"],
                                     env=drill["env"], capture_output=True, text=True, check=True).stdout
            assert keyspace(got) == expected[name], name
    # Without the keep-alive the 5 s lease expires in the scratch etcd and takes its key: the
    # replay sees the revision move under it and refuses, rather than give a wrong keyspace.
    with scratch_etcd(str(base_db), bins) as drill:
        time.sleep(9)
        with pytest.raises(NovaDRError, match="not the full snapshot's"):
            apply_fold(drill["endpoint"], fold, {}, set())
    keeper.terminate()
    keeper.wait(10)
    restored = keyspace(got)
    assert restored[base64.b64encode(b"/registry/events/e1").decode()][1] == int(long, 16)  # its own lease, granted
    assert base64.b64encode(b"/registry/events/e2").decode() not in restored  # revoked before the point


def _status(lab) -> list[dict]:
    return json.loads(lab.etcdctl("endpoint", "status", "-w", "json").stdout)


def _txns(lab, tag: str, n: int) -> None:
    """n revisions: puts, overwrites and a delete in each, the way controllers write."""
    for i in range(n):
        body = f"put /registry/pods/{tag}-{i % 7} v{i}\nput /registry/leases/{tag} t{i}\ndel /registry/pods/{tag}-{(i + 3) % 7}\n"
        subprocess.run([str(_etcdctl()), "txn"], input=f"\n{body}\n\n", env=lab.etcdctl_env(), check=True,
                       capture_output=True, text=True, timeout=30)


def test_the_capture_resumes_from_the_store_across_a_leader_change_a_restart_and_a_kill(lab_factory, tmp_path):
    from core.history import HistoryError, chain_from
    from tasks.capture import Stopped, capture, lease_ttls
    from tasks.etcd import read_etcd_env
    from tasks.remote import connect

    lab = lab_factory(3)
    if not lab.real_hosts():
        pytest.skip("a member restart needs the masters as real hosts (systemd)")
    cluster = lab.cluster()
    by_id = {}
    for s in _status(lab):
        by_id[s["Status"]["header"]["member_id"]] = next(m for m in cluster.masters if m.client_url == s["Endpoint"])
    leader_id = _status(lab)[0]["Status"]["leader"]
    followers = [m for i, m in by_id.items() if i != leader_id]
    _txns(lab, "0", 3)  # a fresh store's revision 1 has no event: the history starts after a write
    base_db = snapshot(lab, tmp_path / "base.db", followers[0].etcd_member)
    base = parse_snapshot_status(subprocess.run(
        [str(find_etcd_bins(None) / "etcdutl"), "snapshot", "status", str(base_db), "-w", "json"],
        capture_output=True, text=True, check=True).stdout).revision
    stored: dict[str, bytes] = {}
    killed = threading.Event()

    def write(name, data, revs):
        if not killed.is_set():  # a killed capture's last writes never land
            stored[name] = data

    def newest() -> int:
        return chain_from(base, list(stored)).reaches

    def start(member, flush_seconds=0.3):
        m = cluster.master(member)
        conn = connect(cluster, m)
        env = read_etcd_env(conn, m)
        stop, ended = threading.Event(), []
        rec = Recorder(newest(), flush_seconds=flush_seconds)

        def go():
            try:
                capture(conn, m, env, rec, write, stop, lease_ttls(conn, m, env))
            except (Stopped, NovaDRError) as err:  # HistoryError is a NovaDRError too
                ended.append(err)
            finally:
                conn.close()

        t = threading.Thread(target=go, daemon=True)
        t.start()
        return stop, t, ended

    def caught_up(timeout=30):
        want = revision(lab)
        deadline = time.monotonic() + timeout
        while newest() < want and time.monotonic() < deadline:
            time.sleep(0.1)
        assert newest() >= want, (newest(), want, ended)

    points = {}
    watched = followers[0].etcd_member
    stop, t, ended = start(watched)
    _txns(lab, "a", 15)
    points["before the leader moved"] = revision(lab)
    new_leader = followers[1]
    new_id = next(i for i, m in by_id.items() if m is new_leader)
    # etcdctl 3.5.1's move-leader reads the ETCDCTL_* variables twice and dies of the conflict:
    # its TLS settings go as flags instead.
    env = lab.etcdctl_env()
    tls = [f"--{k.removeprefix('ETCDCTL_').lower()}={env.pop(k)}" for k in ("ETCDCTL_CACERT", "ETCDCTL_CERT", "ETCDCTL_KEY")]
    env.pop("ETCDCTL_ENDPOINTS")
    moved = subprocess.run([str(_etcdctl()), *tls, f"--endpoints={by_id[leader_id].client_url}", "move-leader",
                            f"{int(new_id):x}"], env=env, capture_output=True, text=True, timeout=30)
    assert moved.returncode == 0, moved.stderr
    _txns(lab, "b", 15)
    caught_up()
    assert t.is_alive(), ended  # the follower's watch went on across the leader change
    lab.in_master(watched, "systemctl", "restart", "etcd")
    _txns(lab, "c", 15)
    points["after a member restart"] = revision(lab)
    # etcd's client on the master re-dials its member and resumes the watch from the revision
    # after the last it received (measured: it does); a capture whose watch ended instead
    # resumes from the store on another member. Either way nothing may be lost.
    deadline = time.monotonic() + 60
    while t.is_alive() and newest() < points["after a member restart"] and time.monotonic() < deadline:
        time.sleep(0.2)
    if not t.is_alive():
        assert "the watch ended" in str(ended[0]), ended
        stop, t, ended = start(by_id[leader_id].etcd_member)
    caught_up()
    stop.set()
    t.join(30)
    stop, t, ended = start(by_id[leader_id].etcd_member)  # resumes from the store, on another member
    _txns(lab, "c2", 5)
    caught_up()
    # Killed: what it held is lost with it; the next capture starts from what the store has.
    killed.set()
    _txns(lab, "d", 10)
    time.sleep(0.5)
    stop.set()
    t.join(30)
    killed.clear()
    stop, t, ended = start(watched, flush_seconds=0.3)
    _txns(lab, "e", 10)
    points["after the kill"] = revision(lab)
    caught_up()
    stop.set()
    t.join(30)

    segs = sorted(stored, key=lambda n: n)
    revs = [r for n in segs for r in decode_segment(n, stored[n]).revisions]
    assert [r.rev for r in revs] == list(range(base + 1, points["after the kill"] + 1))  # none lost, none twice

    expected = {p: keyspace(lab.etcdctl("get", "", "--prefix", "-w", "json", f"--rev={r}").stdout)
                for p, r in points.items()}
    bins = find_etcd_bins(None)
    for p, r in points.items():
        fold = Fold(base)
        for rv in revs:
            if rv.rev <= r:
                fold.add(rv)
        with scratch_etcd(str(base_db), bins) as drill:
            with kept_alive(drill["endpoint"]) as alive:
                apply_fold(drill["endpoint"], fold, {}, alive)
            got = subprocess.run([str(bins / "etcdctl"), "get", "", "--prefix", "-w", "json"],
                                 env=drill["env"], capture_output=True, text=True, check=True).stdout
        assert keyspace(got) == expected[p], p

    # A compaction that overtakes a stopped capture is a gap, said as one.
    _txns(lab, "f", 5)
    lab.etcdctl("compact", str(revision(lab)))
    stop, t, ended = start(watched)
    t.join(30)
    assert ended and isinstance(ended[0], HistoryError) and "compacted its history" in str(ended[0]), ended
