"""The `nova-dr` command as people use it: plan, run at a terminal, no way to approve, backups."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO
from tests.test_restore import fingerprint, prepare_lab

CLI = str(Path(sys.executable).parent / "nova-dr")


def test_plan_shows_the_dag_and_touches_nothing(lab3, tmp_path):
    snap, _ = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd2", "wipe")
    before = fingerprint(lab3)
    out = subprocess.run([CLI, "plan", "restore-etcd-cluster", "--inventory", str(lab3.dir / "inventory.yaml"),
                          "--param", f"snapshot={snap}"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for step in ("copy-snapshot@etcd1", "restore-staging@etcd3", "stop-etcd@etcd2", "swap-data@etcd3", "verify"):
        assert step in out.stdout
    assert "--initial-advertise-peer-urls=https://" + lab3.master("etcd2").address + ":2380" in out.stdout
    assert fingerprint(lab3) == before


def test_run_without_terminal_or_server_refuses_at_once(lab3, tmp_path):
    snap, _ = prepare_lab(lab3, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    started = time.monotonic()
    out = subprocess.run([CLI, "run", "restore-etcd-cluster", "--inventory", str(lab3.dir / "inventory.yaml"),
                          "--param", f"snapshot={snap}"], capture_output=True, text=True, env=env, cwd=REPO,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and "nobody can give it" in out.stderr and "Nothing was changed" in out.stderr
    assert time.monotonic() - started < 15  # no embedded server was started to refuse


def test_run_at_a_terminal_asks_and_no_means_no(lab3, tmp_path):
    snap, _ = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd2", "corrupt")
    before = fingerprint(lab3)
    leader, follower = pty.openpty()
    p = subprocess.Popen([CLI, "run", "restore-etcd-cluster", "--inventory", str(lab3.dir / "inventory.yaml"),
                          "--param", f"snapshot={snap}"], stdin=follower, stdout=follower, stderr=follower, cwd=REPO)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 120
    while b"Only 'yes' will be accepted" not in seen:
        assert time.monotonic() < deadline and p.poll() is None, seen.decode(errors="replace")[-2000:]
        try:
            seen += os.read(leader, 65536)
        except OSError:
            break
    assert b"stop-etcd@etcd1" in seen  # the plan was shown before the question
    os.write(leader, b"no\n")
    while p.poll() is None:
        try:
            os.read(leader, 65536)
        except OSError:
            break
    assert p.wait(60) == 1
    assert fingerprint(lab3) == before


def test_backups_list_and_fetch_a_daemon_style_set(tmp_path):
    import io
    import tarfile

    store = tmp_path / "nfs"
    store.mkdir()

    def tgz(name: str, members: dict[str, bytes]) -> None:
        with tarfile.open(store / name, "w:gz") as t:
            for m, data in members.items():
                info = tarfile.TarInfo(m)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))

    tgz("etcd_snapshot_nova-v6.0.1_k8s-v1.27.11_2026-11-20_040000.db.tar.gz", {"opt/backup/x.db": b"db"})
    tgz("nova-master-1_kuberestores_2026-11-20_040012.tar.gz", {"etc/starvault/unseal-tokens": b"a\n"})
    (store / "starvault_snapshot_nova-v6.0.1_2026-11-20_040000.db").write_bytes(b"raft")
    (store / "notes.txt").write_text("not ours")
    out = subprocess.run([CLI, "backups", "list", "--store", str(store)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    row = out.stdout.splitlines()[1]
    assert row.startswith("2026-11-20_040000") and " yes " in row and "none: origin unknown" in row
    fetch = [CLI, "backups", "fetch", "--store", str(store), "--backup", "latest", "--to", str(tmp_path / "got")]
    got = subprocess.run(fetch, capture_output=True, text=True, cwd=REPO)
    assert got.returncode == 1 and "origin is not verified" in got.stderr and "Traceback" not in got.stderr
    got = subprocess.run(fetch + ["--allow-unsigned"], capture_output=True, text=True, cwd=REPO)
    assert got.returncode == 0, got.stderr
    assert "unverified" in got.stdout and sorted(p.name for p in (tmp_path / "got").iterdir()) == sorted(
        p.name for p in store.iterdir() if p.name != "notes.txt")
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in (tmp_path / "got").iterdir())
    missing = subprocess.run([CLI, "backups", "fetch", "--store", str(store), "--backup", "2020-01-01_000000",
                              "--to", str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 1 and "no backup set '2020-01-01_000000'" in missing.stderr


def test_mistakes_a_new_user_makes_get_one_line_and_change_nothing(tmp_path):
    """Each once ended in a raw ParameterBindError traceback, or in "nobody can approve"
    where the inventory file was simply not there."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    inv = tmp_path / "inventory.yaml"
    inv.write_text("cluster_name: c\n")  # never read: every refusal below comes first

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, cwd=REPO,
                              stdin=subprocess.DEVNULL, timeout=120)

    out = cli("run", "restore-etcd-cluster", "--inventory", str(inv), "--param", "snapshott=/x.db")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "restore-etcd-cluster has no parameter 'snapshott'; its parameters, the closest first: snapshot," \
           in out.stderr and "Nothing was changed" in out.stderr, out.stderr
    out = cli("plan", "restart-etcd-member", "--inventory", str(inv), "--param", "bogus=1")
    assert out.returncode == 2 and "restart-etcd-member has no parameter 'bogus'" in out.stderr, out.stderr
    for verb in ("run", "plan"):
        out = cli(verb, "restore-etcd-cluster", "--inventory", "/no/such/file.yaml")
        assert out.returncode == 2 and out.stderr.startswith("error: inventory /no/such/file.yaml: no such file"), \
            out.stderr
        assert "approv" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = cli("run", "backup-master-nodes", "--inventory", "/no/such/file.yaml", "--param", f"store={tmp_path}",
              "--auto-approve")
    assert "note: backup-master-nodes has no approval gate; --auto-approve changes nothing" in out.stderr, out.stderr
    assert out.returncode == 2 and "inventory /no/such/file.yaml: no such file" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and list(tmp_path.iterdir()) == [inv]
