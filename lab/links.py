"""Links like real ones between this machine (where a flow runs) and the lab's masters.

The masters reach each other over the lab's bridge; this machine reaches them through the
bridge's own device. Shaping that device (egress: this machine to the masters; ingress,
redirected through an ifb device: the masters to this machine) limits the flow machine's
link alone, in both directions and in aggregate, and leaves the masters' peer traffic
alone, as on a real network where the masters share a rack and the operator is far away.

This kernel has no netem (LAB.md), so a round-trip time comes from a user-space forwarder:
`DelayForwarder` holds every chunk it relays for half the round trip in each direction, and
the masters are then reached through it on 127.0.0.1 (`bench/common.py` writes an inventory
and a known_hosts for that).

    python -m lab.links delay LISTEN_PORT HOST PORT ONE_WAY_MS
"""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lab.hosts import bridge

PROFILES = {
    # name: (Mbit/s of the flow machine's link, round-trip ms on the SSH path)
    "loopback": (None, 0),
    "datacenter": (1000, 0),
    "dr-site": (100, 20),
}


def _ifb(net: int) -> str:
    return f"nlifb{net}"[:15]


def _tc(*args: str, check: bool = True) -> None:
    p = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode:
        raise RuntimeError(f"tc {' '.join(args)}: {p.stderr.strip()}")


def _tbf(dev: str, mbit: int) -> None:
    # A burst of ~2 ms of traffic (at least 64 KiB): enough for TSO segments, short enough
    # that the rate holds from the first second.
    burst = max(64 << 10, mbit * 1_000_000 // 8 // 500)
    _tc("qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms")


def shape(net: int, mbit: int) -> None:
    """Limit the flow machine's link to the lab `net` to `mbit` each way."""
    br, ifb = bridge(net), _ifb(net)
    unshape(net)
    _tbf(br, mbit)
    subprocess.run(["ip", "link", "add", ifb, "type", "ifb"], check=True, capture_output=True)
    subprocess.run(["ip", "link", "set", ifb, "up"], check=True, capture_output=True)
    _tc("qdisc", "add", "dev", br, "handle", "ffff:", "ingress")
    _tc("filter", "add", "dev", br, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb)
    _tbf(ifb, mbit)


def unshape(net: int) -> None:
    br = bridge(net)
    _tc("qdisc", "del", "dev", br, "root", check=False)
    _tc("qdisc", "del", "dev", br, "ingress", check=False)
    subprocess.run(["ip", "link", "del", _ifb(net)], capture_output=True)


def link_bytes(net: int) -> int:
    """Bytes that crossed the flow machine's link to the lab, both ways, so far. The bridge
    device counts only what this machine sent or received, not what masters sent each other."""
    stats = Path("/sys/class/net") / bridge(net) / "statistics"
    return sum(int((stats / f).read_text()) for f in ("rx_bytes", "tx_bytes"))


# -- a round-trip time where tc has no delay ----------------------------------------------
def _relay(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copy src to dst, each chunk sent `delay` s after it was read. Reading runs ahead (the
    kernel's buffers and this queue hold a bandwidth-delay product), so throughput is the
    link's, and only latency is added."""
    q: collections.deque = collections.deque()
    ready = threading.Condition()

    def writer():
        while True:
            with ready:
                while not q:
                    ready.wait()
                due, data = q.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    while True:
        try:
            data = src.recv(1 << 18)
        except OSError:
            data = b""
        with ready:
            q.append((time.monotonic() + delay, data))
            ready.notify()
        if not data:
            break
    t.join()


def _serve_one(client: socket.socket, host: str, port: int, delay: float) -> None:
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a = threading.Thread(target=_relay, args=(client, upstream, delay), daemon=True)
    b = threading.Thread(target=_relay, args=(upstream, client, delay), daemon=True)
    a.start(), b.start()
    a.join(), b.join()
    client.close(), upstream.close()


def delay_forever(listen_port: int, host: str, port: int, one_way_ms: float) -> None:
    srv = socket.create_server(("127.0.0.1", listen_port), backlog=64)
    while True:
        client, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(client, host, port, one_way_ms / 1000), daemon=True).start()


@dataclass
class DelayForwarder:
    """A forwarder process from 127.0.0.1:listen_port to host:port (its own process, so the
    flow's interpreter does not relay bytes too)."""

    listen_port: int
    host: str
    port: int
    one_way_ms: float
    proc: subprocess.Popen | None = None

    def __enter__(self) -> "DelayForwarder":
        self.proc = subprocess.Popen([sys.executable, "-m", "lab.links", "delay", str(self.listen_port), self.host,
                                      str(self.port), str(self.one_way_ms)],
                                     cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.listen_port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"delay forwarder on {self.listen_port} did not start")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


if __name__ == "__main__" and sys.argv[1:2] == ["delay"]:
    delay_forever(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
