"""Masters as real hosts (`lab up --hosts`): each master is a network namespace with its own
address on a lab bridge, and systemd as PID 1 of its own PID, mount, UTS, IPC and cgroup
namespaces, running sshd and a real `etcd.service` (Type=notify, Restart=always, User=etcd).

What keeps the machine safe (../shared/LAB.md, "Read this first": a systemd that saw the
machine's /tmp once deleted all of it):
- the master's root is an overlay whose lower layer is the machine's root, so the machine's
  files are read-only to it, and /etc, /var, /home, /root, /srv are private copies-on-write;
- /tmp and /run are tmpfs, /dev a tmpfs with a few nodes, /sys and /proc/sys read-only;
- a cgroup namespace rooted at lab-<ns> in the name=systemd and cgroup2 hierarchies;
- it boots `nova-lab.target` (sshd, dbus, etcd), and every unit that touches devices, the
  clock, sysctls, tmpfiles, timers or databases is masked;
- `lab up` checks that a file it left in the machine's /tmp survived and that nothing but
  the lab's own cgroups appeared at the hierarchies' roots.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

# The machine's own interface is on 192.0.2.0/24; 198.18.0.0/15 is reserved for network tests.
SUBNET = "198.18.{net}"
SYSTEMD_CG = Path("/sys/fs/cgroup/systemd")
ETCD_USER, ETCD_UID = "etcd", 4243

MASKED = """
systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket systemd-udev-trigger.service
systemd-udev-settle.service systemd-hwdb-update.service systemd-tmpfiles-setup.service
systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer
systemd-logind.service systemd-timesyncd.service systemd-sysctl.service systemd-modules-load.service
systemd-binfmt.service proc-sys-fs-binfmt_misc.automount kmod-static-nodes.service systemd-pstore.service
systemd-random-seed.service systemd-firstboot.service systemd-repart.service systemd-pcrphase-sysinit.service
systemd-pcrphase.service systemd-sysusers.service systemd-machine-id-commit.service systemd-remount-fs.service
systemd-journald-audit.socket systemd-networkd.service systemd-resolved.service networking.service
dev-hugepages.mount dev-mqueue.mount sys-fs-fuse-connections.mount sys-kernel-config.mount
sys-kernel-debug.mount sys-kernel-tracing.mount cron.service postgresql.service postgresql@.service
getty@.service console-getty.service serial-getty@.service apt-daily.timer apt-daily-upgrade.timer
dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer logrotate.timer man-db.timer
""".split()

# kubespray's etcd unit, with etcd's own user (as most distributions ship it).
ETCD_UNIT = """[Unit]
Description=etcd
After=network.target
# Five starts in 20 s and the unit refuses more until `systemctl reset-failed`; a crash loop
# (RestartSec=5s) stays below that and shows as activating (auto-restart).
StartLimitIntervalSec=20s
StartLimitBurst=5

[Service]
Type=notify
User=etcd
EnvironmentFile=/etc/etcd.env
ExecStart=/opt/etcd/etcd
Restart=always
RestartSec=5s
TimeoutStartSec=60s
LimitNOFILE=40000

[Install]
WantedBy=multi-user.target
"""


class HostError(Exception):
    pass


def cg_name(net: int, name: str) -> str:
    return f"n{net}-{name}"


def address(net: int, i: int) -> str:
    return f"{SUBNET.format(net=net)}.{i}"


def bridge(net: int) -> str:
    return f"novalab{net}"


def netns(net: int, name: str) -> str:
    return f"novalab{net}-{name}"


def veth(net: int, name: str) -> str:
    return f"nl{net}{name}"[:15]


def _sh(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=60)
    if check and p.returncode != 0:
        raise HostError(f"{shlex.join(cmd)}: {(p.stderr or p.stdout).strip()[-400:]}")
    return p


# -- network -----------------------------------------------------------------------------
def bridge_up(net: int) -> None:
    br = bridge(net)
    if _sh("ip", "link", "show", br, check=False).returncode == 0:
        raise HostError(f"bridge {br} exists (another lab on --net {net}?); `nova-dr lab down` that lab, or pick --net")
    _sh("ip", "link", "add", br, "type", "bridge")
    _sh("ip", "addr", "add", f"{address(net, 1)}/24", "dev", br)
    _sh("ip", "link", "set", br, "up")


def host_net_up(net: int, name: str, addr: str) -> None:
    ns, v = netns(net, name), veth(net, name)
    _sh("ip", "netns", "add", ns)
    _sh("ip", "link", "add", v, "type", "veth", "peer", "name", "eth0", "netns", ns)
    _sh("ip", "link", "set", v, "master", bridge(net), "up")
    for cmd in (["addr", "add", f"{addr}/24", "dev", "eth0"], ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
        _sh("ip", "-n", ns, *cmd)


def net_down(net: int, names: list[str]) -> None:
    for name in names:
        _sh("ip", "link", "del", veth(net, name), check=False)
        _sh("ip", "netns", "del", netns(net, name), check=False)
    _sh("ip", "link", "del", bridge(net), check=False)


def nft(ns: str, script: str) -> None:
    _sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=script)


def _table(name: str, chains: dict[str, str]) -> str:
    """An nft script that replaces table inet NAME with these chains (hook: rule), at once."""
    body = "".join(f" chain {hook} {{\n  type filter hook {hook} priority -10; policy accept;\n  {rule}\n }}\n"
                   for hook, rule in chains.items())
    return f"add table inet {name}\ndelete table inet {name}\n" + (f"table inet {name} {{\n{body}}}\n" if chains else "")


def only_ssh_from(ns: str, allowed: str) -> None:
    """The master answers SSH from the bastion only, as behind a real one."""
    nft(ns, _table("novalab_ssh", {"input": f"tcp dport 22 ip saddr != {allowed} drop"}))


def fault(net: int, name: str, how: str, value: float | None = None) -> str:
    """`lab net MEMBER cut|heal|loss PCT|rate MBIT`, applied inside the member's namespace
    (nftables for drops; tc tbf on both ends of its veth for a rate)."""
    ns, v = netns(net, name), veth(net, name)
    if how == "heal":
        nft(ns, _table("novalab_fault", {}))
        for args in (["-n", ns, "qdisc", "del", "dev", "eth0", "root"], ["qdisc", "del", "dev", v, "root"]):
            _sh("tc", *args, check=False)
        return f"{name}: faults removed"
    if how == "cut":
        nft(ns, _table("novalab_fault", {"input": "iifname eth0 counter drop",
                                         "output": "oifname eth0 counter drop"}))
        return f"{name}: cut off the network (every packet on eth0 dropped, both ways)"
    if how == "loss":
        if value is None or not 0 < value < 100:
            raise HostError(f"{name}: loss needs a percentage above 0 and below 100, e.g. `lab net {name} loss 5`")
        pct = int(value)
        nft(ns, _table("novalab_fault", {"input": f"iifname eth0 numgen random mod 100 < {pct} counter drop",
                                         "output": f"oifname eth0 numgen random mod 100 < {pct} counter drop"}))
        return f"{name}: {pct}% of packets dropped, both ways"
    if how == "rate":
        if value is None or value <= 0:
            raise HostError(f"{name}: rate needs Mbit/s above 0, e.g. `lab net {name} rate 100`")
        kbit = max(8, int(value * 1000))
        burst = max(16, kbit // 8 // 10)  # ~100 ms of traffic, in kbyte
        for args in (["-n", ns, "qdisc", "replace", "dev", "eth0"], ["qdisc", "replace", "dev", v]):
            _sh("tc", *args, "root", "tbf", "rate", f"{kbit}kbit", "burst", f"{burst}kb", "latency", "400ms")
        return f"{name}: limited to {value:g} Mbit/s each way"
    raise HostError(f"{how!r}: use cut, heal, loss PCT or rate MBIT")


# -- cgroups -----------------------------------------------------------------------------
# systemd mounts every v1 controller it knows inside the master and, with a cgroup
# namespace, creates its slices at the namespace's root in each: so the launcher first moves
# itself into lab-NAME below its own cgroup in every hierarchy (seen here: without that, a
# master's init.scope and system.slice appeared at the root of the machine's pids and devices
# hierarchies). cgroup2, which the machine does not mount, is mounted only inside throwaway
# mount namespaces, on a folder of the lab's.
def _v1_hierarchies() -> list[tuple[str, str]]:
    """(mount point, this process's path in it) for every cgroup v1 hierarchy mounted here."""
    mine = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrl, path = line.split(":", 2)
        if hid != "0":
            mine[frozenset(ctrl.split(","))] = path
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, post = line.split(" - ", 1)
        fstype, _, opts = post.split()[:3]
        if fstype != "cgroup":
            continue
        opts_set = set(opts.split(","))
        for ctrl, path in mine.items():
            # cpuset: a new child has no CPUs or memory nodes, and joining it fails; systemd
            # never makes cgroups there
            if ctrl <= opts_set and "cpuset" not in ctrl:
                out.append((pre.split()[4], path))
    return out


def _cg2_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _cg2_run(script: str, scratch: Path) -> subprocess.CompletedProcess:
    """Run `script` with $cg the cgroup2 hierarchy, in a mount namespace that ends with it."""
    scratch.mkdir(parents=True, exist_ok=True)
    return _sh("unshare", "--mount", "--propagation", "private", "sh", "-c",
               f"cg={shlex.quote(str(scratch))} && mount -t cgroup2 none \"$cg\" && {{ {script}\n}}", check=False)


def cgroup_dirs(scratch: Path) -> set[str]:
    """Every folder at the root of each hierarchy and beside our own cgroup: what a leak
    would add to (`lab up` compares it before and after a boot)."""
    seen = set()
    for mount, path in _v1_hierarchies():
        for base in {mount, mount + path.rstrip("/")}:
            seen |= {f"{base}/{p.name}" for p in Path(base).iterdir() if p.is_dir()}
    p = _cg2_run(f"for b in \"$cg\" \"$cg\"{shlex.quote(_cg2_path().rstrip('/'))}; do "
                 "find \"$b\" -mindepth 1 -maxdepth 1 -type d -printf 'cgroup2:/%P\\n'; done", scratch)
    return seen | set(p.stdout.split())


def cgroup_enter_script(name: str, scratch: Path) -> str:
    """Shell that moves itself into lab-NAME in every hierarchy, before it unshares."""
    leaf = f"lab-{name}"
    cmds = [f"mkdir -p {shlex.quote(f'{m}{p.rstrip(chr(47))}/{leaf}')} && "
            f"echo $$ >{shlex.quote(f'{m}{p.rstrip(chr(47))}/{leaf}/cgroup.procs')}" for m, p in _v1_hierarchies()]
    d = shlex.quote(str(scratch))
    cg2 = shlex.quote(f"{_cg2_path().rstrip('/')}/{leaf}")
    cmds.append(f"mkdir -p {d} && mount -t cgroup2 none {d} && mkdir -p {d}{cg2} && echo $$ >{d}{cg2}/cgroup.procs "
                f"&& umount {d}")
    return " && ".join(cmds)


def cgroup_remove(name: str, scratch: Path, timeout: float = 10) -> list[str]:
    """rmdir lab-NAME depth first in every hierarchy; returns what could not be removed."""
    leaf = f"lab-{name}"
    v1 = " ".join(shlex.quote(f"{m}{p.rstrip('/')}/{leaf}") for m, p in _v1_hierarchies())
    cg2 = shlex.quote(f"{_cg2_path().rstrip('/')}/{leaf}")
    script = (f"for d in {v1} \"$cg\"{cg2}; do [ -d \"$d\" ] || continue; "
              "find \"$d\" -depth -type d -exec rmdir {} + 2>/dev/null; [ ! -d \"$d\" ] || echo \"$d\"; done")
    deadline = time.monotonic() + timeout
    while True:
        left = _cg2_run(script, scratch).stdout.split()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# -- the root a master boots ---------------------------------------------------------------
def lay_out_root(up: Path, hostname: str, addr: str, peers: dict[str, str], etcd: bool, host_key: Path) -> None:
    """Files the master's root overlay adds to the machine's: identity, sshd, the target,
    the masks, the etcd user and unit. `up` is the overlay's upper dir."""
    etc = up / "etc"
    sd = etc / "systemd/system"
    sd.mkdir(parents=True, exist_ok=True)
    (etc / "hostname").write_text(hostname + "\n")
    hosts = ["127.0.0.1 localhost", f"{addr} {hostname} {hostname.split('.')[0]}"]
    hosts += [f"{a} {h} {h.split('.')[0]}" for h, a in peers.items() if h != hostname]
    (etc / "hosts").write_text("\n".join(hosts) + "\n")
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    (etc / "fstab").write_text("# a lab master mounts nothing of its own\n")
    ssh = etc / "ssh"
    (ssh / "sshd_config.d").mkdir(parents=True, exist_ok=True)
    for old in ssh.glob("ssh_host_*"):
        old.unlink()
    for suffix in ("", ".pub"):  # the key known_hosts names
        shutil.copy(f"{host_key}{suffix}", ssh / f"ssh_host_ed25519_key{suffix}")
    (ssh / "ssh_host_ed25519_key").chmod(0o600)
    # Included first by Debian's sshd_config: the first value of a keyword wins.
    (ssh / "sshd_config.d/nova-lab.conf").write_text(
        f"ListenAddress {addr}:22\nHostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nAllowTcpForwarding yes\n"
        "MaxSessions 64\nMaxStartups 64:30:128\nLogLevel ERROR\n")
    wants = ["ssh.service", "dbus.service", "systemd-user-sessions.service", "systemd-journald.service"]
    if etcd:
        wants.append("etcd.service")
    (sd / "nova-lab.target").write_text(
        "[Unit]\nDescription=a nova-dr lab master\n"
        f"Requires={' '.join(wants[:3])}\nWants={' '.join(wants[3:])}\nAllowIsolate=yes\n")
    for unit in MASKED:
        link = sd / unit
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to("/dev/null")
    if etcd:
        (sd / "etcd.service").write_text(ETCD_UNIT)
        _add_system_user(etc, ETCD_USER, ETCD_UID, "/var/lib/etcd")


def _add_system_user(etc: Path, user: str, uid: int, home: str) -> None:
    for name, line in (("passwd", f"{user}:x:{uid}:{uid}:etcd:{home}:/usr/sbin/nologin"),
                       ("group", f"{user}:x:{uid}:"), ("shadow", f"{user}:!:20000::::::")):
        f = etc / name
        base = f.read_text() if f.exists() else Path("/etc", name).read_text()
        kept = [x for x in base.splitlines() if not x.startswith(f"{user}:")]
        f.write_text("\n".join(kept + [line]) + "\n")
    (etc / "shadow").chmod(0o640)


def init_script(node_dir: Path, binds: dict[str, Path]) -> str:
    """What runs as PID 1 of the new namespaces until it execs systemd in the master's root."""
    d = shlex.quote(str(node_dir))
    r = f"{d}/root"
    lines = [
        "set -eu", "mount --make-rprivate /",
        f"rm -rf {d}/work && mkdir -p {d}/work {r}",
        f"mount -t overlay overlay -o lowerdir=/,upperdir={d}/up,workdir={d}/work {r}",
        f"mount -t proc proc {r}/proc",
        # /proc/sys is the machine's for everything but the network: read-only, as nspawn does
        f"mount --bind {r}/proc/sys {r}/proc/sys && mount -o remount,bind,ro {r}/proc/sys",
        f"if [ -e {r}/proc/sysrq-trigger ]; then mount --bind {r}/proc/sysrq-trigger {r}/proc/sysrq-trigger && "
        f"mount -o remount,bind,ro {r}/proc/sysrq-trigger; fi",
        f"mount -t sysfs -o ro sysfs {r}/sys",
        f"mount -t tmpfs -o mode=755 tmpfs {r}/sys/fs/cgroup",
        f"mkdir {r}/sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup {r}/sys/fs/cgroup/systemd",
        f"mount -t tmpfs -o mode=755,nosuid tmpfs {r}/dev",
    ]
    for node, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                               ("urandom", 1, 9), ("tty", 5, 0), ("ptmx", 5, 2)):
        lines.append(f"mknod -m 666 {r}/dev/{node} c {major} {minor}")
    lines += [
        f"mkdir {r}/dev/pts {r}/dev/shm && mount -t devpts -o newinstance,ptmxmode=0666 devpts {r}/dev/pts",
        f"mount -t tmpfs -o mode=1777 tmpfs {r}/dev/shm",
        f"ln -s /proc/self/fd {r}/dev/fd && ln -s /proc/self/fd/0 {r}/dev/stdin",
        f"ln -s /proc/self/fd/1 {r}/dev/stdout && ln -s /proc/self/fd/2 {r}/dev/stderr",
        f"mount -t tmpfs -o mode=755 tmpfs {r}/run",
        f"mount -t tmpfs -o mode=1777 tmpfs {r}/tmp",
    ]
    # a data dir on a disk of its own (a mount point), and the lab's hold folder
    for inside, src in binds.items():
        lines.append(f"mkdir -p {r}{shlex.quote(inside)}")
        lines.append(f"mount --bind {shlex.quote(str(src))} {r}{shlex.quote(inside)}")
    lines.append(f"exec chroot {r} /lib/systemd/systemd --system --unit=nova-lab.target")
    # one command a line, so that `set -e` stops at the first that fails
    return "\n".join(x if x.startswith("if ") else x.replace(" && ", "\n") for x in lines) + "\n"


def boot(net: int, name: str, node_dir: Path, binds: dict[str, Path]) -> tuple[int, int]:
    """Start the master; returns (launcher pid, init pid as the machine sees it)."""
    (node_dir / "init.sh").write_text(init_script(node_dir, binds))
    log = open(node_dir / "boot.log", "ab")
    script = (f"{cgroup_enter_script(cg_name(net, name), node_dir / 'cg2')} && exec ip netns exec {shlex.quote(netns(net, name))} "
              "unshare --pid --fork --kill-child --mount --uts --ipc --cgroup --mount-proc "
              f"sh {shlex.quote(str(node_dir / 'init.sh'))}")
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = _children(p.pid)
        if kids and _comm(kids[0]) == "systemd":
            return p.pid, kids[0]
        if p.poll() is not None:
            break
        time.sleep(0.02)
    raise HostError(f"{name} did not boot; see {node_dir}/boot.log")


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def in_master(init_pid: int, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command inside a master, as its root (for the lab itself, never for nova-dr)."""
    p = subprocess.run(["nsenter", "-t", str(init_pid), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", *cmd],
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise HostError(f"in master (pid {init_pid}): {shlex.join(cmd)}: {(p.stderr or p.stdout).strip()[-400:]}")
    return p


def unit_pid(name: str, unit: str = "etcd.service", comm: str = "etcd") -> int:
    """The host pid of a unit's main process, found by its cgroup (the master's systemd sees
    its own pid namespace; the machine sees the full path below lab-NAME): the process named
    `comm` whose parent is not one too (sshd's sessions are its children)."""
    want = f"/lab-{name}/system.slice/{unit}"
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cg = (p / "cgroup").read_text()
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if any(line.endswith(":" + want) and "name=systemd" in line for line in cg.splitlines()) \
                and alive(int(p.name)) and _comm(int(p.name)) == comm:
            found[int(p.name)] = ppid
    return next((pid for pid, ppid in found.items() if ppid not in found), 0)


def shutdown(launcher: int, init: int, timeout: float = 15) -> None:
    """Kill the init: the kernel ends every process of its PID namespace."""
    for pid in (init, launcher):
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while (alive(init) or alive(launcher)) and time.monotonic() < deadline:
        time.sleep(0.05)


def wipe_boot(node_dir: Path) -> None:
    shutil.rmtree(node_dir / "work", ignore_errors=True)
