"""A recovery killed anywhere resumes on the default set-up: `nova-dr run` on Prefect's
embedded server (no PREFECT_API_URL), as a new user runs it. Each run is a process of its
own, killed with SIGKILL in its process group, as a crash or an OOM kill would.

The cluster lock lives on the masters, so these runs share nothing but the masters: a second
recovery from another Prefect home is refused while the first lives, and proceeds once the
first's lock has expired.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.lock import parse_holder
from tasks.lock import read_lock
from tasks.remote import connect
from tests.helpers import REPO
from tests.test_restore import _wait_for, assert_restored, prepare_lab, quarantines

NOVA = Path(sys.executable).parent / "nova-dr"


@pytest.fixture(scope="module")
def operator_a(tmp_path_factory) -> Path:
    """One Prefect home for the module: the embedded server's database is migrated once (~20 s)."""
    return tmp_path_factory.mktemp("operator-a")


def cli_env(prefect_home: Path, nova_home: Path, ttl: float | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the embedded default
    env.update(PREFECT_HOME=str(prefect_home), NOVA_DR_HOME=str(nova_home))
    if ttl:
        env["NOVA_DR_LOCK_TTL_SECONDS"] = str(ttl)
    return env


def start(args: list[str], env: dict, log: Path, terminal: bool = False) -> subprocess.Popen:
    """`nova-dr run ARGS`; with `terminal`, its stdin is a terminal, so it asks at the gate."""
    out = open(log, "ab")
    stdin = subprocess.DEVNULL
    if terminal:
        _, stdin = pty.openpty()  # the test never answers: the run waits at the gate until killed
    return subprocess.Popen([str(NOVA), "run", *args], cwd=REPO, env=env, stdin=stdin, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(args: list[str], env: dict, log: Path, timeout: float = 400) -> tuple[int, str]:
    p = start(args, env, log)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return p.returncode, log.read_text()


def restore_args(lab, snap: Path, *extra: str, approve: bool = True) -> list[str]:
    return ["restore-etcd-cluster", "--inventory", str(lab.dir / "inventory.yaml"), "--param", f"snapshot={snap}",
            *(["--auto-approve"] if approve else []), *(a for e in extra for a in ("--param", e))]


GATE = "Do you want to perform these actions?"


def hold(lab, member: str, name: str) -> Path:
    """Like lab.hold, for names with a path in them (`cat-/etc/etcd.env-`)."""
    f = Path(lab.master(member).node_dir) / "hold" / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.touch()
    return f


def reached(holds: list[Path]) -> bool:
    return all(Path(f"{h}.reached").exists() for h in holds)


def kill(proc: subprocess.Popen, holds: list[Path]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for h in holds:  # the held remote commands give up
        Path(f"{h}.abort").touch()
    _wait_for(lambda: not any(Path(f"{h}.reached").exists() for h in holds), 20, "held commands to abort")
    for h in holds:
        h.unlink()
        Path(f"{h}.abort").unlink()


def holders(lab) -> dict:
    cluster = lab.cluster()
    out = {}
    for m in cluster.masters:
        conn = connect(cluster, m)
        try:
            out[m.etcd_member] = parse_holder(read_lock(conn, m, cluster.name).text)
        finally:
            conn.close()
    return out


def run_until(lab, snap: Path, env: dict, log: Path, holds: list[Path]) -> subprocess.Popen:
    """Start a restore and return once it has reached every hold, or its gate (no holds)."""
    proc = start(restore_args(lab, snap, approve=bool(holds)), env, log, terminal=not holds)
    done = (lambda: reached(holds)) if holds else (lambda: GATE in log.read_text())
    _wait_for(lambda: done() or proc.poll() is not None, 240, "the hold" if holds else "the gate")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


@pytest.mark.parametrize("where", ["before-gate", "copies", "after-stops", "starts"])
def test_a_killed_restore_is_finished_by_a_plain_rerun(lab3, tmp_path, operator_a, where):
    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd3", "wipe")
    members = [m.member for m in lab3.masters()]
    env = cli_env(operator_a, tmp_path / "nova-dr")
    log = tmp_path / "first.log"
    if where == "before-gate":  # waiting at the gate, in a terminal: the lock is taken, nothing else
        holds = []
    elif where == "copies":  # etcd1 and etcd3 have their copy; etcd2's `cat` never ends
        holds = [hold(lab3, "etcd2", "cat--")]
    elif where == "after-stops":  # every member stopped, none swapped
        holds = [hold(lab3, m, "systemctl-stop") for m in members]
    else:  # every member swapped, the starts under way
        holds = [hold(lab3, m, "systemctl-start") for m in members]
    proc = run_until(lab3, snap, env, log, holds)
    if where == "after-stops":
        later = [hold(lab3, m, "cat-/etc/etcd.env-") for m in members]  # set-state-new reads the env file
        for h in holds:
            h.unlink()
        holds = later
        _wait_for(lambda: reached(holds) or proc.poll() is not None, 60, "the stops to finish")
        assert proc.poll() is None, log.read_text()[-3000:]
        assert [lab3.etcd_pid(m) for m in members] == [0, 0, 0]
    rid = re.search(r"recovery id: (\S+)", log.read_text()).group(1)
    kill(proc, holds)
    # The dead run's record stays on every master: the cluster is locked, and by whom is known.
    left = holders(lab3)
    assert {h.recovery_id for h in left.values() if h} == {rid} and all(left.values()), left
    code, out = finish(restore_args(lab3, snap), env, tmp_path / "rerun.log")
    assert code == 0, out[-4000:]
    assert f"recovery id: {rid}" in out and "the same recovery; this run resumes it" in out
    assert_restored(lab3, expected)
    assert holders(lab3) == {m: None for m in members}  # given back
    if where in ("after-stops", "starts"):  # quarantined once, by the first run or the rerun: never twice
        assert all(len(quarantines(lab3, m)) == 1 for m in ("etcd1", "etcd2"))


def test_another_recovery_from_another_prefect_home_waits_for_the_expiry(lab3, tmp_path, operator_a):
    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd3", "wipe")
    # TTL 60 s: the second refusal below must come before the expiry, and a `nova-dr run` on
    # the embedded server takes 10-30 s to start on a busy machine (30 s was too short once).
    env_a = cli_env(operator_a, tmp_path / "nova-dr-a", ttl=60)
    holds: list[Path] = []
    first = run_until(lab3, snap, env_a, tmp_path / "a.log", holds)  # at its gate, as long as it takes
    rid = re.search(r"recovery id: (\S+)", (tmp_path / "a.log").read_text()).group(1)
    # Operator B: another Prefect home (its own embedded server) and another NOVA_DR_HOME.
    env_b = cli_env(tmp_path / "prefect-b", tmp_path / "nova-dr-b")
    other = restore_args(lab3, snap, "recovery_id=second-opinion", "wait_for_cluster_seconds=2")
    code, out = finish(other, env_b, tmp_path / "b1.log")
    assert code == 1, out[-3000:]
    assert f"another recovery holds it: recovery {rid}" in out and "its process still runs here" in out
    assert f"pid {first.pid} on" in out
    kill(first, holds)
    # Dead, but not expired: a different recovery is still refused, and told how to go on.
    code, out = finish(other, env_b, tmp_path / "b2.log")
    assert code == 1 and "its process is gone" in out and f"recovery_id={rid}" in out, out[-3000:]
    # Once the dead run's lock has expired, the other recovery proceeds, and the plan says from whom.
    code, out = finish(restore_args(lab3, snap, "recovery_id=second-opinion", "wait_for_cluster_seconds=120"),
                       env_b, tmp_path / "b3.log")
    assert code == 0, out[-4000:]
    assert "its lock had expired" in out and f"recovery {rid}" in out
    assert_restored(lab3, expected)
