"""The etcd unit on a master: start, stop, state, logs (commands from the inventory)."""

from __future__ import annotations

from core.inventory import Master
from tasks.remote import Connector


def read_service_state(conn: Connector, master: Master) -> str:
    out = conn.run(master.paths.service_is_active, check=False, timeout=30).stdout.strip()
    return out.splitlines()[-1] if out else "unknown"


def start_etcd(conn: Connector, master: Master) -> str:
    state = read_service_state(conn, master)
    if state == "active":
        return "already running"
    if state == "failed":
        # A unit that crashed StartLimitBurst times refuses `start` ("start request repeated
        # too quickly") until its failed state is cleared.
        conn.run(master.paths.service_reset_failed, check=False, timeout=30)
    conn.run(master.paths.service_start, timeout=120)
    return "started"


def stop_etcd(conn: Connector, master: Master) -> str:
    if read_service_state(conn, master) in ("inactive", "failed"):
        # A failed unit may still be restarting under systemd's Restart=: stop it all the same.
        conn.run(master.paths.service_stop, timeout=120, check=False)
        return "already stopped"
    conn.run(master.paths.service_stop, timeout=120)
    return "stopped"


def read_service_logs(conn: Connector, master: Master) -> str:
    return conn.run(master.paths.service_logs, check=False, timeout=30).stdout
