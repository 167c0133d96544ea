"""restore-etcd-cluster on the lab: real etcd 3.5 with TLS, over real SSH, through Prefect's server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows import machinery
from flows.restore import restore_etcd_cluster
from tasks.remote import connect
from tests.helpers import REPO, keys_on, put_keys, snapshot


def error_of(state) -> str:
    try:
        state.result()
    except Exception as err:
        return str(err)
    return ""


def prepare_lab(lab, tmp_path: Path, name: str = "snapshot.db") -> tuple[Path, list[str]]:
    """Keys, a snapshot, then more keys that the restore must remove."""
    put_keys(lab, "/registry/pods/p", 300)
    snap = snapshot(lab, tmp_path / name)
    expected = keys_on(lab, "etcd1")
    put_keys(lab, "/later/k", 40)
    return snap, expected


def assert_restored(lab, expected: list[str]) -> None:
    for m in lab.masters():
        got = keys_on(lab, m.member)
        assert got == expected, f"{m.member} serves {len(got)} keys, expected {len(expected)}"
        assert not any(k.startswith("/later/") for k in got)


def quarantines(lab, member: str) -> list[Path]:
    return sorted(Path(lab.master(member).data_dir_host).glob("nova-dr-quarantine-*"))


def fingerprint(lab) -> dict:
    """What 'nothing changed' means on a master: processes, data dir entries, files we edit."""
    out = {}
    cluster = lab.cluster()
    for m in lab.masters():
        conn = connect(cluster, cluster.master(m.member))
        out[m.member] = (
            lab.etcd_pid(m.member),
            sorted(p.name for p in Path(m.data_dir_host).iterdir()) if Path(m.data_dir_host).exists() else None,
            conn.run(["sh", "-c", "sha256sum /etc/etcd.env; ls /etc/kubernetes/manifests"]).stdout,
        )
        conn.close()
    return out


@pytest.mark.parametrize("n", [1, 3, 5])
def test_full_restore(lab_factory, tmp_path, n):
    lab = lab_factory(n)
    snap, expected = prepare_lab(lab, tmp_path)
    if n == 1:
        lab.break_member("etcd1", "corrupt")
    else:  # two of three lost (one corrupt, one wiped; etcd3 is the mount-point master), or three of five
        lab.break_member("etcd2", "corrupt")
        lab.break_member(f"etcd{n}", "wipe")
        if n == 5:
            lab.break_member("etcd3", "stop")
    state = restore_etcd_cluster(inventory=str(lab.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True,
                                 return_state=True)
    assert state.is_completed(), error_of(state)
    assert_restored(lab, expected)
    assert all(r["healthy"] for r in lab.status())
    result = state.result()
    v = result["verify"]
    assert len({r["hashkv"] for r in v["rows"]}) == 1 and sum(r["leader"] for r in v["rows"]) == 1
    assert {r["live_keys"] for r in v["rows"]} == {len(expected)}
    # Old data kept: the corrupt db is in quarantine, on the data dir's own filesystem.
    corrupt = "etcd1" if n == 1 else "etcd2"
    q = quarantines(lab, corrupt)
    assert len(q) == 1 and (q[0] / "member/snap/db").stat().st_size == 4096
    assert result["quarantine"][corrupt] == "/var/lib/etcd/" + q[0].name
    if n >= 3:
        assert lab.master(f"etcd{n}").mount_point and quarantines(lab, f"etcd{n}") == []  # wiped: nothing to keep
        assert len(quarantines(lab, "etcd1")) == 1  # a healthy member's data is kept too
    # The kube-apiserver manifest is back in place.
    cluster = lab.cluster()
    assert "kube-apiserver.yaml" in connect(cluster, cluster.masters[0]).run(["ls", "/etc/kubernetes/manifests"]).stdout


def _start_in_subprocess(lab, snap: Path, log: Path) -> subprocess.Popen:
    code = ("from flows.restore import restore_etcd_cluster as f; "
            f"f(inventory={str(lab.dir / 'inventory.yaml')!r}, snapshot={str(snap)!r}, auto_approve=True)")
    out = open(log, "wb")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True, stdout=out, stderr=out)


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _kill_and_release(proc: subprocess.Popen, holds: list[Path]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for h in holds:  # the held remote commands give up instead of running late
        Path(f"{h}.abort").touch()
    _wait_for(lambda: not any(Path(f"{h}.reached").exists() for h in holds), 20, "held commands to abort")
    for h in holds:
        h.unlink()
        Path(f"{h}.abort").unlink()


@pytest.mark.parametrize("where", ["after-quarantine", "mid-restores"])
def test_resume_after_the_process_is_killed(lab3, tmp_path, where):
    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd3", "wipe")
    if where == "after-quarantine":  # every swap done; the run dies while starting etcd
        holds = [lab3.hold(m.member, "systemctl-start") for m in lab3.masters()]
    else:  # etcd1 and etcd3 restored into staging; etcd2's restore never finishes
        holds = [lab3.hold("etcd2", "etcdutl-snapshot-restore")]
    proc = _start_in_subprocess(lab3, snap, tmp_path / "first-run.log")
    _wait_for(lambda: all(Path(f"{h}.reached").exists() for h in holds) or proc.poll() is not None, 180, "the hold")
    assert proc.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
    if where == "after-quarantine":
        assert all(len(quarantines(lab3, m)) == 1 for m in ("etcd1", "etcd2"))
    _kill_and_release(proc, holds)
    state = restore_etcd_cluster(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True,
                                 return_state=True)
    assert state.is_completed(), error_of(state)
    assert_restored(lab3, expected)
    # The re-run did not quarantine what the first run had restored: one quarantine each, old data in it.
    for m in ("etcd1", "etcd2"):
        q = quarantines(lab3, m)
        assert len(q) == 1 and (q[0] / "member").is_dir()
    assert (quarantines(lab3, "etcd1")[0] / "member/snap/db").stat().st_size == 4096


def _staging_lock_waiters(lab, member: str) -> int:
    """`flock` processes waiting for a staging lock on that master (its own network namespace)."""
    ns = os.readlink(f"/proc/{lab.sshd_pid(member)}/ns/net")
    n = 0
    for d in Path("/proc").iterdir():
        try:
            if (d.name.isdigit() and os.readlink(d / "ns/net") == ns
                    and (d / "cmdline").read_bytes().split(b"\0")[0].endswith(b"flock")):
                ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[1]
                n += b"staging.lock" in Path(f"/proc/{ppid}/cmdline").read_bytes()
        except OSError:
            continue
    return n


def test_a_rerun_waits_for_the_restore_a_killed_run_left_running(lab3, tmp_path):
    """sshd does not stop a command whose client went away: the killed run's restore on etcd2
    goes on, late. The re-run must wait for it to end, not clear the dir under it or restore
    beside it into the same dir (the trace shows when each call ran)."""
    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    hold = lab3.hold("etcd2", "etcdutl-snapshot-restore")
    trace, late = Path(f"{hold}.trace"), Path(f"{hold}.late")
    for f in (trace, late):
        f.touch(mode=0o666)
        f.chmod(0o666)  # the wrapper runs as whoever runs etcdutl there
    try:
        proc = _start_in_subprocess(lab3, snap, tmp_path / "first-run.log")
        _wait_for(lambda: Path(f"{hold}.reached").exists() or proc.poll() is not None, 180, "the hold")
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(state=restore_etcd_cluster(
            inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True, return_state=True)))
        t.start()
        _wait_for(lambda: _staging_lock_waiters(lab3, "etcd2") or trace.read_text().count("arrive") > 1
                  or not t.is_alive(), 180, "the re-run to reach etcd2's restore")
        hold.unlink()  # the orphan goes on, late
        t.join(600)
        assert out["state"].is_completed(), error_of(out["state"])
        assert_restored(lab3, expected)
        calls = [line.split() for line in trace.read_text().splitlines()]
        orphan = calls[0][1]
        # The orphan ran to its end before any call of the re-run even reached etcdutl (without
        # the lock, the re-run's arrived while the orphan was held, and ran beside it).
        assert calls[:3] == [["arrive", orphan], ["start", orphan], ["end", orphan, "0"]], calls
        assert "restored snapshot" in late.read_text()
    finally:
        for f in (hold, trace, late):
            f.unlink(missing_ok=True)


def _run_in_thread(**kw) -> tuple[threading.Thread, dict]:
    out: dict = {}
    ids: list[str] = []
    machinery.GATE_LISTENERS.append(lambda run_id, plan: ids.append(run_id))

    def target():
        out["state"] = restore_etcd_cluster(return_state=True, **kw)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    out["ids"] = ids
    return t, out


def _wait_paused(out: dict, timeout: float = 120) -> str:
    from prefect.client.orchestration import get_client

    _wait_for(lambda: out["ids"] or "state" in out, timeout, "the gate")
    assert "state" not in out, error_of(out["state"])
    run_id = out["ids"][0]
    with get_client(sync_client=True) as client:
        _wait_for(lambda: client.read_flow_run(run_id).state.is_paused(), 60, "the run to pause")
    return run_id


def ssh_sessions(lab) -> dict[str, int]:
    """Connections each master's sshd serves now: the children of its listener."""
    def ppid(d: Path) -> int:
        try:
            return int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0
    procs = [d for d in Path("/proc").iterdir() if d.name.isdigit()]
    listeners = {m.member: lab.sshd_pid(m.member) for m in lab.masters()}
    return {m: sum(ppid(d) == pid for d in procs) for m, pid in listeners.items()}


def _answer(run_id: str, approve: bool) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        res = client.resume_flow_run(run_id, run_input={"approve": approve, "name": "test-sre", "reason": "test"})
    assert str(res.status.value).upper() == "ACCEPT", res


@pytest.fixture
def clean_listeners():
    yield
    machinery.GATE_LISTENERS.clear()


def test_gate_reject_changes_nothing_then_approve_proceeds(lab3, tmp_path, clean_listeners):
    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd2", "corrupt")
    lab3.break_member("etcd3", "wipe")
    before = fingerprint(lab3)
    inv = str(lab3.dir / "inventory.yaml")
    t, out = _run_in_thread(inventory=inv, snapshot=str(snap))
    _answer(_wait_paused(out), approve=False)
    t.join(60)
    assert "plan rejected by test-sre: test; nothing was changed" in error_of(out["state"])
    assert fingerprint(lab3) == before
    machinery.GATE_LISTENERS.clear()
    idle = ssh_sessions(lab3)  # the test's own connections stay open
    t, out = _run_in_thread(inventory=inv, snapshot=str(snap))
    run_id = _wait_paused(out)
    # While it waits for a human, the run holds no SSH connection to any master.
    _wait_for(lambda: all(n <= idle[m] for m, n in ssh_sessions(lab3).items()), 10,
              f"the run's connections to close: sessions now {ssh_sessions(lab3)}, before the run {idle}")
    _answer(run_id, approve=True)
    t.join(180)
    assert out["state"].is_completed(), error_of(out["state"])
    assert out["state"].result()["approval"] == {"approved_by": "test-sre", "reason": "test", "via": machinery.UI_OR_API}
    assert_restored(lab3, expected)


def test_two_approvers_must_be_two_people(lab3, tmp_path, clean_listeners):
    """approvals_required=2: the same name twice is refused with nothing changed; two names
    proceed, and the report names both, with how each answered."""
    from prefect.client.orchestration import get_client

    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd2", "wipe")
    before = fingerprint(lab3)
    inv = str(lab3.dir / "inventory.yaml")

    def answer(run_id: str, name: str, via: str = "") -> None:
        with get_client(sync_client=True) as client:
            _wait_for(lambda: client.read_flow_run(run_id).state.is_paused(), 60, "the run to pause")
            res = client.resume_flow_run(run_id, run_input={"approve": True, "name": name, "reason": "INC-7",
                                                            "via": via})
        assert str(res.status.value).upper() == "ACCEPT", res

    t, out = _run_in_thread(inventory=inv, snapshot=str(snap), approvals_required=2)
    run_id = _wait_paused(out)
    answer(run_id, "alice")
    _wait_for(lambda: len(out["ids"]) == 2 or "state" in out, 60, "the second gate")
    answer(run_id, "Alice ")
    t.join(60)
    assert "came from 'Alice ', who is not a new person: this plan needs 2 different names" in error_of(out["state"])
    assert fingerprint(lab3) == before
    machinery.GATE_LISTENERS.clear()
    t, out = _run_in_thread(inventory=inv, snapshot=str(snap), approvals_required=2)
    run_id = _wait_paused(out)
    answer(run_id, "alice")
    _wait_for(lambda: len(out["ids"]) == 2 or "state" in out, 60, "the second gate")
    answer(run_id, "bob", via="`nova-dr approve` (bob@desk)")
    t.join(180)
    assert out["state"].is_completed(), error_of(out["state"])
    assert out["state"].result()["approval"] == {"approved_by": "alice and bob", "reason": "INC-7; INC-7",
                                                 "via": f"{machinery.UI_OR_API}; `nova-dr approve` (bob@desk)"}
    assert_restored(lab3, expected)


def test_changed_facts_after_approval_stop_the_run(lab3, tmp_path, clean_listeners):
    snap, _ = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd2", "wipe")
    t, out = _run_in_thread(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap))
    run_id = _wait_paused(out)
    cluster = lab3.cluster()
    conn = connect(cluster, cluster.masters[0])  # someone moves etcd1's manifest away meanwhile
    conn.run(["mv", "/etc/kubernetes/manifests/kube-apiserver.yaml", "/root-kube-apiserver.yaml"])
    before = fingerprint(lab3)
    _answer(run_id, approve=True)
    t.join(60)
    assert "the cluster changed while the plan waited for approval" in error_of(out["state"])
    assert "park-manifest@etcd1" in error_of(out["state"])
    assert fingerprint(lab3) == before


def test_refusals_change_nothing(lab3, tmp_path, clean_listeners):
    snap, _ = prepare_lab(lab3, tmp_path, name="etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-11-27_040000.db")
    lab3.break_member("etcd2", "corrupt")
    inv = str(lab3.dir / "inventory.yaml")
    before = fingerprint(lab3)

    def refused(snapshot: Path, **kw) -> str:
        state = restore_etcd_cluster(inventory=inv, snapshot=str(snapshot), auto_approve=True, return_state=True, **kw)
        assert not state.is_completed()
        return error_of(state)

    bad = bytearray(snap.read_bytes())
    bad[len(bad) // 2] ^= 0x01
    flipped = tmp_path / "flipped" / snap.name
    flipped.parent.mkdir()
    flipped.write_bytes(bad)
    assert "sha256 trailer does not match" in refused(flipped)

    listed = tmp_path / "listed" / snap.name
    listed.parent.mkdir()
    listed.write_bytes(snap.read_bytes())
    (listed.parent / "nova-dr-manifest_2026-11-27_040000.json").write_text(
        '{"files": {"%s": {"sha256": "%s"}}}' % (snap.name, hashlib.sha256(b"other").hexdigest()))
    assert "sha256 differs from its manifest" in refused(listed)

    other = tmp_path / "etcd_snapshot_nova-v6.0.2_k8s-v1.27.11_2026-11-27_040000.db"
    other.write_bytes(snap.read_bytes())
    assert "made by Nova 6.0.2, the cluster runs 6.0.1" in refused(other)

    # A second recovery while one holds the cluster (paused at its gate) is refused, naming it.
    t, out = _run_in_thread(inventory=inv, snapshot=str(snap))
    holder = _wait_paused(out)
    msg = refused(snap, wait_for_cluster_seconds=2)
    assert "another recovery holds it" in msg and holder in msg
    _answer(holder, approve=False)
    t.join(60)
    assert fingerprint(lab3) == before

    lab3.stop_sshd("etcd3")  # etcd3 unreachable over SSH
    msg = refused(snap)
    assert "etcd3 unreachable over SSH" in msg and "nova-master-3.lab.local" in msg


def _inventory_with(lab, tmp_path: Path, member: str, **changes) -> str:
    """The lab's inventory with one master's entries changed (paths as a dict)."""
    import yaml

    inv = yaml.safe_load((lab.dir / "inventory.yaml").read_text())
    for k in ("private_key_file", "known_hosts_file"):  # relative to the lab's folder
        inv["ssh"][k] = str(lab.dir / inv["ssh"][k])
    m = next(x for x in inv["masters"] if x["etcd_member"] == member)
    m.update(changes)
    out = tmp_path / f"inventory-{member}-{'-'.join(changes)}.yaml"
    out.write_text(yaml.safe_dump(inv))
    return str(out)


@pytest.mark.parametrize("change, expected", [
    ({"paths": {"data_dir": "/var/lib/etcd-old"}},
     "etcd3 (/etc/etcd.env): ETCD_DATA_DIR='/var/lib/etcd' but the inventory says paths.data_dir '/var/lib/etcd-old'"),
    ({"peer_url": "https://{addr}:2390"},
     "ETCD_INITIAL_ADVERTISE_PEER_URLS='https://{addr}:2380' but the inventory says peer_url 'https://{addr}:2390'"),
])
def test_an_inventory_that_differs_from_a_masters_env_file_is_refused_before_the_gate(lab3, tmp_path, change,
                                                                                      expected):
    snap, _ = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd2", "wipe")
    addr = lab3.master("etcd3").address
    change = {k: v.format(addr=addr) if isinstance(v, str) else v for k, v in change.items()}
    inv = _inventory_with(lab3, tmp_path, "etcd3", **change)
    before = fingerprint(lab3)
    state = restore_etcd_cluster(inventory=inv, snapshot=str(snap), auto_approve=True, return_state=True)
    msg = error_of(state)
    assert not state.is_completed() and expected.format(addr=addr) in msg, msg
    assert "the inventory does not match the masters" in msg and "nothing was changed" in msg
    assert fingerprint(lab3) == before


def test_a_member_named_otherwise_in_the_inventory_is_refused_by_every_recovery(lab3, tmp_path):
    from flows.member import replace_etcd_member, restart_etcd_member

    lab3.break_member("etcd2", "stop")
    # etcd3 listed as "etcd9": a replacement would `member remove` a member that does not exist
    # and start etcd3 under another name.
    inv = _inventory_with(lab3, tmp_path, "etcd3", etcd_member="etcd9")
    before = fingerprint(lab3)
    for f, kw in ((replace_etcd_member, {"member": "etcd2"}), (restart_etcd_member, {"member": "etcd2"})):
        state = f(inventory=inv, auto_approve=True, return_state=True, **kw)
        assert "ETCD_NAME='etcd3' but the inventory says etcd_member 'etcd9'" in error_of(state), error_of(state)
    assert fingerprint(lab3) == before


def test_what_a_restore_puts_in_place_belongs_to_the_data_dirs_owner(lab3, tmp_path):
    """A `User=etcd` unit cannot start on a member dir that root owns: the restored member dir
    and the quarantine take the data dir's owner (here uid 4243, an "etcd" user of the lab)."""
    snap, expected = prepare_lab(lab3, tmp_path)
    cluster = lab3.cluster()
    for m in cluster.masters:  # as a package would have left it: etcd's data dir, etcd's files
        conn = connect(cluster, m)
        conn.run(["chown", "-R", "4243:4243", m.paths.data_dir])
        conn.run(["chmod", "0700", m.paths.data_dir])
        # "existing", as a member replacement leaves it: the restore must rewrite the env file.
        conn.run(["sed", "-i", "s/^ETCD_INITIAL_CLUSTER_STATE=.*/ETCD_INITIAL_CLUSTER_STATE=existing/",
                  m.paths.etcd_env])
        conn.run(["chown", "4243:4243", m.paths.etcd_env])
        conn.close()
    lab3.break_member("etcd2", "corrupt")
    lab3.break_member("etcd3", "wipe")  # the mount point: its member dir is gone, the data dir stays
    state = restore_etcd_cluster(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True,
                                 return_state=True)
    assert state.is_completed(), error_of(state)
    assert_restored(lab3, expected)
    for lm in lab3.masters():
        member = Path(lm.data_dir_host) / "member"
        # What the restore put there (the lab's etcd runs as root: files it made since are root's).
        ours = [member, member / "snap", member / "snap/db", member / "wal", *(member / "wal").glob("0000000000000000-*")]
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in ours}
        assert len(ours) == 5 and owners == {(4243, 4243)}, (lm.member, owners)
        for q in quarantines(lab3, lm.member):
            assert (q.stat().st_uid, q.stat().st_mode & 0o777) == (4243, 0o700)
        env = Path(lm.node_dir) / "etc.up/etcd.env"
        assert "ETCD_INITIAL_CLUSTER_STATE=new\n" in env.read_text() and env.stat().st_uid == 4243  # rewritten, owner kept


def test_a_write_after_the_start_fails_the_verification_while_every_apiserver_is_parked(lab3, tmp_path,
                                                                                     clean_listeners):
    """No client can write while the kube-apiserver manifests are parked: a revision above the
    snapshot's means the members do not serve what was restored. Here a write is slipped in
    between the start and the verification."""
    from tests.helpers import put_keys

    snap, _ = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd2", "wipe")
    starts = [lab3.hold(m.member, "systemctl-start") for m in lab3.masters()]
    t, out = _run_in_thread(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True)
    _wait_for(lambda: all(Path(f"{h}.reached").exists() for h in starts) or "state" in out, 180, "the starts")
    status = lab3.hold("etcd1", "etcdctl-endpoint-status")  # the verification's first read
    for h in starts:
        h.unlink()
    _wait_for(lambda: Path(f"{status}.reached").exists() or "state" in out, 120, "the verification")
    put_keys(lab3, "/intruder/k", 3)
    status.unlink()
    t.join(120)
    msg = error_of(out["state"])
    assert "is above the snapshot's" in msg and "no kube-apiserver runs" in msg, msg
    cluster = lab3.cluster()  # the manifests stay parked: nothing was handed back to clients
    conn = connect(cluster, cluster.masters[0])
    try:
        assert "kube-apiserver.yaml" not in conn.run(["ls", "/etc/kubernetes/manifests"]).stdout
    finally:
        conn.close()


def test_a_df_that_gives_no_number_refuses_the_restore(lab3, tmp_path):
    """busybox's df has no --output: the probe then prints `free=`. That once parsed as 0, and 0
    counted as "not short", so the free-space refusal was skipped."""
    snap, _ = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd2", "wipe")
    df = lab3.first_on_path("etcd3") / "df"
    df.write_text("#!/bin/sh\necho \"df: unrecognized option '--output=avail'\" >&2\nexit 1\n")
    df.chmod(0o755)
    before = fingerprint(lab3)
    state = restore_etcd_cluster(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True,
                                 return_state=True)
    msg = error_of(state)
    assert "cannot read the free disk space of the data dir on etcd3" in msg and "nothing was changed" in msg, msg
    assert fingerprint(lab3) == before


def test_a_full_disk_during_the_staging_restore_stops_nothing_and_leaves_no_partial_copy(lab3, tmp_path):
    """A real ENOSPC: a small tmpfs over etcd2's work dir holds the snapshot, not its restore
    (etcd preallocates 64 MB of WAL)."""
    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    cluster = lab3.cluster()
    rid = machinery.derive_recovery_id("restore-etcd-cluster", cluster.name,
                                       hashlib.sha256(snap.read_bytes()).hexdigest(), None)
    work = f"/var/lib/etcd/nova-dr-{rid}"
    ns = lab3.enter("etcd2")  # inside etcd2's own mount namespace
    subprocess.run(ns + ["sh", "-c", f'mkdir -p "$1" && mount -t tmpfs -o size={snap.stat().st_size + (1 << 20)} '
                    'tmpfs "$1"', "sh", work], check=True)
    try:
        etcd2 = lab3.etcd_pid("etcd2")
        state = restore_etcd_cluster(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap),
                                     auto_approve=True, return_state=True)
        msg = error_of(state)
        assert not state.is_completed() and "restore-staging@etcd2" in msg and "no space left" in msg.lower(), msg
        left = subprocess.run(ns + ["ls", "-A", work], capture_output=True, text=True, check=True).stdout.split()
        assert left == ["snapshot.db", "staging.lock"], left  # the partial staging.tmp is gone at once
        assert lab3.etcd_pid("etcd2") == etcd2 and all(r["etcd_process"] for r in lab3.status()
                                                        if r["member"] != "etcd1")  # nothing stopped
        _checkpoints_hold_plain_data_only("no space left")
    finally:
        subprocess.run(ns + ["umount", work], check=True)
    # With room again, a plain re-run finishes.
    state = restore_etcd_cluster(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True,
                                 return_state=True)
    assert state.is_completed(), error_of(state)
    assert_restored(lab3, expected)


def _checkpoints_hold_plain_data_only(error_text: str) -> None:
    """What a run leaves in NOVA_DR_HOME: a 0700 dir; JSON, never pickle (a checkpoint read back
    must not be able to run code); a failed step's error by its type, not its message (remote
    argv and output)."""
    home = machinery.state_dir()
    assert (home.stat().st_mode & 0o777) == 0o700 and ((home / "checkpoints").stat().st_mode & 0o777) == 0o700
    files = list((home / "checkpoints").iterdir())
    assert files
    for f in files:
        doc = json.loads(f.read_text())
        assert doc["metadata"]["serializer"]["type"] == "json", f
        assert error_text not in f.read_text().lower(), f


def test_a_member_that_does_not_start_after_the_swap_is_named_with_its_journal(lab3, tmp_path, clean_listeners):
    snap, _ = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "wipe")
    starts = [lab3.hold(m.member, "systemctl-start") for m in lab3.masters()]
    t, out = _run_in_thread(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True)
    _wait_for(lambda: all(Path(f"{h}.reached").exists() for h in starts) or "state" in out, 180, "the starts")
    # The restored data on etcd2 breaks between its swap and its start.
    (Path(lab3.master("etcd2").data_dir_host) / "member/snap/db").write_bytes(b"\0" * 4096)
    for h in starts:
        h.unlink()
    t.join(180)
    msg = error_of(out["state"])
    assert "start-etcd@etcd2" in msg and "etcd2 did not start with the restored data" in msg, msg
    assert "Last log lines:" in msg and "nova-dr-quarantine-" in msg and "recovery_id=" in msg


def test_an_approval_that_never_comes_changes_nothing(lab3, tmp_path, clean_listeners):
    from tests.test_lock_resume import holders

    snap, _ = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd3", "wipe")
    before = fingerprint(lab3)
    t, out = _run_in_thread(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(snap),
                            approval_timeout_minutes=0.1)
    _wait_paused(out)
    t.join(120)
    msg = error_of(out["state"])
    assert "no approval within 0.1 min; nothing was changed" in msg, msg
    assert fingerprint(lab3) == before
    assert set(holders(lab3).values()) == {None}  # the cluster is free again


def test_a_rerun_after_a_hand_repair_is_refused_and_a_plain_resume_lists_what_it_skips(lab3, tmp_path):
    """A restore fails after it stopped every member, before any swap; an operator starts them
    again by hand. The re-run (same snapshot, same recovery id) must not skip those stops."""
    from tests.test_lock_resume import hold, reached

    snap, _ = prepare_lab(lab3, tmp_path)
    inv = str(lab3.dir / "inventory.yaml")
    members = [m.member for m in lab3.masters()]
    stops = [hold(lab3, m, "systemctl-stop") for m in members]
    out: list = []
    t = threading.Thread(target=lambda: out.append(restore_etcd_cluster(inventory=inv, snapshot=str(snap),
                                                                         auto_approve=True, return_state=True)))
    t.start()
    # the followers' stops are held; the leader's waits for theirs
    _wait_for(lambda: sum(reached([h]) for h in stops) == len(stops) - 1, 120, "the followers' stops to be held")
    reads = [hold(lab3, m, "cat-/etc/etcd.env-") for m in members]  # set-state-new reads the env file
    for r in reads:
        Path(f"{r}.abort").touch()
    for h in stops:
        h.unlink()
    t.join(300)
    assert "set-state-new@" in error_of(out[0]), error_of(out[0])
    for r in reads:
        Path(f"{r}.abort").unlink()
        r.unlink()
    assert [lab3.etcd_pid(m) for m in members] == [0, 0, 0]
    cluster = lab3.cluster()

    def service(m: str, what: str) -> None:  # by hand, on every master at once (quorum)
        connect(cluster, cluster.master(m)).run(getattr(cluster.master(m).paths, f"service_{what}"))

    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda m: service(m, "start"), members))
    lab3.wait_healthy()
    before = fingerprint(lab3)
    msg = error_of(restore_etcd_cluster(inventory=inv, snapshot=str(snap), auto_approve=True, return_state=True))
    assert "stop-etcd@etcd1: an earlier run of this recovery stopped etcd on etcd1" in msg, msg
    assert "recovery_id=NEW" in msg and "Nothing was changed" in msg
    assert fingerprint(lab3) == before
    # stopped again, the same state is a plain resume: the stops are skipped, and said so
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda m: service(m, "stop"), members))
    state = restore_etcd_cluster(inventory=inv, snapshot=str(snap), auto_approve=True, return_state=True)
    assert state.is_completed(), error_of(state)
    assert set(state.result()["resumed_steps"]) >= {f"stop-etcd@{m}" for m in members}


def test_a_restore_from_an_archive_sends_the_compressed_bytes_and_unpacks_them_on_each_master(lab3, tmp_path):
    """A set's etcd archive crosses the flow machine's link as it is (gzip), once per master,
    and is unpacked there: half the bytes of three plain .db copies, or fewer."""
    import tarfile

    from lab.links import link_bytes

    for i in range(24):  # ~2.4 MB of objects that compress as Kubernetes objects do
        lab3.etcdctl("put", f"/registry/configmaps/big-{i}",
                     "".join(f'{{"name":"cm-{i}-{j}","uid":"{os.urandom(8).hex()}"}}' for j in range(2000)))
    db, expected = prepare_lab(lab3, tmp_path, "etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-12-03_101010.db")
    archive = tmp_path / f"{db.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(db, arcname=f"./{db.name}")  # "./x.db": the remote tar must be given the name as spelled
    size = db.stat().st_size
    assert archive.stat().st_size < size / 3 and size > 1 << 20  # else the test would prove nothing
    db.unlink()  # only the archive is there
    lab3.break_member("etcd2", "corrupt")
    before = link_bytes(lab3.state()["net"])
    state = restore_etcd_cluster(inventory=str(lab3.dir / "inventory.yaml"), snapshot=str(archive),
                                 auto_approve=True, return_state=True)
    crossed = link_bytes(lab3.state()["net"]) - before
    assert state.is_completed(), error_of(state)
    assert_restored(lab3, expected)
    assert crossed < 1.5 * size, f"{crossed} bytes crossed the link for a {size}-byte snapshot sent to 3 masters"
    steps = state.result()
    assert steps["verify"]["rows"] and len({r["hashkv"] for r in steps["verify"]["rows"]}) == 1


def test_an_archive_this_machine_has_no_room_to_unpack_is_refused_before_anything(tmp_path):
    """The .db is unpacked on the flow's machine first: its size comes from the archive's first
    header, and a disk without room for it is named in one line (checked on a 1 MiB tmpfs,
    mounted in a mount namespace of the test's own)."""
    import tarfile

    from core.snapshot import unpacked_size

    db = tmp_path / "etcd_snapshot_x.db"
    db.write_bytes(os.urandom(3 << 20))
    archive = tmp_path / "etcd_snapshot_x.db.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(db, arcname="./opt/backup/etcd_snapshot_x.db")
    assert unpacked_size(archive) == 3 << 20 and unpacked_size(db) == 0
    small = tmp_path / "small"
    small.mkdir()
    code = ("import sys; from flows.restore import refuse_no_room; from core.errors import NovaDRError\n"
            "try: refuse_no_room(sys.argv[1], sys.argv[2])\n"
            "except NovaDRError as e: print(e); sys.exit(3)\n")
    p = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"',
                        "sh", str(small), sys.executable, "-c", code, str(small), str(archive)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "MiB free on this machine; unpacking etcd_snapshot_x.db.tar.gz needs about 67 MiB" in p.stdout, p.stdout
    assert "Traceback" not in p.stdout + p.stderr
