"""restore-files-velero against the fake API server (the test acts as Velero and the restored
daemon pods, whose `tar` output goes over the exec websocket), and restore-files-kopia with a
stub `kopia` executable on PATH (no kopia binary can be installed here)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prefect.blocks.system import Secret

from core.names import etcd_snapshot_name, node_archive_name, starvault_snapshot_name, timestamp
from flows.files import restore_files_kopia, restore_files_velero
from tests.fakekube.common import ExecResult
from tests.helpers import REPO, make_bucket, needs_schemas
from tests.kube_world import World, velero_kopia_snapshot
from tests.test_restore import error_of

TS = timestamp(datetime(2026, 11, 27, 4, 0, 5, tzinfo=timezone.utc))
NODES = ["master-1", "master-2", "master-3"]
UIDS = {n: f"0000000{i}-aaaa-bbbb-cccc-00000000000{i}" for i, n in enumerate(NODES, 1)}


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def daemon_files(big: int = 2 << 20) -> dict[str, dict[str, bytes]]:
    """What the Nova Backup Daemon leaves in /opt/backup per master: an archive each, and the
    etcd and StarVault snapshots on the first one. Random bytes: any corruption shows."""
    out = {}
    for i, node in enumerate(NODES):
        files = {node_archive_name(node, TS): _tar_gz({"etc/kubernetes/pki/apiserver.crt": os.urandom(big // 4)})}
        if i == 0:
            files[etcd_snapshot_name("3.1.0", "1.31.4", TS)] = _tar_gz({"opt/backup/x.db": os.urandom(big)})
            files[starvault_snapshot_name("3.1.0", TS)] = os.urandom(big // 2)
        out[node] = files
    return out


def tar_of(files: dict[str, bytes]) -> bytes:
    """`tar cf - -C /opt/backup .` as GNU tar writes it: ./ first, then ./name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo("./")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- Velero -----------------------------------------------------------------------------------

@pytest.fixture
def world(fake_kube, s3_endpoint, tmp_path, request):
    bucket = f"files-{abs(hash(request.node.name)) % 10**8}"
    make_bucket(s3_endpoint, bucket)
    w = World(fake_kube, s3_endpoint, bucket, tmp_path)
    fake_kube.put({"apiVersion": "velero.io/v1", "kind": "BackupStorageLocation",
                   "metadata": {"name": "default", "namespace": "nova-cluster-backup"},
                   "spec": {"provider": "aws", "objectStorage": {"bucket": bucket}}})
    fake_kube.put({"apiVersion": "velero.io/v1", "kind": "Backup",
                   "metadata": {"name": "control-plane-backup-20261127040000", "namespace": "nova-cluster-backup",
                                "labels": {"velero.io/schedule-name": "control-plane-backup"}},
                   "spec": {"includedNamespaces": ["nova-cluster-backup"]}, "status": {"phase": "Completed"}})
    return w


def act_as_velero_restore(w: World, files: dict[str, dict[str, bytes]], phase="Completed", tar_exit=0, **status):
    """On a Restore: the namespace, the DaemonSet and its pods (one per master, Running), the
    results file in the bucket, then the phase. The pods' tar answers from `files`."""
    fake = w.fake

    def on_restore(verb, obj):
        if verb != "ADDED":
            return
        name = obj["metadata"]["name"]
        w.restores_seen = getattr(w, "restores_seen", []) + [obj]

        def restore():
            fake.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "nova-cluster-restore"}})
            ds = fake.put({"apiVersion": "apps/v1", "kind": "DaemonSet",
                           "metadata": {"name": "nova-backup-daemon", "namespace": "nova-cluster-restore"},
                           "spec": {"selector": {"matchLabels": {"app.kubernetes.io/component": "nova-backup-daemon"}},
                                    "template": {"metadata": {"labels": {
                                        "app.kubernetes.io/component": "nova-backup-daemon"}},
                                        "spec": {"containers": [{"name": "backup-daemon", "image": "d"}]}}}})
            fake.make_pods(ds, NODES)
            w.s3.put_object(Bucket=w.bucket, Key=f"restores/{name}/restore-{name}-results.gz", Body=__import__(
                "gzip").compress(json.dumps({"warnings": {"namespaces": {"nova-cluster-restore": [
                    "could not restore, ConfigMap \"kube-root-ca.crt\" already exists"]}}}).encode()))
            fake.set_status("velero.io", "restores", obj["metadata"]["namespace"], name, phase=phase, **status)

        fake.later(0.2, restore)

    def on_exec(pod, container, command):
        if pod["metadata"]["namespace"] != "nova-cluster-restore" or container != "backup-daemon":
            return None
        assert command == ["tar", "cf", "-", "-C", "/opt/backup", "."], command
        if tar_exit:
            return ExecResult(stderr=b"tar: /opt/backup: Cannot open: Permission denied\n", exit_code=tar_exit)
        return ExecResult(stdout=tar_of(files[pod["spec"]["nodeName"]]))

    fake.react("velero.io", "restores", on_restore)
    fake.on_exec(on_exec)


def left_in_cluster(fake) -> list[str]:
    return ([r["metadata"]["name"] for r in fake.list("velero.io", "restores")]
            + [d["metadata"]["name"] for d in fake.list("apps", "daemonsets", "nova-cluster-restore")]
            + [p["metadata"]["name"] for p in fake.list("", "pods", "nova-cluster-restore")])


@needs_schemas()
def test_velero_files_arrive_byte_identical_and_the_restore_is_cleaned_up(world, tmp_path):
    files = daemon_files()
    act_as_velero_restore(world, files, warnings=1)
    to = tmp_path / "files"
    out = restore_files_velero(kube=str(world.kubeconfig), to=str(to), s3_block="s3-velero", poll_seconds=0.2)
    want = {name: sha(data) for node in files.values() for name, data in node.items()}
    got = {p.name: sha(p.read_bytes()) for p in to.iterdir()}
    assert got == want and sorted(out["files"]) == sorted(want)
    assert {oct(p.stat().st_mode & 0o777) for p in to.iterdir()} == {"0o600"}
    restore = next(r for r in world.fake.requests if r[0] == "POST" and "/restores" in r[1])
    assert restore[1] == "/apis/velero.io/v1/namespaces/nova-cluster-backup/restores"
    assert any("kube-root-ca.crt" in n for n in out["notes"])
    assert [r["spec"] for r in world.restores_seen] == [{
        "backupName": "control-plane-backup-20261127040000", "includedNamespaces": ["nova-cluster-backup"],
        "namespaceMapping": {"nova-cluster-backup": "nova-cluster-restore"}}]
    assert left_in_cluster(world.fake) == []
    # only what this run made is deleted; the live daemon's namespace is never touched
    assert [r[1] for r in world.fake.requests if r[0] == "DELETE"] == [
        f"/apis/velero.io/v1/namespaces/nova-cluster-backup/restores/{out['notes'][0].split()[2]}",
        "/apis/apps/v1/namespaces/nova-cluster-restore/daemonsets/nova-backup-daemon?propagationPolicy=Background"]


@needs_schemas()
def test_velero_failures_still_clean_up(world, tmp_path):
    act_as_velero_restore(world, daemon_files(big=1000), tar_exit=2)
    err = error_of(restore_files_velero(kube=str(world.kubeconfig), to=str(tmp_path / "a"), poll_seconds=0.2,
                                        return_state=True))
    assert "tar of /opt/backup exited 2: tar: /opt/backup: Cannot open: Permission denied" in err
    assert left_in_cluster(world.fake) == []
    assert [p.name for p in (tmp_path / "a").iterdir()] == []


@needs_schemas()
@pytest.mark.parametrize("phase, status, says", [
    ("PartiallyFailed", {"errors": 3}, "phase PartiallyFailed (3 errors"),
    ("FailedValidation", {"validationErrors": ["backup not found"]}, "validation errors: backup not found"),
])
def test_velero_restore_that_fails(world, tmp_path, phase, status, says):
    act_as_velero_restore(world, daemon_files(big=1000), phase=phase, **status)
    err = error_of(restore_files_velero(kube=str(world.kubeconfig), to=str(tmp_path / "b"), poll_seconds=0.2,
                                        return_state=True))
    assert says in err
    assert left_in_cluster(world.fake) == []


@needs_schemas()
def test_velero_bad_input_changes_nothing(world, tmp_path):
    act_as_velero_restore(world, daemon_files(big=1000))
    kw = dict(kube=str(world.kubeconfig), poll_seconds=0.2, return_state=True)
    err = error_of(restore_files_velero(backup="no-such-backup", to=str(tmp_path / "c"), **kw))
    assert "no Velero backup named 'no-such-backup'" in err and "control-plane-backup-20261127040000" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    err = error_of(restore_files_velero(to=str(full), **kw))
    assert "not an empty directory" in err and (full / "keep.txt").read_text() == "mine"
    assert world.fake.list("velero.io", "restores") == []


# --- Kopia ------------------------------------------------------------------------------------

@pytest.fixture(params=["1.16", "1.18"])
def kopia(tmp_path, monkeypatch, request):
    """The stub on PATH, a repository of two points in time as Velero 1.16 and 1.18 write them,
    the blocks the flow reads."""
    files = daemon_files(big=200_000)
    older = daemon_files(big=1000)
    state = {"bucket": "velero-bucket", "prefix": "kopia/nova-cluster-backup/", "endpoint": "127.0.0.1:9000",
             "http": True, "password": "static-passw0rd", "access_key": "AKIA-kopia", "secret_key": "kopia-secret-key",
             "log": str(tmp_path / "kopia-calls.jsonl"), "snapshots": [], "contents": {}}
    for i, node in enumerate(NODES):
        for when, content, sid in (("2026-11-26T04:00:05.123456789Z", older, f"{i}old" + "a" * 28),
                                   ("2026-11-27T04:00:05.123456789Z", files, f"{i}new" + "b" * 28)):
            d = tmp_path / "repo" / sid
            d.mkdir(parents=True)
            for name, data in content[node].items():
                (d / name).write_bytes(data)
            state["snapshots"].append(velero_kopia_snapshot(request.param, sid, f"nova-backup-daemon-{node}",
                                                            UIDS[node], f"control-plane-backup-{when[:10]}", when))
            state["contents"][sid] = str(d)
    # A newer upload that was cut off: kopia's JSON lists it (incomplete), restoring it would give
    # half a set.
    cut = tmp_path / "repo" / ("9cut" + "c" * 28)
    cut.mkdir(parents=True)
    (cut / "partial.bin").write_bytes(b"half")
    state["snapshots"].append(velero_kopia_snapshot(request.param, cut.name, "nova-backup-daemon-master-1",
                                                    UIDS["master-1"], "control-plane-backup-2026-11-28",
                                                    "2026-11-28T04:00:05.1Z", incomplete="checkpoint"))
    state["contents"][cut.name] = str(cut)
    (tmp_path / "state.json").write_text(json.dumps(state))
    monkeypatch.setenv("KOPIA_STUB_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("PATH", f"{REPO / 'tests' / 'stubs'}:{os.environ['PATH']}")
    from blocks.storage import S3Credentials

    S3Credentials(endpoint_url="http://127.0.0.1:9000", access_key_id="AKIA-kopia",
                  secret_access_key="kopia-secret-key").save("s3-kopia", overwrite=True)
    Secret(value="static-passw0rd").save("kopia-password", overwrite=True)
    Secret(value="wrong-password").save("kopia-wrong", overwrite=True)
    return {"files": files, "older": older, "state": state, "calls": tmp_path / "kopia-calls.jsonl"}


def calls(kopia) -> list[list[str]]:
    return [json.loads(line)["argv"] for line in kopia["calls"].read_text().splitlines()]


KW = dict(s3_block="s3-kopia", bucket="velero-bucket", password_block="kopia-password", kube="/nonexistent/kubeconfig")


def test_kopia_restores_the_point_names_masters_by_archives_and_disconnects(kopia, tmp_path):
    to = tmp_path / "out"
    out = restore_files_kopia(to=str(to), **KW)
    want = {name: sha(data) for node in kopia["files"].values() for name, data in node.items()}
    assert {p.name: sha(p.read_bytes()) for p in to.iterdir()} == want
    argv = calls(kopia)
    assert argv[0][2:] == ["repository", "connect", "s3", "--bucket", "velero-bucket", "--prefix",
                           "kopia/nova-cluster-backup/", "--endpoint", "127.0.0.1:9000", "--no-persist-credentials",
                           "--readonly", "--region", "us-east-1", "--disable-tls"]
    assert argv[1][2:] == ["snapshot", "list", "--all", "--json"]
    assert sorted(a[4] for a in argv if a[2:4] == ["snapshot", "restore"]) == [f"{i}new" + "b" * 28 for i in range(3)]
    assert argv[-1][2:] == ["repository", "disconnect"]
    configs = {a[1] for a in argv}
    assert len(configs) == 1 and str(to) in configs.pop()  # a private config, gone afterwards
    assert [p.name for p in to.iterdir() if p.name.startswith(".")] == []
    assert "did not answer" in out["notes"][0] and "shared key" in out["notes"][-1]


def test_the_kopia_stub_parses_as_kopia_does(kopia, tmp_path):
    """kingpin: the app's flags anywhere, a command's flags only after its word. The
    --cache-directory that nova-dr once put first made every real kopia call fail."""
    stub = [str(REPO / "tests" / "stubs" / "kopia"), "--config-file", str(tmp_path / "c.json")]
    env = {**os.environ, "KOPIA_CACHE_DIRECTORY": str(tmp_path / "cache")}
    run = lambda *a: subprocess.run([*stub, *a], env=env, capture_output=True, text=True)  # noqa: E731
    p = run("--cache-directory", str(tmp_path / "cache"), "snapshot", "list", "--all", "--json")
    assert p.returncode == 1 and "kopia: error: unknown long flag '--cache-directory'" in p.stderr
    p = run("snapshot", "--bucket", "b", "list")
    assert p.returncode == 1 and "unknown long flag '--bucket'" in p.stderr
    p = run("repository", "connect", "s3", "--cache-directory=" + str(tmp_path / "cache"), "--bucket", "b")
    assert "unknown long flag" not in p.stderr and "error connecting to repository" in p.stderr  # parsed


def test_kopia_point_in_time_and_names_by_pods_when_the_api_answers(kopia, tmp_path, fake_kube):
    import yaml

    fake_kube.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "nova-cluster-backup"}})
    for node in NODES:
        pod = fake_kube.put({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": f"nova-backup-daemon-{node}", "namespace": "nova-cluster-backup",
                                          "labels": {"app.kubernetes.io/component": "nova-backup-daemon"}},
                             "spec": {"nodeName": node, "containers": [{"name": "backup-daemon", "image": "d"}]}})
        fake_kube.objects[("", "pods", "nova-cluster-backup", pod["metadata"]["name"])]["metadata"]["uid"] = UIDS[node]
    kc = tmp_path / "kubeconfig"
    kc.write_text(yaml.safe_dump(fake_kube.kubeconfig()))
    to = tmp_path / "older"
    out = restore_files_kopia(to=str(to), point="2026-11-26T12:00:00Z", **{**KW, "kube": str(kc)})
    want = {name: sha(data) for node in kopia["older"].values() for name, data in node.items()}
    assert {p.name: sha(p.read_bytes()) for p in to.iterdir()} == want
    assert "named by the 3 nova-backup-daemon pods" in out["notes"][0]


def test_kopia_bad_input(kopia, tmp_path):
    err = error_of(restore_files_kopia(to=str(tmp_path / "a"), **{**KW, "password_block": "kopia-wrong"},
                                       return_state=True))
    assert "invalid repository password" in err and "wrong-password" not in err
    assert calls(kopia)[-1][2:] == ["repository", "disconnect"]
    err = error_of(restore_files_kopia(to=str(tmp_path / "b"), point="2020-01-01T00:00:00Z", **KW, return_state=True))
    assert "no snapshot at or before 2020-01-01 00:00:00Z" in err and "2026-11-26 04:00:05Z" in err
    assert calls(kopia)[-1][2:] == ["repository", "disconnect"]
    err = error_of(restore_files_kopia(to=str(tmp_path / "c"), point="yesterday", **KW, return_state=True))
    assert "write latest or a time" in err
    # a source whose files carry no archive name, and no API to ask: it maps to no master
    for sid, d in kopia["state"]["contents"].items():
        if sid.startswith("1new"):
            for f in Path(d).iterdir():
                if "kubereresources" in f.name:
                    f.rename(f.with_name("unnamed.tar.gz"))
    err = error_of(restore_files_kopia(to=str(tmp_path / "d"), **KW, return_state=True))
    assert "maps to no master" in err and UIDS["master-2"] in err
    assert not any((tmp_path / x).exists() and any((tmp_path / x).iterdir()) for x in "abcd")
    for line in kopia["calls"].read_text().splitlines():
        assert "static-passw0rd" not in line and "kopia-secret-key" not in line
        assert json.loads(line)["password_env"] is True


@pytest.mark.kopia
@pytest.mark.skipif(shutil.which("kopia") is None, reason="no kopia binary on PATH (none can be installed here)")
def test_real_kopia_binary_is_new_enough():
    import subprocess

    out = subprocess.run(["kopia", "snapshot", "list", "--help"], capture_output=True, text=True)
    assert "--all" in out.stdout + out.stderr and "--json" in out.stdout + out.stderr


def test_a_link_in_what_a_source_gave_back_is_refused_and_nothing_outside_changes(tmp_path):
    """A Kopia repository (or a pod) can hold a symlink: merged and `chmod`ed, it would have
    set a file outside the folder (here a stand-in for /etc/passwd) to 0600."""
    from core.errors import NovaDRError
    from flows.files import gather

    outside = tmp_path / "passwd"
    outside.write_text("root:x:0:0::/root:/bin/sh\n")
    outside.chmod(0o644)
    part = tmp_path / "source-0"
    part.mkdir()
    (part / "nova-master-1-nova-internal_kubereresources_2026-01-01_040000.tar.gz").write_bytes(b"x")
    (part / "etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-01-01_040000.db.tar.gz").symlink_to(outside)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(NovaDRError, match="links or special files.*etcd_snapshot_.* -> .*passwd"):
        gather(dest, {"master-1": part})
    assert (outside.stat().st_mode & 0o777) == 0o644 and not any(dest.iterdir())
