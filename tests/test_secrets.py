"""Secrets stay off command lines: etcd's user and password (ETCDCTL_USER / ETCDCTL_PASSWORD in
a master's etcd.env) reach etcdctl on stdin, never as `env K=V` arguments that every local user
on the master can read with `ps`, and that our error messages would print."""

from __future__ import annotations

import threading
from pathlib import Path

from core.etcd import etcdctl_command
from flows.backup import backup_master_nodes
from flows.member import restart_etcd_member
from tests.helpers import make_lab
from tests.test_restore import error_of

PASSWORD = "Pw-4d81c07e-not-in-ps"


def test_etcdctl_command_sends_the_secret_settings_on_stdin():
    env = {"ETCDCTL_CACERT": "/ca", "ETCDCTL_USER": "root", "ETCDCTL_PASSWORD": "p=w 'x", "ETCD_NAME": "e"}
    argv, stdin = etcdctl_command(env, ["https://a:2379"])
    assert not any("p=w" in a or a.startswith(("ETCDCTL_USER", "ETCDCTL_PASSWORD")) for a in argv)
    assert stdin == b"ETCDCTL_USER=root\nETCDCTL_PASSWORD=p=w 'x\n"
    assert argv[-3:] == ["ETCDCTL_API=3", "ETCDCTL_CACERT=/ca", "ETCDCTL_ENDPOINTS=https://a:2379"]
    assert etcdctl_command({"ETCDCTL_CACERT": "/ca"}) == (["env", "ETCDCTL_API=3", "ETCDCTL_CACERT=/ca"], b"")


class _Sampler:
    """Every process's command line on this machine (the lab's masters included: their PID
    namespaces are children of ours), read again and again while a flow works."""

    def __init__(self):
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            for p in Path("/proc").iterdir():
                if p.name.isdigit():
                    try:
                        self.seen.add((p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                    except OSError:
                        pass
            self.stop.wait(0.005)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def test_etcd_password_never_shows_in_a_process_list_on_any_master(tmp_path):
    lab = make_lab(3, real_hosts=True)
    try:
        # etcd with auth on: a root user with a password; the masters' etcd.env names it, as
        # the platform's would. (Set up before the sampler starts: these commands are ours.)
        for args in (["user", "add", f"root:{PASSWORD}"], ["user", "grant-role", "root", "root"], ["auth", "enable"]):
            lab.etcdctl(*args)
        for m in lab.masters():
            lab.in_master(m.member, "sh", "-c", f"printf 'ETCDCTL_USER=root\\nETCDCTL_PASSWORD={PASSWORD}\\n' "
                                                ">> /etc/etcd.env")
        inv = str(lab.dir / "inventory.yaml")
        (tmp_path / "store").mkdir()
        with _Sampler() as ps:
            state = backup_master_nodes(inventory=inv, store=str(tmp_path / "store"), INCLUDE_STARVAULT_DB_BACKUP=False,
                                        return_state=True)
            assert state.is_completed(), error_of(state)  # etcdctl authenticated: the password did arrive
            state = restart_etcd_member(inventory=inv, member="etcd2", force=True, auto_approve=True,
                                        return_state=True)
            assert state.is_completed(), error_of(state)
        etcdctl_runs = [c for c in ps.seen if "etcdctl" in c and "snapshot" in c]
        assert etcdctl_runs, "the sampler saw no etcdctl: it proves nothing"
        leaks = [c for c in ps.seen if PASSWORD in c]
        assert not leaks, leaks[:3]
    finally:
        lab.destroy()
