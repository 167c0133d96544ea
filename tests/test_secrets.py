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


def _secret_line(key_file: Path) -> str:
    """A line from the middle of a private key's body: what any leak of the key would carry."""
    body = [ln for ln in key_file.read_text().splitlines() if ln and not ln.startswith("-----")]
    return body[len(body) // 2]


def test_no_secret_in_any_record_checkpoint_error_or_process_list(tmp_path):
    """A backup to S3 (encrypted, signed, with StarVault) and a restore from it, as the non-root
    operator with a sudo password and etcd auth on. Every secret they use is then looked for
    in what Prefect keeps of the runs (parameters, logs, artifacts, state messages), in the
    checkpoints, in a failed run's error, and in every command line seen while they worked."""
    import os
    import uuid
    from http.server import ThreadingHTTPServer

    from blocks.storage import S3Credentials, StarVaultCredentials
    from flows.machinery import state_dir
    from flows.restore import restore_etcd_cluster
    from tests.helpers import ROOT, make_bucket, put_keys, run_record
    from tests.test_backup import TOKEN, _StarVault
    from tests.test_encryption import inventory_with, keypair

    lab = make_lab(3, sudo_password=True, real_hosts=True)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _StarVault)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        put_keys(lab, "/registry/pods/p", 50)
        for args in (["user", "add", f"root:{PASSWORD}"], ["user", "grant-role", "root", "root"], ["auth", "enable"]):
            lab.etcdctl(*args)
        for m in lab.masters():
            lab.in_master(m.member, "sh", "-c", f"printf 'ETCDCTL_USER=root\\nETCDCTL_PASSWORD={PASSWORD}\\n' "
                                                ">> /etc/etcd.env")
        s3_secret = f"S3-secret-{uuid.uuid4().hex}"
        endpoint = lab.state()["s3"]["endpoint"]
        bucket = f"scan-{uuid.uuid4().hex[:8]}"
        make_bucket(endpoint, bucket)
        S3Credentials(endpoint_url=endpoint, access_key_id="nova-scan", secret_access_key=s3_secret).save(
            "s3-scan", overwrite=True)
        StarVaultCredentials(address=f"http://127.0.0.1:{srv.server_address[1]}", token=TOKEN).save(
            "sv-scan", overwrite=True)
        pub, key = keypair("age-scan")
        keypair("age-stranger-scan")
        inv = inventory_with(lab, [pub])
        secrets = {"ssh key": _secret_line(lab.dir / "ssh" / "id_ed25519"),
                   "signing key": _secret_line(ROOT / "signing" / "id_ed25519"),
                   "sudo password": (lab.dir / "sudo-password").read_text().strip(), "etcd password": PASSWORD,
                   "S3 secret key": s3_secret, "StarVault token": TOKEN,
                   "age identity": next(ln for ln in key.read_text().splitlines() if ln.startswith("AGE-SECRET"))}
        store = f"s3://{bucket}/lab"
        with _Sampler() as ps:
            backup = backup_master_nodes(inventory=inv, store=store, s3_block="s3-scan", starvault_block="sv-scan",
                                         encrypt_etcd_snapshot=True, return_state=True)
            assert backup.is_completed(), error_of(backup)
            lab.break_member("etcd1", "corrupt")
            failed = restore_etcd_cluster(inventory=inv, store=store, s3_block="s3-scan",
                                          identity_block="age-stranger-scan", auto_approve=True, return_state=True)
            assert "cannot decrypt" in error_of(failed)
            restore = restore_etcd_cluster(inventory=inv, store=store, s3_block="s3-scan", identity_block="age-scan",
                                           auto_approve=True, return_state=True)
            assert restore.is_completed(), error_of(restore)
        assert any("etcdctl" in c for c in ps.seen) and any("sudo" in c for c in ps.seen), "the sampler saw nothing"
        places = {"process list": "\n".join(ps.seen), "failed run's error": error_of(failed)}
        for name, state in (("backup", backup), ("failed restore", failed), ("restore", restore)):
            places[f"{name}: parameters, logs, artifacts, state"] = (
                run_record(str(state.state_details.flow_run_id)) + str(state.message))
        checkpoints = []
        for d, _, names in os.walk(state_dir()):
            for n in names:
                checkpoints.append(Path(d, n).read_bytes().decode(errors="replace"))
        assert checkpoints, "no checkpoint was written: the scan of them proves nothing"
        places["checkpoints"] = "\n".join(checkpoints)
        leaks = [f"{what} in {where}" for where, text in places.items() for what, s in secrets.items() if s in text]
        assert not leaks, leaks
    finally:
        srv.shutdown()
        lab.destroy()
