"""recover-etcd-space and defragment-etcd: the rules on captured etcdctl output, then the flows
on the lab (real etcd 3.5 with a small --quota-backend-bytes, filled until NOSPACE)."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from core.errors import PreflightError
from core.etcd import parse_alarm_list, parse_endpoint_status, parse_health_errors
from core.inventory import parse_inventory
from core.space import DEFAULT_QUOTA, SpaceRow, build_defrag_plan, build_space_plan, quota_bytes, rolling_order
from lab.lab import etcd_bin_dir
from tests.helpers import keys_on, put_keys
from tests.test_restore import error_of

CAPTURED = Path(__file__).parent / "captured"
MiB = 1 << 20


# -- the rules, on what etcd 3.5.1 printed -------------------------------------------------

def test_alarms_and_health_as_etcd_prints_them_under_nospace():
    alarms = parse_alarm_list((CAPTURED / "alarm_list_nospace.json").read_text())
    assert [(a.member_id, a.alarm) for a in alarms] == [(13668033151171901709, "NOSPACE"), (185828541645115251, "NOSPACE")]
    assert parse_alarm_list((CAPTURED / "alarm_list_none.json").read_text()) == []
    health = parse_health_errors((CAPTURED / "endpoint_health_nospace.json").read_text())
    assert health["127.0.0.1:23792"] == (False, "Active Alarm(s): NOSPACE NOSPACE ")
    row = SpaceRow(member="etcd2", answers=True, healthy=False, health_error=health["127.0.0.1:23792"][1])
    assert row.up_but_for_alarms  # an alarm is not a dead member
    assert not SpaceRow(member="etcd2", answers=True, health_error="context deadline exceeded").up_but_for_alarms
    st = parse_endpoint_status((CAPTURED / "endpoint_status.json").read_text())[0]
    assert (st.db_size, st.db_size_in_use) == (20480, 16384)


@pytest.mark.parametrize("raw, quota", [("", DEFAULT_QUOTA), ("0", DEFAULT_QUOTA), ("8589934592", 8 << 30),
                                        ("-1", None)])
def test_the_quota_as_etcd_reads_it(raw, quota):
    assert quota_bytes({"ETCD_QUOTA_BACKEND_BYTES": raw} if raw else {}) == quota


def test_a_quota_that_is_no_number_is_named():
    with pytest.raises(PreflightError, match="ETCD_QUOTA_BACKEND_BYTES='8G'"):
        quota_bytes({"ETCD_QUOTA_BACKEND_BYTES": "8G"})


def _cluster():
    return parse_inventory({
        "name": "c", "nova_version": "6.0.1", "k8s_version": "1.27.11", "ssh": {"private_key": "k", "known_hosts": ""},
        "masters": [{"node": f"m{i}", "address": f"10.0.0.{i}", "etcd_member": f"etcd{i}"} for i in (1, 2, 3)],
    }, "t")


def _rows(leader="etcd1", db=200 * MiB, in_use=60 * MiB, free=10 << 30, **over):
    rows = []
    for i in (1, 2, 3):
        m = f"etcd{i}"
        kw = dict(member=m, answers=True, healthy=True, leader=m == leader, member_id=i, db_size=db, in_use=in_use,
                  free_bytes=free)
        kw.update(over.get(m, {}))
        rows.append(SpaceRow(**kw))
    return rows


NOSPACE = parse_alarm_list((CAPTURED / "alarm_list_nospace.json").read_text())


def test_the_space_plan_rolls_followers_first_and_disarms_last():
    plan = build_space_plan(_cluster(), _rows(leader="etcd2"), NOSPACE, 256 * MiB, "r1")
    ids = [s.id for s in plan.steps]
    assert ids == ["compact", "defrag@etcd1", "check-fits", "defrag@etcd3", "defrag@etcd2", "disarm", "prove-write",
                   "verify"]
    # one at a time: each step waits for the one before (a chain, no two defragmentations at once)
    assert [s.deps for s in plan.steps[1:]] == [(a,) for a in ids[:-1]]


def test_the_space_plan_refuses_what_it_cannot_fix():
    with pytest.raises(PreflightError, match="CORRUPT: that is not a space problem"):
        build_space_plan(_cluster(), _rows(), [NOSPACE[0].model_copy(update={"alarm": "CORRUPT"})], None, "r")
    with pytest.raises(PreflightError, match="etcd3 is down .*restart-etcd-member"):
        build_space_plan(_cluster(), _rows(etcd3={"answers": False, "health_error": "connection refused"}), NOSPACE,
                         None, "r")
    with pytest.raises(PreflightError, match="etcd2 has 20.0 MiB free, needs 76.0 MiB"):
        build_space_plan(_cluster(), _rows(etcd2={"free_bytes": 20 * MiB}), NOSPACE, None, "r")
    with pytest.raises(PreflightError, match="nothing to recover"):
        build_space_plan(_cluster(), _rows(), [], 2 << 30, "r")


def test_the_defrag_plan_takes_only_members_past_both_thresholds():
    rows = _rows(leader="etcd1", etcd2={"in_use": 190 * MiB}, etcd3={"db_size": 50 * MiB, "in_use": 5 * MiB})
    plan, skipped = build_defrag_plan(_cluster(), rows, [], 0.45, 100 * MiB, "r")
    assert [s.id for s in plan.steps] == ["defrag@etcd1", "verify"]
    assert [s.split(":")[0] for s in skipped] == ["etcd2", "etcd3"] and "5% fragmented" in skipped[0]
    plan, _ = build_defrag_plan(_cluster(), _rows(leader="etcd1"), [], 0.45, 100 * MiB, "r")
    assert [s.id for s in plan.steps] == ["defrag@etcd2", "defrag@etcd3", "defrag@etcd1", "verify"]
    with pytest.raises(PreflightError, match="etcd2 not healthy"):
        build_defrag_plan(_cluster(), _rows(etcd2={"healthy": False}), [], 0.45, 0, "r")
    with pytest.raises(PreflightError, match="active alarms .*recover-etcd-space"):
        build_defrag_plan(_cluster(), _rows(), NOSPACE, 0.45, 0, "r")


def test_rolling_order_keeps_the_inventory_order_for_followers():
    assert [r.member for r in rolling_order(_rows(leader="etcd1"))] == ["etcd2", "etcd3", "etcd1"]


# -- on the lab ------------------------------------------------------------------------------

def _etcdctl(lab, *args, stdin: bytes | None = None, endpoints=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(etcd_bin_dir() / "etcdctl"), *args], input=stdin, capture_output=True,
                          env=lab.etcdctl_env(endpoints), timeout=60)


def _set_quota(lab, quota: int) -> None:
    for m in lab.masters():
        lab.in_master(m.member, "sh", "-c", f"echo ETCD_QUOTA_BACKEND_BYTES={quota} >> /etc/etcd.env && "
                                            "systemctl restart etcd")
        # answering, not healthy: under an alarm no member is
        deadline = time.monotonic() + 60
        while _etcdctl(lab, "endpoint", "status", endpoints=[f"https://{m.address}:2379"]).returncode:
            assert time.monotonic() < deadline, f"{m.member} did not answer after its restart"
            time.sleep(0.5)


def _fill_until_nospace(lab, value: bytes) -> int:
    """Overwrite four keys until etcd refuses: history, which compaction can free."""
    for i in range(400):
        p = _etcdctl(lab, "put", f"/registry/fill/k{i % 4}", stdin=value)
        if p.returncode:
            assert b"database space exceeded" in p.stderr, p.stderr
            return i
    raise AssertionError("etcd never ran out of space")


def _space_state(lab) -> dict:
    """What the flows may change: alarms, each member's file size and compacted revision."""
    alarms = json.loads(_etcdctl(lab, "alarm", "list", "-w", "json").stdout).get("alarms", [])
    hk = json.loads(_etcdctl(lab, "endpoint", "hashkv", "-w", "json").stdout)
    st = json.loads(_etcdctl(lab, "endpoint", "status", "-w", "json").stdout)
    return {"alarms": sorted(a["memberID"] for a in alarms),
            "compacted": sorted(e["HashKV"].get("compact_revision", 0) for e in hk),
            "db": {e["Endpoint"]: e["Status"]["dbSize"] for e in st}}


def _defrag_windows(lab) -> dict[str, tuple[datetime, datetime]]:
    """When each member's etcd says it defragmented (its own log, not our timings)."""
    out = {}
    for m in lab.masters():
        lines = lab.in_master(m.member, "journalctl", "-u", "etcd", "-o", "cat", "--no-pager").stdout.splitlines()
        events = [json.loads(x) for x in lines if x.startswith("{") and "defragmenting" in x]
        start = [e["ts"] for e in events if e["msg"] == "defragmenting"]
        end = [e["ts"] for e in events if e["msg"] == "finished defragmenting directory"]
        if start and end:
            out[m.member] = (datetime.fromisoformat(start[-1].replace("Z", "+00:00")),
                             datetime.fromisoformat(end[-1].replace("Z", "+00:00")))
    return out


def _small_disk(lab, member: str, free: int | None) -> None:
    """A real small filesystem under the member's data dir: a tmpfs inside that master, its data
    copied in with etcd stopped; then resized to leave `free` bytes (None: plenty again)."""
    if free is None:
        lab.in_master(member, "mount", "-o", "remount,size=1g", "/var/lib/etcd")
        return
    lab.in_master(member, "sh", "-c", "systemctl stop etcd && rm -rf /tmp/etcd-copy && cp -a /var/lib/etcd "
                  "/tmp/etcd-copy && mount -t tmpfs -o size=1g,mode=0700 tmpfs /var/lib/etcd && "
                  "cp -a /tmp/etcd-copy/. /var/lib/etcd/ && rm -rf /tmp/etcd-copy && systemctl start etcd")
    used = int(lab.in_master(member, "df", "-B1", "--output=used", "/var/lib/etcd").stdout.split()[-1])
    lab.in_master(member, "mount", "-o", f"remount,size={used + free}", "/var/lib/etcd")


def test_recover_etcd_space_brings_a_full_cluster_back(lab3):
    from flows.lock import ClusterLock
    from flows.space import recover_etcd_space

    if not lab3.real_hosts():
        pytest.skip("needs the real-host lab (systemd, a mount namespace per master)")
    _set_quota(lab3, 16 * MiB)
    put_keys(lab3, "/registry/pods/p", 50)
    value = bytes(range(256)) * 1024  # 256 KiB
    filled = _fill_until_nospace(lab3, value)
    assert _etcdctl(lab3, "put", "/registry/x", "y").returncode != 0  # read-only now
    inv = str(lab3.dir / "inventory.yaml")
    before = _space_state(lab3)
    assert before["alarms"], "no NOSPACE alarm was raised"

    # Refusals change nothing: not enough free disk, a member down, the cluster busy.
    _small_disk(lab3, "etcd3", 2 * MiB)
    state = recover_etcd_space(inventory=inv, auto_approve=True, return_state=True)
    assert "not enough free disk for defragmentation" in error_of(state) and "etcd3 has" in error_of(state), \
        error_of(state)
    assert _space_state(lab3) == before
    _small_disk(lab3, "etcd3", None)
    lab3.break_member("etcd2", "stop")
    state = recover_etcd_space(inventory=inv, auto_approve=True, return_state=True)
    assert "etcd2 is down" in error_of(state) and "nothing was changed" in error_of(state), error_of(state)
    lab3.in_master("etcd2", "systemctl", "start", "etcd")
    other = ClusterLock(lab3.cluster(), "someone-else", "restore-etcd-cluster", ttl=60)
    other.acquire(wait_seconds=0)
    try:
        state = recover_etcd_space(inventory=inv, auto_approve=True, wait_for_cluster_seconds=0, return_state=True)
        assert "someone-else" in error_of(state), error_of(state)
    finally:
        other.release()
    assert _space_state(lab3) == before

    state = recover_etcd_space(inventory=inv, auto_approve=True, return_state=True)
    assert state.is_completed(), error_of(state)
    after = _space_state(lab3)
    assert after["alarms"] == [] and max(after["db"].values()) < min(before["db"].values()) / 2, (before, after)
    assert _etcdctl(lab3, "put", "/registry/x", "y").returncode == 0  # writes again
    for m in ("etcd1", "etcd2", "etcd3"):  # every key is still there, the newest values too
        assert len(keys_on(lab3, m, "/registry/pods/")) == 50 and len(keys_on(lab3, m, "/registry/fill/")) == 4
    got = _etcdctl(lab3, "get", f"/registry/fill/k{(filled - 1) % 4}", "--print-value-only").stdout
    assert got.rstrip(b"\n") == value
    # One member at a time, the leader last: from each etcd's own log.
    windows = _defrag_windows(lab3)
    assert sorted(windows) == ["etcd1", "etcd2", "etcd3"], windows
    spans = sorted(windows.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), windows
    summary = state.result()
    order = [k.split("@")[1] for k in summary["steps"] if k.startswith("defrag@")]
    leader = next(r["member"] for r in summary["before"] if r["leader"])
    assert order[-1] == leader and sorted(order, key=lambda m: windows[m][0]) == order

    # Full of live data this time: compaction frees nothing, and the flow says what to do.
    big = 0
    while big < 400 and _etcdctl(lab3, "put", f"/registry/big/k{big}", stdin=value).returncode == 0:
        big += 1
    assert _space_state(lab3)["alarms"], "no NOSPACE alarm the second time"
    # A quota no larger than the live values alone (an operator lowered it, or the data grew):
    # whatever compaction frees, the defragmented file cannot fit. dbSizeInUse cannot say this:
    # it is stale after a compaction and counts old revisions before one (CI once saw 2 MiB of
    # difference, enough for a quota of 1.02 x dbSizeInUse to fit).
    quota = (big + 4) * len(value)  # the big keys and the four fill keys, newest revisions only
    _set_quota(lab3, quota)
    state = recover_etcd_space(inventory=inv, auto_approve=True, return_state=True)
    msg = error_of(state)
    assert "step check-fits failed" in msg and f"The quota is {quota / MiB:.1f} MiB (ETCD_QUOTA_BACKEND_BYTES" in msg, msg
    assert _space_state(lab3)["alarms"]  # not disarmed: it would be raised again at once
    # The operator raises the quota, as the message says; the same recovery resumes.
    _set_quota(lab3, 64 * MiB)
    state = recover_etcd_space(inventory=inv, auto_approve=True, return_state=True)
    assert state.is_completed(), error_of(state)
    first = [k for k in state.result()["steps"] if k.startswith("defrag@")][0]
    assert set(state.result()["resumed_steps"]) == {"compact", first}, state.result()["resumed_steps"]
    assert _space_state(lab3)["alarms"] == [] and _etcdctl(lab3, "put", "/registry/x", "z").returncode == 0


def _fragment(lab, n: int = 40) -> None:
    """Writes, deletes and a compaction: free pages that only defragmentation gives back."""
    value = bytes(range(256)) * 1024
    for i in range(n):
        assert _etcdctl(lab, "put", f"/registry/tmp/k{i}", stdin=value).returncode == 0
    assert _etcdctl(lab, "del", "/registry/tmp/", "--prefix").returncode == 0
    rev = json.loads(_etcdctl(lab, "endpoint", "status", "-w", "json").stdout)[0]["Status"]["header"]["revision"]
    assert _etcdctl(lab, "compaction", str(rev), "--physical").returncode == 0
    # The freed pages count as free (dbSizeInUse) only after a later write commits: a busy
    # cluster's kube-apiserver writes all the time.
    for i in range(3):
        assert _etcdctl(lab, "put", "/registry/tmp/after", str(i)).returncode == 0
        time.sleep(0.2)


def test_defragment_etcd_shrinks_fragmented_members_and_leaves_others_alone(lab3):
    from flows.lock import ClusterLock
    from flows.space import defragment_etcd

    if not lab3.real_hosts():
        pytest.skip("needs the real-host lab (systemd in each master)")
    inv = str(lab3.dir / "inventory.yaml")
    put_keys(lab3, "/registry/pods/p", 50)
    _fragment(lab3)
    before = _space_state(lab3)
    state = defragment_etcd(inventory=inv, return_state=True)  # defaults: 45% of at least 100 MiB
    assert state.is_completed(), error_of(state)
    assert len(state.result()["skipped"]) == 3 and not state.result()["steps"]
    assert _space_state(lab3) == before  # below the size threshold: left alone
    from tests.test_cli import CLI
    out = subprocess.run([CLI, "plan", "defragment-etcd", "--inventory", inv, "--param", "min_db_size_mb=4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "defrag@etcd1" in out.stdout and "the leader, last" in out.stdout, out
    # Never while another recovery holds the cluster.
    other = ClusterLock(lab3.cluster(), "someone-else", "restore-etcd-cluster", ttl=60)
    other.acquire(wait_seconds=0)
    try:
        state = defragment_etcd(inventory=inv, min_db_size_mb=4, return_state=True)
        assert "someone-else" in error_of(state), error_of(state)
    finally:
        other.release()
    assert _space_state(lab3) == before

    lab3.break_member("etcd2", "stop")
    state = defragment_etcd(inventory=inv, min_db_size_mb=4, return_state=True)
    assert "etcd2 not healthy" in error_of(state) and "nothing was changed" in error_of(state), error_of(state)
    now = _space_state(lab3)["db"]
    assert len(now) == 2 and all(before["db"][e] == size for e, size in now.items()), (before, now)
    lab3.in_master("etcd2", "systemctl", "start", "etcd")
    lab3.wait_healthy(60)

    state = defragment_etcd(inventory=inv, min_db_size_mb=4, return_state=True)
    assert state.is_completed(), error_of(state)
    result = state.result()
    assert sorted(k for k in result["steps"] if k.startswith("defrag@")) == ["defrag@etcd1", "defrag@etcd2",
                                                                              "defrag@etcd3"]
    after = _space_state(lab3)
    assert max(after["db"].values()) < min(before["db"].values()) / 2, (before, after)
    for m in ("etcd1", "etcd2", "etcd3"):
        assert len(keys_on(lab3, m, "/registry/pods/")) == 50
    # Defragmented now: the next run finds nothing past the thresholds.
    state = defragment_etcd(inventory=inv, min_db_size_mb=4, return_state=True)
    assert state.is_completed() and not state.result()["steps"], error_of(state)
