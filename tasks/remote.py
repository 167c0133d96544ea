"""Remote execution: run a command, put a file, get a file, on a master.

Commands are argv lists, quoted with shlex.quote (tasks/become.py, which also puts sudo in
front where the inventory says `ssh.become: sudo`): nothing from the inventory or a parameter
is ever pasted into a shell string unquoted. Host keys are checked strictly by default.
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Protocol, Sequence

import paramiko

from core.errors import AuthError, BecomeError, CommandError, ConnectError, ConnectionLost
from core.inventory import Cluster, Master
from tasks.become import command_line, sudo_refusal

log = logging.getLogger("nova_dr.remote")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


class Connector(Protocol):
    name: str

    def run(self, argv: Sequence[str], *, timeout: float = 120, check: bool = True,
            stdin: bytes | None = None) -> Result: ...

    def stream(self, argv: Sequence[str], sink, *, timeout: float = 3600, stdin: bytes | None = None) -> Result:
        """Run a command whose stdout goes to `sink` as it arrives (not kept in memory)."""

    def put_file(self, local: str | Path, remote: str, mode: int | None = None, unpack: str | None = None,
                 size: int | None = None) -> None:
        """Copy to `remote` through `remote`.part, renamed only once complete and `size` bytes
        long (default: the local file's). With `unpack`, `local` is a tar(.gz) and what lands
        in `remote` is that member of it, unpacked on the far side: the compressed bytes
        cross the network."""

    def get_file(self, remote: str, local: str | Path) -> None: ...

    def close(self) -> None: ...


_recorders: list[list[tuple[float, float, str, str]]] = []


@contextmanager
def record_commands():
    """While open, every SSH command lands in the list it yields as (start, end, step, what):
    its times in time.monotonic(), the Prefect task run it ran in ("" outside one) and the
    command's first words (an `sh -c` script by its label). The
    benchmarks' measure of orchestration overhead (wall time with no command running) and of
    round trips per step."""
    log_: list[tuple[float, float, str, str]] = []
    _recorders.append(log_)
    try:
        yield log_
    finally:
        _recorders.remove(log_)


def _task_name() -> str:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return ctx.task_run.name if ctx else ""


def _what(argv: Sequence[str]) -> str:
    words = [str(a) for a in argv]
    if words[:2] == ["sh", "-c"] and len(words) > 3:
        return f"sh {words[3]}"
    return " ".join(w for w in words[:3] if not w.startswith("-") and len(w) < 40)


@contextmanager
def _recorded(argv: Sequence[str] = ()):
    if not _recorders:
        yield
        return
    t0, step = time.monotonic(), _task_name()
    try:
        yield
    finally:
        for r in list(_recorders):
            r.append((t0, time.monotonic(), step, _what(argv) if argv else ""))


def _check(name: str, argv: Sequence[str], res: Result, check: bool) -> Result:
    if check and res.code != 0:
        raise CommandError(name, list(argv), res.code, res.stdout, res.stderr)
    return res


class LocalConnector:
    """Runs on the machine running the flow (the restore drill, tests)."""

    def __init__(self, name: str = "local"):
        self.name = name

    def run(self, argv, *, timeout=120, check=True, stdin=None) -> Result:
        p = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=timeout)
        res = Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))
        return _check(self.name, argv, res, check)

    def stream(self, argv, sink, *, timeout=3600, stdin=None) -> Result:
        with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.PIPE if stdin else subprocess.DEVNULL) as p:
            if stdin:
                p.stdin.write(stdin)
                p.stdin.close()
            err = bytearray()
            t = threading.Thread(target=lambda: err.extend(p.stderr.read()), daemon=True)
            t.start()
            while chunk := p.stdout.read1(1 << 20):  # what has come, not a full MiB: a watch trickles
                sink.write(chunk)
            code = p.wait(timeout)
            t.join()
        return _check(self.name, argv, Result(code, "", err.decode(errors="replace")), True)

    def put_file(self, local, remote, mode=None, unpack=None, size=None) -> None:
        part = Path(f"{remote}.part")
        if unpack:
            with tarfile.open(local, "r:*") as tar, tar.extractfile(unpack) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            shutil.copyfile(local, part)
        if size is not None and part.stat().st_size != size:
            part.unlink()
            raise CommandError(self.name, ["put", str(local), remote], 1, "", f"{remote}: not {size} bytes")
        if mode is not None:
            part.chmod(mode)
        part.replace(remote)

    def get_file(self, remote, local) -> None:
        shutil.copyfile(remote, local)

    def close(self) -> None:
        pass


def _host_key_name(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def _load_known_hosts(client: paramiko.SSHClient, text: str) -> None:
    keys = client.get_host_keys()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        if entry is None:
            continue
        for host in entry.hostnames:
            keys.add(host, entry.key.get_name(), entry.key)


def _transport(sock, **kw) -> paramiko.Transport:
    """AES-GCM first where the server offers it: no separate MAC pass, measured faster than
    paramiko's default aes128-ctr + hmac-sha2-256 for copies. The rest stay as fallbacks."""
    t = paramiko.Transport(sock, **kw)
    opts = t.get_security_options()
    gcm = tuple(c for c in opts.ciphers if c.endswith("-gcm@openssh.com"))
    opts.ciphers = gcm + tuple(c for c in opts.ciphers if c not in gcm)
    return t


def _load_private_key(text: str, passphrase: str | None) -> paramiko.PKey:
    encrypted = False
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(StringIO(text), password=passphrase)
        except paramiko.PasswordRequiredException:
            encrypted = True
        except (paramiko.SSHException, ValueError) as err:
            encrypted = encrypted or (passphrase is not None and "passphrase" in str(err).lower())
    if encrypted and passphrase is None:
        raise AuthError("ssh.private_key is protected by a passphrase: give ssh.key_passphrase_file (or the "
                        "block's key_passphrase), or use_agent: true with the key in the ssh-agent")
    if passphrase is not None:
        raise AuthError("ssh.private_key: ssh.key_passphrase does not open it (or it is not an OpenSSH/PEM "
                        "ed25519, ecdsa or rsa key)")
    raise ConnectError("ssh.private_key: not an OpenSSH/PEM private key (ed25519, ecdsa or rsa)")


class SSHConnector:
    """One paramiko connection to one master, reopened when it dropped between commands."""

    def __init__(self, master: Master, cluster: Cluster):
        self.master = master
        self.name = master.node
        self._ssh = cluster.ssh
        self._client: paramiko.SSHClient | None = None
        self._jump: paramiko.SSHClient | None = None  # the bastion's connection, when there is one
        self._lock = threading.Lock()
        pw = cluster.ssh.sudo_password
        self._become = (cluster.ssh.become, pw.get_secret_value() if pw is not None else None)

    def _command(self, argv) -> tuple[str, bytes]:
        return command_line(argv, *self._become)

    def _refused(self, argv, code: int, stderr: str) -> None:
        """A command sudo never ran is not the command's answer, even where a failure is expected."""
        if self._become[0] == "sudo" and (why := sudo_refusal(code, stderr)):
            raise BecomeError(f"{self.name}: sudo refused to run `{argv[0]}` as root for {self.master.ssh_user} "
                              f"({why}); check ssh.become, ssh.sudo_password and the sudo rules on the master")

    # -- connecting ------------------------------------------------------------------
    def _pkey(self) -> paramiko.PKey | None:
        s = self._ssh
        if s.private_key is None:
            return None  # the agent's keys only
        return _load_private_key(s.private_key.get_secret_value(),
                                 s.key_passphrase.get_secret_value() if s.key_passphrase is not None else None)

    def _new_client(self, what: str) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        _load_known_hosts(client, self._ssh.known_hosts.get_secret_value())
        if self._ssh.strict_host_keys:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:  # explicitly asked for in the inventory; logged loudly
            log.warning("ssh.strict_host_keys is false: accepting %s's host key unchecked", what)
            client.set_missing_host_key_policy(paramiko.MissingHostKeyPolicy())
        return client

    def _through_jump_host(self):
        """A channel to the master through the bastion (`ssh -J`), the bastion's key checked too."""
        j, m = self._ssh.jump_host, self.master
        where = f"jump host {j.user or m.ssh_user}@{j.address}:{j.port}"
        t = self._jump.get_transport() if self._jump is not None else None
        if t is None or not t.is_active():
            client = self._new_client(where)
            try:
                client.connect(j.address, port=j.port, username=j.user or m.ssh_user, pkey=self._pkey(),
                               timeout=self._ssh.connect_timeout, banner_timeout=self._ssh.connect_timeout,
                               auth_timeout=self._ssh.connect_timeout, allow_agent=self._ssh.use_agent,
                               look_for_keys=False, transport_factory=_transport)
            except paramiko.BadHostKeyException:
                raise AuthError(f"{where}: its host key CHANGED since it was recorded in known_hosts; verify it out "
                                f"of band, then `ssh-keygen -R '{_host_key_name(j.address, j.port)}'` and add the "
                                "new one") from None
            except paramiko.AuthenticationException:
                raise AuthError(f"{where}: authentication refused; check ssh.private_key and the jump host's "
                                "authorized_keys") from None
            except paramiko.SSHException as err:
                if "not found in known_hosts" in str(err):
                    raise AuthError(f"{where}: host key unknown (not in the inventory's known_hosts). Verify it and "
                                    f"add it: `ssh-keyscan -p {j.port} {j.address} >> known_hosts`") from None
                raise
            client.get_transport().set_keepalive(15)
            self._jump = client
        try:
            return self._jump.get_transport().open_channel("direct-tcpip", (m.address, m.ssh_port), ("127.0.0.1", 0),
                                                           timeout=self._ssh.connect_timeout)
        except paramiko.ChannelException as err:
            raise OSError(f"{where} could not reach {m.address}:{m.ssh_port}: {err}") from None

    def _connect_once(self) -> paramiko.SSHClient:
        m = self.master
        client = self._new_client(m.node)
        client.connect(
            m.address, port=m.ssh_port, username=m.ssh_user,
            sock=self._through_jump_host() if self._ssh.jump_host else None, pkey=self._pkey(), timeout=self._ssh.connect_timeout, banner_timeout=self._ssh.connect_timeout,
            # The agent only where the inventory asks for it; never ~/.ssh/id_* behind its back.
            auth_timeout=self._ssh.connect_timeout, allow_agent=self._ssh.use_agent, look_for_keys=False,
            transport_factory=_transport,
        )
        transport = client.get_transport()
        transport.set_keepalive(15)
        # Without it every command after the first waits ~40 ms: a small SSH message sits in
        # Nagle's buffer until the peer's delayed ACK (measured on the lab).
        sock = transport.sock if isinstance(transport.sock, socket.socket) else self._jump.get_transport().sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client

    def _client_or_connect(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is not None:
                t = self._client.get_transport()
                if t is not None and t.is_active():
                    return self._client
                self._client.close()
                self._client = None
            self._client = self._connect_with_retries()
            return self._client

    def _connect_with_retries(self) -> paramiko.SSHClient:
        m = self.master
        where = f"{m.node} ({m.ssh_user}@{m.address}:{m.ssh_port})"
        hk = _host_key_name(m.address, m.ssh_port)
        last: Exception | None = None
        for attempt in range(self._ssh.connect_attempts):
            try:
                return self._connect_once()
            except paramiko.BadHostKeyException:
                raise AuthError(
                    f"{where}: the host key CHANGED since it was recorded in known_hosts. "
                    "If the master was really reinstalled, verify the new key out of band, then "
                    f"`ssh-keygen -R '{hk}'` and `ssh-keyscan -p {m.ssh_port} {m.address}` into "
                    "the inventory's known_hosts; otherwise treat this as an attack"
                ) from None
            except paramiko.AuthenticationException:
                raise AuthError(
                    f"{where}: authentication refused; check ssh.private_key and that its public "
                    f"key is in {m.ssh_user}'s authorized_keys on the master"
                ) from None
            except paramiko.SSHException as err:
                if "not found in known_hosts" in str(err):
                    raise AuthError(
                        f"{where}: host key unknown (not in the inventory's known_hosts). Verify it "
                        f"and add it: `ssh-keyscan -p {m.ssh_port} {m.address} >> known_hosts`"
                    ) from None
                last = err
            except (OSError, EOFError) as err:
                last = err
            # Jitter, so that masters reconnecting together do not hit sshd in lockstep.
            time.sleep(min(4.0, 0.3 * 2**attempt) * (0.5 + random.random()))
        via = f" through jump host {self._ssh.jump_host.address}" if self._ssh.jump_host else ""
        raise ConnectError(
            f"{where}: unreachable{via} after {self._ssh.connect_attempts} attempts ({last}); check the "
            "address, that sshd runs, and the network"
        )

    # -- the interface ---------------------------------------------------------------
    def run(self, argv, *, timeout=120, check=True, stdin=None) -> Result:
        out = io.BytesIO()
        res = self._exec(argv, out, timeout, stdin)
        self._refused(argv, res.code, res.stderr)
        return _check(self.name, argv, Result(res.code, out.getvalue().decode(errors="replace"), res.stderr), check)

    def stream(self, argv, sink, *, timeout=3600, stdin=None) -> Result:
        res = self._exec(argv, sink, timeout, stdin)
        self._refused(argv, res.code, res.stderr)
        return _check(self.name, argv, res, True)

    def _open_channel(self):
        last: Exception | None = None
        for _ in range(3):
            client = self._client_or_connect()
            transport = client.get_transport()
            try:
                return transport.open_session(timeout=self._ssh.connect_timeout)
            except (paramiko.SSHException, OSError, EOFError, AttributeError) as e:
                # The channel never opened, so the command never ran: safe to reconnect and go on.
                # No transport: another thread closed this client already; the next try reconnects.
                if transport is not None:
                    self._drop(transport)
                last = e
        raise ConnectionLost(f"{self.name}: could not open an SSH channel: {last!r}")

    def _exec(self, argv, sink, timeout: float, stdin: bytes | None) -> Result:
        with _recorded(argv):
            return self._exec_unrecorded(argv, sink, timeout, stdin)

    def _exec_unrecorded(self, argv, sink, timeout: float, stdin: bytes | None) -> Result:
        chan = self._open_channel()
        try:
            chan.settimeout(timeout)
            line, first = self._command(argv)
            chan.exec_command(line)
            if first or stdin:
                chan.sendall(first + (stdin or b""))
            _send_eof(chan)
            err = bytearray()
            deadline = time.monotonic() + timeout
            pulse = _pulse(chan.get_transport())
            heard = time.monotonic()
            while True:
                # Read `closed` before the rest: the transport thread may take EOF, exit status
                # and close between two checks, and a close read last would then look like a
                # drop (seen in CI: a quick `env` failed as "channel closed" on a busy machine).
                closed = chan.closed
                if chan.recv_ready():
                    heard = time.monotonic()
                    data = chan.recv(1 << 20)
                    try:
                        sink.write(data)
                    except BaseException as e:  # the sink's own failure (a full disk), not the network's
                        raise _SinkFailed(e) from e
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.eof_received and chan.exit_status_ready():
                    # Done only at EOF: sshd may send the exit status while output is still queued
                    # behind the channel window (seen under load: a tar stream cut short, silently).
                    if not chan.recv_ready() and not chan.recv_stderr_ready():
                        break
                elif closed:
                    # Closed with no EOF: the connection dropped, even if an exit status of 0 came
                    # first, and output may be missing (seen: `echo` answered 0 with no output).
                    raise EOFError("channel closed before the command's output ended")
                else:
                    now = time.monotonic()
                    if now > deadline:
                        raise socket.timeout()
                    if now - heard > self._ssh.probe_after_seconds and not pulse.answers(
                            self._ssh.dead_after_seconds):
                        raise EOFError(f"no answer from the master for {self._ssh.dead_after_seconds:.0f}s "
                                       "(the network to it is down?)")
                    time.sleep(0.002)
            code = _exit_code(chan)
        except _SinkFailed as e:
            chan.close()
            raise e.original from None
        except socket.timeout:
            chan.close()
            raise CommandError(self.name, list(argv), -1, "", f"timed out after {timeout:.0f}s") from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            self._drop(chan.get_transport())
            # The command may or may not have run: the caller re-reads state before retrying.
            raise ConnectionLost(f"{self.name}: connection lost while running `{argv[0]}`: {e!r}") from None
        return Result(code, "", err.decode(errors="replace"))

    def put_file(self, local, remote, mode=None, unpack=None, size=None) -> None:
        # A plain `cat` on an exec channel, not SFTP: measured 1.8x faster with paramiko (SFTP
        # pays a request and an ack per 32 KiB).
        with open(local, "rb") as f, _recorded(["put-file"]):  # a missing local file is the caller's error, not the network's
            gz = "z" if unpack and str(local).endswith(("gz", ".tgz")) else ""
            argv = ["sh", "-c", _PUT_SCRIPT, "put", remote, f"{mode:o}" if mode is not None else "",
                    str(size if size is not None else os.fstat(f.fileno()).st_size), unpack or "", gz]
            chan = self._open_channel()
            try:
                chan.settimeout(self._ssh.connect_timeout + 60)
                line, first = self._command(argv)
                chan.exec_command(line)
                try:
                    if first:
                        chan.sendall(first)
                    while chunk := f.read(1 << 20):
                        chan.sendall(chunk)
                    _send_eof(chan)
                except (paramiko.SSHException, OSError, EOFError):
                    # The command may have ended early (no such dir, disk full): say why it did.
                    if not chan.status_event.wait(5):
                        raise
                deadline = time.monotonic() + self._ssh.connect_timeout + 60  # the rename is quick
                while not chan.status_event.wait(0.5):
                    # The status may land between the wait and the check: look once more.
                    if (chan.closed and not chan.status_event.is_set()) or time.monotonic() > deadline:
                        raise EOFError("no exit status")
                code = _exit_code(chan)
                err = b""
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
            except (paramiko.SSHException, OSError, EOFError) as e:
                self._drop(chan.get_transport())
                raise ConnectionLost(f"{self.name}: connection lost copying to {remote}: {e!r}") from None
            finally:
                chan.close()
        # Named by what it does: the script itself would make an unreadable message.
        self._refused(["put", remote], code, err.decode(errors="replace"))
        _check(self.name, ["put", str(local), remote], Result(code, "", err.decode(errors="replace")), True)

    def get_file(self, remote, local) -> None:
        part = Path(f"{local}.part")
        try:
            with open(part, "wb") as f:
                self.stream(["cat", remote], f)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        part.replace(local)

    def _drop(self, transport: paramiko.Transport | None = None) -> None:
        """Close the connection, or only if it is still the one that failed: steps on one master
        share it, and another thread may already have reconnected (closing that new connection
        made its command fail too; seen in CI)."""
        with self._lock:
            if self._client is None:
                return
            if transport is None or self._client.get_transport() is transport:
                self._client.close()
                self._client = None

    def close(self) -> None:
        self._drop()
        if self._jump is not None:
            self._jump.close()
            self._jump = None


class _Pulse:
    """Is the peer still there, while a command prints nothing? TCP would take a quarter of an
    hour to notice a partition. One probe at a time per connection: a global request that
    sshd must answer (OpenSSH replies REQUEST_FAILURE to a name it does not know)."""

    def __init__(self, transport: paramiko.Transport):
        self.transport = transport
        self.lock = threading.Lock()
        self.sent: float | None = None
        self.answered = time.monotonic()

    def answers(self, dead_after: float) -> bool:
        with self.lock:
            now = time.monotonic()
            if self.sent is not None:
                return now - self.sent <= dead_after
            if now - self.answered > 1.0:  # a silent command probes about once a second
                self.sent = now
                threading.Thread(target=self._probe, daemon=True, name="nova-dr-ssh-pulse").start()
            return True

    def _probe(self) -> None:
        try:
            # returns at the reply, or when the transport closes (then the caller sees it closed)
            self.transport.global_request("keepalive@openssh.com", wait=True)
        except Exception:  # noqa: BLE001 - a probe never fails the command by itself
            pass
        with self.lock:
            self.answered, self.sent = time.monotonic(), None


_pulses: dict[int, _Pulse] = {}
_pulses_lock = threading.Lock()


def _pulse(transport: paramiko.Transport) -> _Pulse:
    """The one pulse of a transport (commands in parallel on one connection share it)."""
    with _pulses_lock:
        for key in [k for k, p in _pulses.items() if not p.transport.is_active()]:
            del _pulses[key]
        return _pulses.setdefault(id(transport), _Pulse(transport))


def _send_eof(chan: paramiko.Channel) -> None:
    """`chan.shutdown_write()` without its race. paramiko builds the EOF under the channel's lock
    but sends it after; when the command has just ended, the CLOSE that paramiko's own thread
    sends in reply to sshd's can go out first, and OpenSSH then drops the whole connection, with
    every command on it ("ieof packet referred to nonexistent channel"; paramiko/paramiko#1705,
    measured here: about one connection in 400 quick commands on a busy machine). Sending while
    holding the lock keeps EOF before CLOSE. (The lock is held across a send that waits out a key
    exchange; paramiko bounds that wait, 30 s, and then fails the command as a lost connection.)"""
    with chan.lock:
        m = chan._send_eof()  # None once an EOF went out, the one our CLOSE sends included
        if m is not None and chan.transport is not None:
            chan.transport._send_user_message(m)


def _exit_code(chan: paramiko.Channel) -> int:
    """The command's exit status. paramiko reports -1 when the channel closed without one: the
    connection dropped (the command may or may not have run), or sshd sent exit-signal instead."""
    code = chan.recv_exit_status()
    if code == -1:
        t = chan.get_transport()
        if t is None or not t.is_active():
            raise EOFError("connection closed before the command's exit status")
    return code


# A dropped connection ends `cat`'s stdin early and `cat` exits 0: only the whole byte count
# earns the final name (a cut snapshot copy was once renamed into place). The part file is
# this copy's own ($$): an orphan of a killed run, still waiting on a partitioned link, must
# not truncate or remove the part a re-run is writing.
# $4: a tar member to unpack from what arrives (GNU tar reads its input to the end, so the
# sender is never cut off), $5: "z" when that tar is gzipped (tar cannot guess it on a pipe).
_PUT_SCRIPT = """umask 077 && p="$1.part.$$" || exit 1
if [ -n "$4" ]; then tar -x"$5"O -f - -- "$4" > "$p"; else cat > "$p"; fi || { rm -f "$p"; exit 1; }
got=$(stat -c %s "$p") || exit 1
[ "$got" = "$3" ] || { rm -f "$p"; echo "$1: $got bytes arrived${4:+ unpacked}, not $3" >&2; exit 1; }
[ -z "$2" ] || chmod "$2" "$p" || exit 1
mv -f "$p" "$1"
"""


class _SinkFailed(Exception):
    def __init__(self, original: BaseException):
        self.original = original


def connect(cluster: Cluster, master: Master) -> SSHConnector:
    return SSHConnector(master, cluster)
