"""Pure domain functions, on output captured from etcdctl 3.5 (tests/captured/)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from core.errors import SnapshotError, UnsafeArchive
from core.etcd import (parse_count_fields, parse_endpoint_health, parse_endpoint_status, parse_env_file,
                       parse_hashkv, parse_member_list, parse_snapshot_status, restore_argv, set_env_var,
                       supports_bump_revision, etcdctl_env)
from core.facts import ClusterFacts, MasterFacts, parse_probe
from core.inventory import parse_inventory
from core.names import parse_name
from core.restore_plan import build_restore_plan
from core.snapshot import db_digest, prepare_snapshot, safe_extract, scan_archive, unpack_db

CAP = Path(__file__).parent / "captured"


def cap(name: str) -> str:
    return (CAP / name).read_text()


def test_parse_endpoint_health_including_a_dead_member():
    assert parse_endpoint_health(cap("endpoint_health.json")) == {
        "https://127.0.0.11:2379": True, "https://127.0.0.12:2379": True, "https://127.0.0.13:2379": True}
    assert parse_endpoint_health(cap("endpoint_health_one_down.json"))["https://127.0.0.12:2379"] is False


def test_parse_endpoint_status_finds_the_leader():
    st = parse_endpoint_status(cap("endpoint_status.json"))
    assert [s.is_leader for s in st] == [True, False, False]
    assert st[0].raft_applied_index == 18 and st[0].revision == 2 and st[0].version == "3.5.1"
    assert len(parse_endpoint_status(cap("endpoint_status_one_down.json"))) == 2


def test_parse_member_list_ids_in_hex():
    ms = parse_member_list(cap("member_list.json"))
    assert [m.name for m in ms] == ["etcd1", "etcd3", "etcd2"]
    assert ms[0].hex_id == "654bfb5171fc88fd" and ms[0].peer_urls == ("https://127.0.0.11:2380",)


def test_parse_snapshot_status_hashkv_and_count():
    # etcdctl's (deprecated) and etcdutl's snapshot status print the same JSON.
    a, b = parse_snapshot_status(cap("snapshot_status.json")), parse_snapshot_status(cap("etcdutl_snapshot_status.json"))
    assert a == b and a.revision == 2 and a.total_key == 9
    assert {h.hash for h in parse_hashkv(cap("endpoint_hashkv.json"))} == {3260193388}
    assert parse_count_fields(cap("count_only_fields.txt")) == 1


def test_env_file_round_trip_keeps_other_lines():
    text = '# comment\nETCD_NAME=etcd1\nexport ETCDCTL_ENDPOINTS="https://a:2379,https://b:2379"\n\nETCD_INITIAL_CLUSTER_STATE=existing\n'
    env = parse_env_file(text)
    assert env["ETCDCTL_ENDPOINTS"] == "https://a:2379,https://b:2379" and env["ETCD_NAME"] == "etcd1"
    new = set_env_var(text, "ETCD_INITIAL_CLUSTER_STATE", "new")
    assert new.splitlines()[:2] == ["# comment", "ETCD_NAME=etcd1"] and parse_env_file(new)["ETCD_INITIAL_CLUSTER_STATE"] == "new"
    assert parse_env_file(set_env_var("A=1\n", "B", "2")) == {"A": "1", "B": "2"}


def test_etcdctl_env_overrides_endpoints_instead_of_adding_a_flag():
    argv = etcdctl_env({"ETCDCTL_ENDPOINTS": "https://a:2379,https://b:2379", "ETCDCTL_CACERT": "/ca", "ETCD_NAME": "x"},
                       ["https://b:2379"])
    assert argv == ["env", "ETCDCTL_API=3", "ETCDCTL_CACERT=/ca", "ETCDCTL_ENDPOINTS=https://b:2379"]


def test_restore_argv_uses_each_members_own_peer_url():
    argv = restore_argv("/opt/etcd/etcdutl", "/s.db", "/d", "etcd2", "etcd1=https://1:2380,etcd2=https://2:2380",
                        "k8s_etcd", "https://2:2380", bump_revision=0)
    assert "--initial-advertise-peer-urls=https://2:2380" in argv and not any("bump" in a for a in argv)
    bumped = restore_argv("x", "/s.db", "/d", "n", "n=u", "t", "https://2:2380", bump_revision=5)
    assert bumped[-2:] == ["--bump-revision=5", "--mark-compacted"]
    assert not supports_bump_revision("--data-dir string\n--skip-hash-check\n")
    assert supports_bump_revision("--bump-revision uint\n--mark-compacted\n")


def test_probe_parsing():
    p = parse_probe("exists=1\nmember=1\nmount_point=0\nbytes=123\nfree=456\nmanifest=parked\nentry=nova-dr-x\n")
    assert p == {"exists": True, "member": True, "mount_point": False, "bytes": 123, "free": 456,
                 "manifest": "parked", "entries": ["nova-dr-x"]}
    # A df that printed nothing (busybox has no --output): unknown, not "0 bytes free" nor "enough".
    assert parse_probe("exists=1\nbytes=\nfree=\n")["free"] is None
    assert parse_probe("free=0\n")["free"] == 0


def test_names_read_all_three_spellings():
    assert parse_name("etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2024-03-01_124700.db.tar.gz").nova_version == "6.0.1"
    for word in ("kubereresources", "kuberesources", "kuberestores"):
        p = parse_name(f"nova-master-1-nova-internal_{word}_2024-03-01_124701.tar.gz")
        assert p.kind == "node" and p.node == "nova-master-1-nova-internal" and p.ts == "2024-03-01_124701"
    assert parse_name("starvault_snapshot_nova-v6.0.1_2024-03-01_1247001.db").kind == "starvault"
    assert parse_name("notes.txt") is None


# -- snapshots ---------------------------------------------------------------------------

def fake_snapshot(path: Path, pages: int = 8) -> Path:
    body = os.urandom(512 * pages)
    path.write_bytes(body + hashlib.sha256(body).digest())
    return path


def test_hash_trailer(tmp_path):
    s = fake_snapshot(tmp_path / "s.db")
    assert db_digest(s)[0] == "ok"
    data = bytearray(s.read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "bad.db").write_bytes(data)
    assert db_digest(tmp_path / "bad.db")[0] == "mismatch"
    (tmp_path / "raw.db").write_bytes(os.urandom(4096))
    assert db_digest(tmp_path / "raw.db")[0] == "missing"


def test_db_digest_is_the_trailer_check_and_the_files_sha256_in_one_read(tmp_path):
    big = fake_snapshot(tmp_path / "big.db", pages=4500)  # 2.2 MB: the read crosses 1 MiB chunks
    bad = tmp_path / "bad.db"
    data = bytearray(big.read_bytes())
    data[3 << 20 >> 1] ^= 0xFF
    bad.write_bytes(data)
    raw = tmp_path / "raw.db"
    raw.write_bytes(os.urandom(5000))
    for path, trailer in ((big, "ok"), (bad, "mismatch"), (raw, "missing")):
        assert db_digest(path) == (trailer, hashlib.sha256(path.read_bytes()).hexdigest())


def _tar(path: Path, members: dict[str, bytes], link: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            t.addfile(info)
    return path


@pytest.mark.parametrize("members, link", [
    ({"../../etc/passwd": b"x"}, None),
    ({"/etc/passwd": b"x"}, None),
    ({"ok": b"x"}, ("opt/evil", "../../../etc")),
    ({"ok": b"x"}, ("opt/evil", "/etc/shadow")),
])
def test_safe_extract_refuses_escapes(tmp_path, members, link):
    arch = _tar(tmp_path / "a.tar.gz", members, link)
    with pytest.raises(UnsafeArchive, match="refusing"):
        safe_extract(arch, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_a_gzip_bomb_is_refused_before_it_is_unpacked(tmp_path):
    """64 MiB of zeros in a 64 KiB gzip, against a bound of 16 MiB (the real bound, 16 GiB, is
    the same code with a larger number: too slow to build here)."""
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as t:
        info = tarfile.TarInfo("opt/backup/x.db")
        info.size = 64 << 20
        t.addfile(info, io.BytesIO(bytes(info.size)))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UnsafeArchive, match="bomb.tar.gz: unpacks to more than 16 MiB"):
        scan_archive(bomb, max_bytes=16 << 20)
    with pytest.raises(UnsafeArchive, match="unpacks to more than 16 MiB"):
        safe_extract(bomb, tmp_path / "out", max_bytes=16 << 20)
    assert not any((tmp_path / "out").iterdir())  # refused from the headers: nothing written
    scan_archive(bomb)  # within the real bound it is only a large file


def test_a_tar_of_more_members_than_any_backup_is_refused(tmp_path):
    """MAX_MEMBERS + 1 empty files: what a restore's first step (prepare_snapshot) does with it."""
    from core.snapshot import MAX_MEMBERS

    many = tmp_path / "etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-01-01_040000.db.tar.gz"
    with tarfile.open(many, "w:gz", compresslevel=1) as t:
        info = tarfile.TarInfo("f")
        for i in range(MAX_MEMBERS + 1):
            info.name = f"d/{i}"
            t.addfile(info)
    with pytest.raises(UnsafeArchive, match=f"holds more than {MAX_MEMBERS} members"):
        prepare_snapshot(many, tmp_path / "w", "6.0.1")
    assert not (tmp_path / "w" / "unpacked").exists() or not any((tmp_path / "w" / "unpacked").iterdir())
    with pytest.raises(UnsafeArchive, match="members"):
        scan_archive(many)


def test_prepare_snapshot_checks(tmp_path):
    db = fake_snapshot(tmp_path / "etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-01-01_040000.db")
    arch = _tar(tmp_path / (db.name + ".tar.gz"), {f"opt/backup/{db.name}": db.read_bytes()})
    ok = prepare_snapshot(arch, tmp_path / "w", "6.0.1")
    assert ok.nova_version == "6.0.1" and ok.sha256 == hashlib.sha256(db.read_bytes()).hexdigest() and not ok.warnings
    with pytest.raises(SnapshotError, match="made by Nova 6.0.1, the cluster runs 6.0.2.*allow_version_mismatch"):
        prepare_snapshot(arch, tmp_path / "w2", "6.0.2")
    assert prepare_snapshot(arch, tmp_path / "w3", "6.0.2", allow_version_mismatch=True).warnings
    plain = fake_snapshot(tmp_path / "snapshot.db")
    assert "carries no Nova version" in prepare_snapshot(plain, tmp_path / "w4", "6.0.1").warnings[0]
    (tmp_path / "nova-dr-manifest_2026-01-01_040000.json").write_text(
        '{"files": {"snapshot.db": {"sha256": "' + '0' * 64 + '", "size": 1}}}')
    with pytest.raises(SnapshotError, match="sha256 differs from its manifest"):
        prepare_snapshot(plain, tmp_path / "w5", "6.0.1")
    with pytest.raises(SnapshotError, match="no such file on this machine"):
        prepare_snapshot(tmp_path / "nope.db", tmp_path / "w6", "6.0.1")


def test_an_archive_is_checked_in_one_pass_and_its_db_written_only_when_asked(tmp_path):
    db = fake_snapshot(tmp_path / "etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-01-01_040000.db", pages=3000)
    arch = _tar(tmp_path / (db.name + ".tar.gz"), {"./" + db.name: db.read_bytes(), "./notes.txt": b"x"})
    want = hashlib.sha256(db.read_bytes()).hexdigest()
    kept = unpack_db(arch, tmp_path / "w")
    assert (kept.member, kept.trailer, kept.sha256, kept.size) == ("./" + db.name, "ok", want, db.stat().st_size)
    assert kept.archive_sha256 == hashlib.sha256(arch.read_bytes()).hexdigest()
    assert kept.path.read_bytes() == db.read_bytes() and kept.path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [db.name]  # nothing but the .db
    hashed = unpack_db(arch, tmp_path / "h", write=False)
    assert hashed.path is None and hashed.sha256 == want and not (tmp_path / "h").exists()
    snap = prepare_snapshot(arch, tmp_path / "p", "6.0.1", keep_db=False)
    assert (snap.db_path, snap.sha256, snap.archive_member) == ("", want, "./" + db.name)
    # A body flipped inside the archive: its trailer says so, whatever the archive's hash.
    bad = bytearray(db.read_bytes())
    bad[700] ^= 1
    corrupt = _tar(tmp_path / "corrupt.db.tar.gz", {"x.db": bytes(bad)})
    assert unpack_db(corrupt, tmp_path / "c").trailer == "mismatch"
    # A truncated gzip is refused (the tar's end is reached, gzip's CRC is not), and the .db
    # written so far is removed.
    cut = tmp_path / "cut.db.tar.gz"
    cut.write_bytes(arch.read_bytes()[:-12])
    with pytest.raises(SnapshotError, match="not a readable tar archive"):
        unpack_db(cut, tmp_path / "t")
    assert not any((tmp_path / "t").glob("*"))
    with pytest.raises(SnapshotError, match="expected one .db inside, found 0"):
        unpack_db(_tar(tmp_path / "none.tar.gz", {"a.txt": b"x"}), tmp_path / "n")
    # An operator's `tar czf x.tar.gz -C dir .` starts with the folder "./" itself.
    dotted = tmp_path / "dotted.tar.gz"
    subprocess.run(["tar", "-czf", str(dotted), "-C", str(tmp_path / "w"), "."], check=True)
    assert unpack_db(dotted, tmp_path / "d").sha256 == want


def test_an_archive_that_differs_from_its_manifest_leaves_nothing_unpacked(tmp_path):
    db = fake_snapshot(tmp_path / "x.db")
    arch = _tar(tmp_path / "etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-01-01_040000.db.tar.gz",
                {"x.db": db.read_bytes()})
    (tmp_path / "nova-dr-manifest_2026-01-01_040000.json").write_text(
        '{"files": {"' + arch.name + '": {"sha256": "' + '0' * 64 + '", "size": 1}}}')
    with pytest.raises(SnapshotError, match="sha256 differs from its manifest"):
        prepare_snapshot(arch, tmp_path / "w", "6.0.1")
    assert not any((tmp_path / "w").rglob("*.db"))


# -- the restore plan ------------------------------------------------------------------

def _cluster(n=3):
    return parse_inventory({
        "name": "c", "nova_version": "6.0.1", "k8s_version": "1.27.11", "ssh": {"private_key": "k", "known_hosts": ""},
        "masters": [{"node": f"m{i}", "address": f"10.0.0.{i}", "etcd_member": f"etcd{i}"} for i in range(1, n + 1)],
    }, "t")


def _facts(n=3, leader=None, manifest="present"):
    from core.etcd import EndpointStatus

    ms = []
    for i in range(1, n + 1):
        st = EndpointStatus(endpoint="e", member_id=i, leader_id=leader or 0, revision=1, raft_term=1, raft_index=1,
                            raft_applied_index=1, db_size=1, version="3.5.1") if leader else None
        ms.append(MasterFacts(member=f"etcd{i}", node=f"m{i}", healthy=bool(leader), status=st, manifest=manifest))
    return ClusterFacts(masters=tuple(ms))


def test_restore_plan_order_is_safe():
    plan = build_restore_plan(_cluster(), _facts(leader=2), "rid", snapshot_name="s.db", snapshot_sha256="ab" * 32,
                              bump_revision=0, delete_old_data=False)
    ids = [s.id for s in plan.steps]
    pos = {sid: i for i, sid in enumerate(ids)}
    deps = {s.id: set(s.deps) for s in plan.steps}
    for i in (1, 2, 3):
        # nothing stops before every staging restore (which checks the snapshot's hash) succeeded
        assert {f"restore-staging@etcd{j}" for j in (1, 2, 3)} <= deps[f"stop-etcd@etcd{i}"]
        assert {f"swap-data@etcd{j}" for j in (1, 2, 3)} <= deps[f"start-etcd@etcd{i}"]
        assert "--initial-advertise-peer-urls=https://10.0.0.%d:2380" % i in plan.steps[pos[f"restore-staging@etcd{i}"]].command
    # the leader stops last
    assert {"stop-etcd@etcd1", "stop-etcd@etcd3"} <= deps["stop-etcd@etcd2"]
    assert not any(s.id.startswith("delete-old-data") for s in plan.steps)
    assert all(s.destructive for s in plan.steps if s.action in ("stop_etcd", "swap_data", "start_restored"))
    assert "```mermaid" in plan.markdown() and "stop-etcd@etcd2" in plan.text()


def test_restore_plan_fingerprint_sees_changes():
    kw = dict(snapshot_name="s.db", snapshot_sha256="ab" * 32, bump_revision=0, delete_old_data=False)
    a = build_restore_plan(_cluster(), _facts(), "rid", **kw)
    assert a.fingerprint() == build_restore_plan(_cluster(), _facts(), "rid", **kw).fingerprint()
    assert a.fingerprint() != build_restore_plan(_cluster(), _facts(manifest="absent"), "rid", **kw).fingerprint()
    d = build_restore_plan(_cluster(1), _facts(1), "rid", **{**kw, "delete_old_data": True})
    assert [s.id for s in d.steps if s.id.startswith("delete-old-data")] == ["delete-old-data@etcd1"]


def test_summarize_log_keeps_the_panic_not_the_stack():
    from core.etcd import summarize_log

    s = summarize_log(cap("etcd_log_corrupt_db.txt"))
    assert s.startswith("panic: failed to open database (file size too small)") and "goroutine" not in s
    assert summarize_log("a\nb\n") == "a | b"


def test_the_inventory_is_compared_with_the_masters_env_file():
    from core.etcd import env_mismatches
    from core.inventory import Master

    env = {
        "ETCD_NAME": "etcd3", "ETCD_DATA_DIR": "/var/lib/etcd/", "ETCD_INITIAL_CLUSTER_TOKEN": "k8s_etcd",
        "ETCD_INITIAL_ADVERTISE_PEER_URLS": "https://10.0.0.3:2380",
        "ETCD_ADVERTISE_CLIENT_URLS": "https://10.0.0.3:2379,https://127.0.0.1:2379"}
    m = Master(node="n3", address="10.0.0.3", etcd_member="etcd3")
    assert env_mismatches(m, "k8s_etcd", env, "/etc/etcd.env") == []  # a trailing slash, a second URL: the same
    wrong = Master(node="n3", address="10.0.0.4", etcd_member="etcd4", paths={"data_dir": "/data/etcd"})
    got = env_mismatches(wrong, "other-token", env, "/etc/etcd.env")
    assert got == [
        "etcd4 (/etc/etcd.env): ETCD_NAME='etcd3' but the inventory says etcd_member 'etcd4'",
        "etcd4 (/etc/etcd.env): ETCD_DATA_DIR='/var/lib/etcd/' but the inventory says paths.data_dir '/data/etcd'",
        "etcd4 (/etc/etcd.env): ETCD_INITIAL_ADVERTISE_PEER_URLS='https://10.0.0.3:2380' but the inventory says "
        "peer_url 'https://10.0.0.4:2380'",
        "etcd4 (/etc/etcd.env): ETCD_ADVERTISE_CLIENT_URLS='https://10.0.0.3:2379,https://127.0.0.1:2379' but the "
        "inventory says client_url 'https://10.0.0.4:2379'",
        "etcd4 (/etc/etcd.env): ETCD_INITIAL_CLUSTER_TOKEN='k8s_etcd' but the inventory says etcd_token "
        "'other-token'"]
    # Settings the env file does not carry (flags in ExecStart=) cannot be compared: not refused.
    assert env_mismatches(wrong, "other-token", {}, "/etc/etcd.env") == []
    # A WAL outside the data dir would be left behind by a restore.
    assert "is outside the data dir" in env_mismatches(m, "k8s_etcd", {**env, "ETCD_WAL_DIR": "/wal"}, "/e")[0]
    assert env_mismatches(m, "k8s_etcd", {**env, "ETCD_WAL_DIR": "/var/lib/etcd/member/wal"}, "/e") == []


def test_every_error_the_project_raises_survives_prefects_result_storage():
    """A failed step's exception is pickled into result storage and read back on resume."""
    import pickle

    import cloudpickle

    import tasks.kube  # noqa: F401  (its KubeError)
    import tasks.storage  # noqa: F401  (its StoreError)
    from core.errors import CommandError, NovaDRError

    def every(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from every(sub)

    made = {CommandError: CommandError("nova-master-1", ["etcdctl", "endpoint", "health"], 1, "", "Error: boom")}
    seen = 0
    for cls in every(NovaDRError):
        err = made.get(cls) or cls("on etcd2: something failed; do this")
        for dumps in (pickle.dumps, cloudpickle.dumps):
            back = pickle.loads(dumps(err))
            assert type(back) is cls and str(back) == str(err) and vars(back) == vars(err)
        seen += 1
    assert seen >= 12


def test_work_timeouts_grow_with_the_snapshot():
    from core.etcd import work_timeout

    assert work_timeout(0) == 120
    assert work_timeout(20_000_000) == 130
    assert 4000 < work_timeout(8_000_000_000) < 4400  # 8 GB: about 70 min, not a fixed 30
    assert work_timeout(-1) == 120


def test_the_revision_a_restore_serves():
    from core.etcd import revision_after_restore

    assert revision_after_restore(0) == 1  # no key ever written: the store begins at 1
    assert revision_after_restore(4) == 4
    assert revision_after_restore(4, 1_000_000_000) == 1_000_000_004


def test_a_resume_lists_what_it_skips_and_refuses_a_member_running_again():
    from core.facts import ClusterFacts, MasterFacts
    from core.plan import Plan, Step
    from core.resume import resume_notes

    steps = (Step(id="stop-etcd@etcd1", action="stop_etcd", master="etcd1", title="t", destructive=True),
             Step(id="stop-etcd@etcd2", action="stop_etcd", master="etcd2", title="t", destructive=True),
             Step(id="swap-data@etcd1", action="swap_data", master="etcd1", title="t", destructive=True,
                  deps=("stop-etcd@etcd1", "stop-etcd@etcd2")),
             Step(id="swap-data@etcd2", action="swap_data", master="etcd2", title="t", destructive=True,
                  deps=("stop-etcd@etcd1", "stop-etcd@etcd2")))
    plan = Plan(flow="restore-etcd-cluster", cluster="c", recovery_id="rid", steps=steps)

    def facts(*running):
        return ClusterFacts(masters=tuple(MasterFacts(member=m, node=m, service="active" if m in running else "inactive",
                                                      healthy=m in running) for m in ("etcd1", "etcd2")))

    assert resume_notes(plan, {}, facts("etcd1", "etcd2")) == ("", [])  # a fresh start
    done = {"stop-etcd@etcd1": "T1", "stop-etcd@etcd2": "T2"}
    line, refusals = resume_notes(plan, done, facts())
    assert refusals == [] and "2 step(s)" in line and "stop-etcd@etcd1 (T1)" in line and "swap-data" not in line
    # etcd2 was started by hand after the earlier run stopped it: refused, naming it
    line, refusals = resume_notes(plan, done, facts("etcd2"))
    assert len(refusals) == 1 and refusals[0].startswith("stop-etcd@etcd2:") and "runs again" in refusals[0]
    # once its data was swapped, a running etcd2 is what the plan expects (killed during the starts)
    assert resume_notes(plan, {**done, "swap-data@etcd2": "T3"}, facts("etcd2"))[1] == []


def test_a_raft_snapshot_is_checked_against_its_own_sha256sums(tmp_path):
    from core.raft_snapshot import check_raft_snapshot
    from tests.helpers import raft_snapshot_bytes

    good = tmp_path / "good.snap"
    good.write_bytes(raft_snapshot_bytes(b"raft state" * 1000))
    assert set(check_raft_snapshot(good)) == {"meta.json", "state.bin"}
    for name, body, says in [
        ("cut", good.read_bytes()[:-40], "not a complete raft snapshot"),
        ("sums", raft_snapshot_bytes(b"s", damage="sums"), "sha256 of state.bin differs from its SHA256SUMS"),
        ("nosums", raft_snapshot_bytes(b"s", damage="no-sums"), "no meta.json, state.bin in SHA256SUMS"),
        ("error", good.read_bytes() + b'{"errors":["context canceled"]}', "not a complete raft snapshot"),
        ("html", b"<html>502 Bad Gateway</html>", "not a complete raft snapshot"),
    ]:
        p = tmp_path / f"{name}.snap"
        p.write_bytes(body)
        with pytest.raises(SnapshotError, match=says):
            check_raft_snapshot(p)
