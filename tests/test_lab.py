"""The lab: real masters with their own sshd, host key and private production paths."""

from __future__ import annotations

import subprocess

import pytest

from lab.lab import _pid_alive
from tasks.remote import connect
from tests.helpers import _free_port, make_lab


@pytest.mark.parametrize("n", [1, 3, 5])
def test_lab_up_status_down(n):
    lab = make_lab(n)
    try:
        st = lab.status()
        assert [r["member"] for r in st] == [f"etcd{i}" for i in range(1, n + 1)]
        assert all(r["sshd"] and r["etcd_process"] and r["healthy"] for r in st)
        assert [r["data_dir_mount_point"] for r in st] == [n >= 3 and i == n for i in range(1, n + 1)]
        # etcdctl.env works from the host, as the README says.
        out = subprocess.run(["bash", "-c", f". {lab.dir}/etcdctl.env && etcdctl put /lab/probe yes >/dev/null && "
                              "etcdctl get / --prefix --keys-only && etcdctl member list"],
                             capture_output=True, text=True, check=True).stdout
        assert "/lab/probe" in out and out.count(", started,") == n
        # Each master answers over SSH with its own host key and sees its own /etc/etcd.env.
        cluster = lab.cluster()
        keys = set()
        for m in cluster.masters:
            conn = connect(cluster, m)
            assert f"ETCD_NAME={m.etcd_member}\n" in conn.run(["cat", "/etc/etcd.env"]).stdout
            keys.add(conn._client.get_transport().get_remote_server_key().get_base64())
            conn.close()
        assert len(keys) == n
        assert "already running" in lab.up(masters=n, net=lab.state()["net"])
        pids = [lab.etcd_pid(m.member) for m in lab.masters()] + [lab.sshd_pid(m.member) for m in lab.masters()]
        pids += [m.init_pid for m in lab.masters() if lab.real_hosts()]
        pids += [p for p in [lab.state()["s3"]["pid"]] if p]  # 0: the tests' shared S3 server
    finally:
        lab.down()
    assert pids and all(pids) and not any(_pid_alive(p) for p in pids)
    lab.destroy()


def test_lab_break(lab3):
    cluster = lab3.cluster()
    lab3.break_member("etcd1", "stop")
    lab3.break_member("etcd2", "corrupt")
    lab3.break_member("etcd3", "wipe")
    st = {r["member"]: r for r in lab3.status()}
    assert not any(r["healthy"] or r["etcd_process"] for r in st.values())
    c1 = connect(cluster, cluster.masters[0])
    # a real host stops the unit (Restart=always would bring a killed etcd back)
    stopped = "inactive" if lab3.real_hosts() else "failed"
    assert c1.run(["systemctl", "is-active", "etcd"], check=False).stdout.strip() == stopped
    c2 = connect(cluster, cluster.masters[1])
    assert c2.run(["stat", "-c", "%s", "/var/lib/etcd/member/snap/db"]).stdout.strip() == "4096"
    assert c2.run(["systemctl", "start", "etcd"], check=False).code != 0  # it panics on start
    assert "file size too small" in c2.run(["journalctl", "-u", "etcd", "-n", "30"]).stdout
    c3 = connect(cluster, cluster.masters[2])
    assert c3.run(["ls", "-A", "/var/lib/etcd"]).stdout == ""  # a mount point: emptied, still there
    with pytest.raises(Exception, match="use stop, corrupt or wipe"):
        lab3.break_member("etcd1", "explode")


def test_lab_systemctl_is_not_fooled_by_a_reused_pid(lab_factory):
    """pid_max is 32768 here: a stopped member's pid can go to another process. The lab's
    systemctl must then say inactive and start etcd, not answer "already running"."""
    lab = lab_factory(1, real_hosts=False)  # the loopback lab's own systemctl
    cluster = lab.cluster()
    m = cluster.masters[0]
    conn = connect(cluster, m)
    pidfile = f"{lab.master('etcd1').node_dir}/run/etcd.pid"
    old_start = open(pidfile).read().split()[1]
    conn.run(["systemctl", "stop", "etcd"])
    other = subprocess.Popen(["sleep", "60"])  # the process that got the pid
    try:
        with open(pidfile, "w") as f:
            f.write(f"{other.pid} {old_start}\n")
        assert lab.etcd_pid("etcd1") == 0
        assert conn.run(["systemctl", "is-active", "etcd"], check=False).stdout.strip() == "inactive"
        conn.run(["systemctl", "start", "etcd"])
        assert lab.etcd_pid("etcd1") not in (0, other.pid)
        assert all(r["healthy"] for r in lab.status())
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()
        conn.close()


def test_root_cannot_log_in_and_nova_gets_root_only_through_sudo(lab3):
    from core.errors import ConnectError

    cluster = lab3.cluster()
    m = cluster.masters[0]
    assert m.ssh_user == "nova" and cluster.ssh.become == "sudo"
    as_root = cluster.model_copy(update={"masters": [m.model_copy(update={"ssh_user": "root"})]})
    with pytest.raises(ConnectError, match="authentication refused"):
        connect(as_root, as_root.masters[0]).run(["true"])
    plain = connect(cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"become": "none"})}), m)
    try:
        assert plain.run(["id", "-un"]).stdout.strip() == "nova"
        assert plain.run(["cat", "/etc/kubernetes/pki/ca.key"], check=False).code != 0  # not root
    finally:
        plain.close()
    sudo = connect(cluster, m)
    try:
        assert sudo.run(["id", "-u"]).stdout.strip() == "0"
        assert "PRIVATE KEY" in sudo.run(["cat", "/etc/kubernetes/pki/ca.key"]).stdout
    finally:
        sudo.close()


def test_link_profiles_limit_the_flow_machines_link_and_add_a_round_trip(lab3, tmp_path):
    """What the benchmarks' link profiles do (lab/links.py): tc on the bridge limits what this
    machine sends the masters (and, through an ifb, what it receives), counted by the bridge;
    the delaying forwarder adds its round trip to an SSH connection."""
    import os
    import socket
    import time

    from lab.links import DelayForwarder, link_bytes, shape, unshape

    net = lab3.state()["net"]
    cluster = lab3.cluster()
    conn = connect(cluster, cluster.masters[0])
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(4 << 20))
    try:
        before = link_bytes(net)
        t0 = time.monotonic()
        conn.put_file(blob, "/tmp/blob")
        free = time.monotonic() - t0
        assert link_bytes(net) - before >= 4 << 20  # counted where it crossed
        shape(net, 16)  # 2 MB/s: 4 MiB takes 2 s or more
        t0 = time.monotonic()
        conn.put_file(blob, "/tmp/blob")
        shaped = time.monotonic() - t0
        t0 = time.monotonic()
        conn.get_file("/tmp/blob", tmp_path / "back")  # the other way, through the ifb
        back = time.monotonic() - t0
    finally:
        unshape(net)
        conn.close()
    assert shaped > 1.8 and back > 1.8 and free < shaped / 2, (free, shaped, back)
    assert (tmp_path / "back").read_bytes() == blob.read_bytes()

    def banner(port: int) -> float:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert s.recv(64).startswith(b"SSH-2.0")
        return time.monotonic() - t0

    with DelayForwarder(_free_port(), cluster.masters[0].address, 22, 50) as fwd:
        assert banner(fwd.listen_port) >= 0.05  # the server's banner came back 50 ms late
