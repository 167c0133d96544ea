"""nova-dr as a non-root operator whose sudo asks for a password (the lab's `nova`, with
`lab up --sudo-password`): the password goes to sudo on stdin and nowhere else."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from flows.member import replace_etcd_member
from flows.restore import restore_etcd_cluster
from tests.helpers import run_record
from tests.test_restore import assert_restored, error_of, fingerprint, prepare_lab


def _all_command_lines() -> list[bytes]:
    """Every process's argv and environment on this machine: the lab's masters share its pids."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            for f in ("cmdline", "environ"):
                try:
                    out.append((d / f).read_bytes())
                except OSError:
                    pass
    return out


def test_a_restore_as_nova_with_a_sudo_password_leaks_it_nowhere(lab_factory, tmp_path):
    lab = lab_factory(3, sudo_password=True)
    password = (lab.dir / "sudo-password").read_text().strip()
    assert lab.cluster().ssh.sudo_password.get_secret_value() == password
    snap, expected = prepare_lab(lab, tmp_path)
    lab.break_member("etcd1", "corrupt")
    lab.break_member("etcd3", "wipe")
    samples, stop = [0], threading.Event()
    leaked: list[bytes] = []

    def sample() -> None:  # `ps` on every master, many times a second, while the restore works
        while not stop.is_set():
            leaked.extend(c for c in _all_command_lines() if password.encode() in c)
            samples[0] += 1

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        state = restore_etcd_cluster(inventory=str(lab.dir / "inventory.yaml"), snapshot=str(snap),
                                     auto_approve=True, return_state=True)
    finally:
        stop.set()
        t.join()
    assert state.is_completed(), error_of(state)
    assert_restored(lab, expected)
    assert samples[0] > 20 and leaked == []
    assert password not in run_record(str(state.state_details.flow_run_id))
    # Checkpoints, results and records on this machine; the masters' own files (their logs).
    for root in (Path(os.environ["NOVA_DR_HOME"]), lab.dir / "nodes"):
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert password.encode() not in f.read_bytes(), f


def test_a_wrong_sudo_password_is_refused_without_asking_again_and_changes_nothing(lab_factory, tmp_path):
    lab = lab_factory(3, sudo_password=True)
    lab.break_member("etcd2", "wipe")
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    import yaml

    inv = yaml.safe_load((lab.dir / "inventory.yaml").read_text())
    inv["ssh"] = {**inv["ssh"], "private_key_file": str(lab.dir / "ssh/id_ed25519"),
                  "known_hosts_file": str(lab.dir / "known_hosts"), "sudo_password_file": str(wrong)}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inv))
    before = fingerprint(lab)
    state = replace_etcd_member(inventory=str(path), member="etcd2", auto_approve=True, return_state=True)
    msg = error_of(state)
    assert not state.is_completed()
    assert "sudo refused to run" in msg and "for nova" in msg and "ssh.sudo_password" in msg, msg
    # At the first look (taking the cluster lock), not after wait_for_cluster_seconds of tries.
    assert msg.startswith(f"cluster {lab.cluster().name}: cannot take the recovery lock"), msg
    assert "not-the-password" not in msg
    assert fingerprint(lab) == before
