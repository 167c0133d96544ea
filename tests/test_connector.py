"""The SSH connector against a lab master's real sshd."""

from __future__ import annotations

import hashlib
import io
import subprocess
import os
import threading
import time
from pathlib import Path

import pytest

from core.errors import CommandError, ConnectError, ConnectionLost
from tasks.remote import LocalConnector, connect


@pytest.fixture(scope="module")
def lab():
    from tests.helpers import make_lab

    lab = make_lab(1)
    yield lab
    lab.destroy()


HOSTILE = ["a b", "it's", 'say "hi"', "x; touch /tmp/nova-dr-pwned", "$(touch /tmp/nova-dr-pwned)", "`id`", "*", "\\n",
           "--help", "", "é"]


def test_hostile_arguments_arrive_verbatim(lab):
    c = lab.cluster()
    conn = connect(c, c.masters[0])
    res = conn.run(["printf", "%s\\0", *HOSTILE])
    assert res.stdout.split("\0")[:-1] == HOSTILE
    assert not os.path.exists("/tmp/nova-dr-pwned")
    local = LocalConnector().run(["printf", "%s\\0", *HOSTILE])
    assert local.stdout == res.stdout


def test_unknown_host_key_is_refused_with_the_fix(lab):
    c = lab.cluster()
    c = c.model_copy(update={"ssh": c.ssh.model_copy(update={"known_hosts": _secret("")})})
    with pytest.raises(ConnectError) as e:
        connect(c, c.masters[0]).run(["true"])
    assert "host key unknown" in str(e.value) and "ssh-keyscan -p 22 " + c.masters[0].address in str(e.value)


def test_changed_host_key_is_refused_with_the_fix(lab, tmp_path):
    import subprocess

    c = lab.cluster()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    kh = f"{c.masters[0].address} {other}\n"
    c = c.model_copy(update={"ssh": c.ssh.model_copy(update={"known_hosts": _secret(kh)})})
    with pytest.raises(ConnectError) as e:
        connect(c, c.masters[0]).run(["true"])
    assert "host key CHANGED" in str(e.value) and f"ssh-keygen -R '{c.masters[0].address}'" in str(e.value)


def test_unreachable_master_is_one_connect_error(lab):
    c = lab.cluster()
    m = c.masters[0].model_copy(update={"address": "127.0.99.99", "node": "ghost"})
    ssh = c.ssh.model_copy(update={"connect_attempts": 2, "connect_timeout": 1})
    with pytest.raises(ConnectError, match="ghost .*unreachable after 2 attempts"):
        connect(c.model_copy(update={"ssh": ssh}), m).run(["true"])


def test_dropped_connection_is_reopened(lab):
    c = lab.cluster()
    conn = connect(c, c.masters[0])
    assert conn.run(["echo", "one"]).stdout == "one\n"
    conn._client.get_transport().sock.close()  # the network drops under us
    assert conn.run(["echo", "two"]).stdout == "two\n"


def test_a_connection_dropped_under_parallel_steps_fails_only_commands_in_flight(lab):
    """Steps on one master share its connection. When it drops, each thread's failed channel
    open must reopen it without closing the connection another thread just opened (seen in CI:
    a step failed with a bare EOFError and was not retried). A command in flight may fail, but
    only as ConnectionLost, which the flows retry."""
    c = lab.cluster()
    conn = connect(c, c.masters[0])
    assert conn.run(["true"]).code == 0
    outcomes: list[str] = []

    def work(i: int):
        for j in range(25):
            try:
                out = conn.run(["echo", f"{i}-{j}"]).stdout
                outcomes.append("ok" if out == f"{i}-{j}\n" else f"wrong output {out!r}")
            except ConnectionLost:
                outcomes.append("lost")
            except Exception as e:  # anything else is a defect
                outcomes.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    drops = 0
    for _ in range(6):
        time.sleep(0.15)
        client = conn._client  # read once: a thread may be replacing it
        transport = client.get_transport() if client is not None else None
        if transport is not None:
            transport.sock.close()  # the network drops under every thread
            drops += 1
    for t in threads:
        t.join(120)
    bad = [o for o in outcomes if o not in ("ok", "lost")]
    assert len(outcomes) == 150 and not bad, bad[:5]
    # The network did drop, and commands in flight were cut: at most one per thread and drop.
    assert drops >= 3 and 1 <= outcomes.count("lost") <= 6 * drops, (drops, outcomes.count("lost"))
    assert conn.run(["echo", "after"]).stdout == "after\n"


def test_put_get_100mb_round_trip(lab, tmp_path):
    c = lab.cluster()
    conn = connect(c, c.masters[0])
    src, back = tmp_path / "big", tmp_path / "back"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    conn.put_file(src, "/var/lib/nova-dr-test-big", mode=0o600)
    conn.get_file("/var/lib/nova-dr-test-big", back)
    remote = conn.run(["sha256sum", "/var/lib/nova-dr-test-big"]).stdout.split()[0]
    mode = conn.run(["stat", "-c", "%a", "/var/lib/nova-dr-test-big"]).stdout.strip()
    conn.run(["rm", "-f", "/var/lib/nova-dr-test-big"])
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert remote == digest == hashlib.sha256(back.read_bytes()).hexdigest()
    assert mode == "600"
    assert not (tmp_path / "back.part").exists()


def test_put_and_get_failures_name_the_file_and_leave_no_partial_copy(lab, tmp_path):
    c = lab.cluster()
    conn = connect(c, c.masters[0])
    src = tmp_path / "small"
    src.write_bytes(os.urandom(8 << 20))  # more than the channel's window: the command ends while we send
    with pytest.raises(CommandError, match="nova-dr-no-such-dir"):
        conn.put_file(src, "/var/lib/nova-dr-no-such-dir/file", mode=0o600)
    with pytest.raises(CommandError, match="nova-dr-no-such-file"):
        conn.get_file("/var/lib/nova-dr-no-such-file", tmp_path / "back")
    assert not (tmp_path / "back").exists()
    with pytest.raises(FileNotFoundError):
        conn.put_file(tmp_path / "missing", "/var/lib/nova-dr-test-missing")
    assert not list((Path(lab.masters()[0].node_dir) / "varlib.up").glob("nova-dr-test-missing*"))
    assert conn.run(["echo", "still usable"]).stdout == "still usable\n"


def _secret(v):
    from pydantic import SecretStr

    return SecretStr(v)


def test_a_slow_reader_gets_every_byte_of_a_stream(lab):
    """Every byte arrives when the reader is slower than sshd (the window fills, and the
    command exits long before its output is read): the stream ends at EOF."""
    c = lab.cluster()
    conn = connect(c, c.masters[0])
    got = {"n": 0, "calls": 0}

    class SlowSink:
        def write(self, data):
            got["calls"] += 1
            if got["calls"] < 4:
                time.sleep(0.5)  # the window fills; `head` exits long before we have read it all
            got["n"] += len(data)

    conn.stream(["head", "-c", "30000000", "/dev/zero"], SlowSink())
    assert got["n"] == 30_000_000


def test_a_cut_tar_stream_is_refused(tmp_path):
    from core.errors import NovaDRError
    from tasks.archive import stream_tar_gz

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(os.urandom(200_000))
    local = LocalConnector("local")
    out = io.BytesIO()
    stream_tar_gz(local, ["tar", "-cf", "-", "-C", str(tmp_path / "d"), "."], out)
    with pytest.raises(NovaDRError, match="ended early"):
        stream_tar_gz(local, ["sh", "-c", f"tar -cf - -C {tmp_path / 'd'} . | head -c 100000"], io.BytesIO())


def test_a_tar_sent_as_zstd_is_stored_as_the_same_gzip_tar_and_a_failure_on_either_side_is_refused(tmp_path):
    import gzip
    import tarfile

    from core.errors import NovaDRError
    from tasks.archive import stream_tar_gz

    (tmp_path / "d").mkdir()
    body = b'{"kind": "ConfigMap", "data": "x"}' * 20000
    (tmp_path / "d" / "f.db").write_bytes(body)
    local = LocalConnector("local")
    out = io.BytesIO()
    stream_tar_gz(local, ["tar", "-cf", "-", "-C", str(tmp_path / "d"), "f.db"], out, zstd=True)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(out.getvalue()))) as t:
        assert t.extractfile("f.db").read() == body
    with pytest.raises(NovaDRError, match="tar exited 2, zstd 0"):  # tar's own failure, not hidden by the pipe
        stream_tar_gz(local, ["tar", "-cf", "-", "-C", str(tmp_path / "d"), "nope"], io.BytesIO(), zstd=True)
    with pytest.raises(NovaDRError, match="ended early"):  # a tar cut short, then compressed
        stream_tar_gz(local, ["sh", "-c", f"tar -cf - -C {tmp_path / 'd'} f.db | head -c 300000"], io.BytesIO(),
                      zstd=True)
    # The zstd stream itself cut short, as a dropped link would leave it.
    whole = subprocess.run(["sh", "-c", f"tar -cf - -C {tmp_path / 'd'} f.db | zstd -1 -q -c"], capture_output=True,
                           check=True).stdout
    (tmp_path / "cut.zst").write_bytes(whole[: len(whole) - 40])

    class Cut(LocalConnector):
        def stream(self, argv, sink, *, timeout=3600, stdin=None):
            return super().stream(["cat", str(tmp_path / "cut.zst")], sink, timeout=timeout)

    with pytest.raises(NovaDRError, match="ended early"):
        stream_tar_gz(Cut("local"), ["tar", "-cf", "-", "-C", str(tmp_path / "d"), "f.db"], io.BytesIO(), zstd=True)


def _authorize(lab, tmp_path, name: str, passphrase: str = "") -> str:
    """A new key for nova on the lab's master; returns its private half."""
    import subprocess

    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(key)], check=True)
    keys = Path(lab.masters()[0].node_dir) / "varlib.up/nova/.ssh/authorized_keys"
    keys.write_text(keys.read_text() + (tmp_path / f"{name}.pub").read_text())
    return key.read_text()


def _with_ssh(c, **changes):
    from pydantic import SecretStr

    ssh = c.ssh.model_copy(update={k: SecretStr(v) if isinstance(v, str) else v for k, v in changes.items()})
    return c.model_copy(update={"ssh": ssh})


def test_a_key_with_a_passphrase(lab, tmp_path):
    from core.errors import AuthError

    c = lab.cluster()
    key = _authorize(lab, tmp_path, "locked", passphrase="open sesame")
    conn = connect(_with_ssh(c, private_key=key, key_passphrase="open sesame"), c.masters[0])
    try:
        assert conn.run(["id", "-un"]).code == 0
    finally:
        conn.close()
    with pytest.raises(AuthError, match="protected by a passphrase: give ssh.key_passphrase_file"):
        connect(_with_ssh(c, private_key=key), c.masters[0]).run(["true"])
    with pytest.raises(AuthError, match="ssh.key_passphrase does not open it") as err:
        connect(_with_ssh(c, private_key=key, key_passphrase="wrong"), c.masters[0]).run(["true"])
    assert "wrong" not in str(err.value)


def test_keys_from_an_ssh_agent(lab, tmp_path, monkeypatch):
    import subprocess

    from core.errors import AuthError

    c = lab.cluster()
    _authorize(lab, tmp_path, "in-agent")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        subprocess.run(["ssh-add", "-q", str(tmp_path / "in-agent")], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                       check=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        agent_only = c.model_copy(update={"ssh": c.ssh.model_copy(update={"private_key": None, "use_agent": True})})
        conn = connect(agent_only, c.masters[0])
        try:
            assert conn.run(["id", "-un"]).code == 0
        finally:
            conn.close()
        # The agent is asked only where the inventory says so: its key alone, unasked, is refused.
        other = _with_ssh(c, private_key=_authorize_nowhere(tmp_path))
        with pytest.raises(AuthError, match="authentication refused"):
            connect(other, c.masters[0]).run(["true"])
    finally:
        agent.kill()
        agent.wait()


def _authorize_nowhere(tmp_path) -> str:
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    return (tmp_path / "stranger").read_text()


def test_a_copy_cut_by_a_dropped_connection_never_gets_its_final_name(lab, tmp_path):
    """When the connection drops, sshd closes the command's stdin and `cat` exits 0: the part
    received must not be renamed into place as if it were the whole file."""
    c = lab.cluster()
    conn = connect(c, c.masters[0])
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    varlib = Path(lab.masters()[0].node_dir) / "varlib.up"  # /var/lib on the master

    def part_size() -> int:  # the copy's own part file, `.part.<pid>`
        return max((p.stat().st_size for p in varlib.glob("nova-dr-test-cut.part.*")), default=-1)

    result: dict = {}

    def copy():
        try:
            conn.put_file(src, "/var/lib/nova-dr-test-cut", mode=0o600)
            result["ok"] = True
        except Exception as err:
            result["err"] = err

    t = threading.Thread(target=copy)
    t.start()
    deadline = time.monotonic() + 30
    while part_size() <= (4 << 20) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert part_size() > 0, "the copy never started"
    conn._client.get_transport().sock.close()  # the network drops half way
    t.join(60)
    assert isinstance(result.get("err"), ConnectionLost), result
    fresh = connect(c, c.masters[0])
    try:
        for _ in range(50):  # the master finishes with the cut stream on its own time
            if part_size() < 0:
                break
            time.sleep(0.1)
        assert fresh.run(["test", "-e", "/var/lib/nova-dr-test-cut"], check=False).code == 1  # never installed
        assert part_size() < 0  # and the cut part is gone
    finally:
        fresh.run(["sh", "-c", "rm -f /var/lib/nova-dr-test-cut /var/lib/nova-dr-test-cut.part.*"])
        fresh.close()
