"""etcd on a master, through etcdctl/etcdutl run there with that master's own ETCDCTL_* settings.

Certificates never leave the masters: every etcdctl call runs on a master over the connector.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from core.errors import CommandError, NovaDRError
from core.etcd import (Alarm, EndpointStatus, HashKV, MemberInfo, SnapshotStatus, etcdctl_command, parse_alarm_list,
                       parse_count_fields, parse_endpoint_health, parse_endpoint_status, parse_env_file,
                       parse_hashkv, parse_health_errors,
                       parse_member_list, parse_snapshot_status, restore_argv, supports_bump_revision,
                       work_timeout)
from core.inventory import Cluster, Master
from tasks.remote import Connector

# A dead member must not stall the flow for etcdctl's default 5 s.
SHORT = "--command-timeout=2s"


def read_etcd_env(conn: Connector, master: Master) -> dict[str, str]:
    return parse_env_file(conn.run(["cat", master.paths.etcd_env], timeout=20).stdout)


def etcdctl(conn: Connector, master: Master, env: dict[str, str], *args: str, own: bool = False,
            endpoints: list[str] | None = None, check: bool = True, timeout: float = 30):
    """Run etcdctl on `master`. `own=True` aims at this member alone (serializable reads, snapshots)."""
    eps = [master.client_url] if own else endpoints
    prefix, secrets = etcdctl_command(env, eps)
    return conn.run([*prefix, master.paths.etcdctl, *args], check=check, timeout=timeout, stdin=secrets or None)


def check_endpoint_health(conn: Connector, master: Master, env: dict[str, str]) -> bool:
    res = etcdctl(conn, master, env, "endpoint", "health", "-w", "json", SHORT, own=True, check=False)
    try:
        return parse_endpoint_health(res.stdout).get(master.client_url, False)
    except NovaDRError:
        return False


def read_endpoint_status(conn: Connector, master: Master, env: dict[str, str]) -> EndpointStatus | None:
    res = etcdctl(conn, master, env, "endpoint", "status", "-w", "json", SHORT, own=True, check=False)
    if res.code != 0:
        return None
    found = parse_endpoint_status(res.stdout)
    return found[0] if found else None


def list_etcd_members(conn: Connector, master: Master, env: dict[str, str], *,
                      own: bool = True) -> list[MemberInfo] | None:
    """`member list` through this member (own) or through every endpoint in its env file."""
    res = etcdctl(conn, master, env, "member", "list", "-w", "json", SHORT, own=own, check=False)
    return parse_member_list(res.stdout) if res.code == 0 else None


def read_hashkv(conn: Connector, master: Master, env: dict[str, str], rev: int) -> HashKV:
    """The hash of the key history up to `rev`. etcd refuses a revision at or below its compacted
    one (3.5 HashByRev: `rev <= compactRev`): right after a compaction to the current revision
    (recover-etcd-space, defragment-etcd's callers, a restore with --mark-compacted) it is asked
    at the current revision instead (`--rev=0`), which the members then share."""
    try:
        res = etcdctl(conn, master, env, "endpoint", "hashkv", f"--rev={rev}", "-w", "json", SHORT, own=True)
    except CommandError as err:
        if "required revision has been compacted" not in err.stderr:
            raise
        res = etcdctl(conn, master, env, "endpoint", "hashkv", "--rev=0", "-w", "json", SHORT, own=True)
    return parse_hashkv(res.stdout)[0]


def count_live_keys(conn: Connector, master: Master, env: dict[str, str]) -> int:
    """Every live key, read from this member alone (serializable)."""
    res = etcdctl(conn, master, env, "get", "", "--from-key", "--count-only", "-w", "fields",
                  "--consistency=s", SHORT, own=True)
    return parse_count_fields(res.stdout)


def restore_binary(conn: Connector, master: Master) -> str:
    """etcdutl when the master has it (etcdctl's restore is deprecated in 3.5), else etcdctl."""
    p = master.paths
    if p.etcdutl and conn.run(["test", "-x", p.etcdutl], check=False).code == 0:
        return p.etcdutl
    return p.etcdctl


def read_snapshot_status(conn: Connector, master: Master, path: str, size: int) -> SnapshotStatus:
    """`snapshot status` reads and hashes the whole file (`size` bytes): its wait is sized from
    them (at 8 GiB it took over two minutes here)."""
    binary = restore_binary(conn, master)
    env = ["env", "ETCDCTL_API=3"]
    return parse_snapshot_status(conn.run([*env, binary, "snapshot", "status", path, "-w", "json"],
                                          timeout=work_timeout(size)).stdout)


def bump_for(conn: Connector, master: Master, bump_revision: int) -> int:
    """The bump this master's restore applies: the asked one where the binary supports it."""
    if not bump_revision:
        return 0
    binary = restore_binary(conn, master)
    help_text = conn.run(["env", "ETCDCTL_API=3", binary, "snapshot", "restore", "--help"], check=False)
    return bump_revision if supports_bump_revision(help_text.stdout + help_text.stderr) else 0


def restore_command(conn: Connector, master: Master, cluster: Cluster, snapshot: str, data_dir: str,
                    bump_revision: int) -> tuple[list[str], dict]:
    """The `snapshot restore` argv into `data_dir` (which must not exist) for this master's
    binary, and what it does: which binary, whether it bumps."""
    binary = restore_binary(conn, master)
    bump = bump_for(conn, master, bump_revision)
    argv = restore_argv(binary, snapshot, data_dir, master.etcd_member, cluster.initial_cluster(),
                        cluster.etcd_token, master.peer_url, bump)
    return ["env", "ETCDCTL_API=3", *argv], {"binary": binary, "bumped": bump,
                                             "bump_supported": bool(bump) or not bump_revision}


def restore_snapshot(conn: Connector, master: Master, cluster: Cluster, snapshot: str, data_dir: str,
                     bump_revision: int, size: int) -> dict:
    """`snapshot restore` into `data_dir`, with a timeout sized from the snapshot's `size`."""
    argv, info = restore_command(conn, master, cluster, snapshot, data_dir, bump_revision)
    conn.run(argv, timeout=work_timeout(size))
    return info


def wait_until_healthy(conns: dict[str, Connector], cluster: Cluster, members: list[str],
                       timeout: float = 90) -> dict[str, bool]:
    """Poll each member's own endpoint until all answer healthy or the bound runs out. The
    members are asked at once: one after another, seven members took a second per round."""
    with ThreadPoolExecutor(max(1, len(members))) as ex:
        envs = dict(zip(members, ex.map(lambda m: read_etcd_env(conns[m], cluster.master(m)), members)))
        deadline = time.monotonic() + timeout
        state = {m: False for m in members}
        while True:
            todo = [m for m in members if not state[m]]
            state.update(zip(todo, ex.map(lambda m: check_endpoint_health(conns[m], cluster.master(m), envs[m]),
                                          todo)))
            if all(state.values()) or time.monotonic() > deadline:
                return state
            time.sleep(0.2)


def member_add(conn: Connector, master: Master, env: dict[str, str], name: str, peer_url: str) -> str:
    res = etcdctl(conn, master, env, "member", "add", name, f"--peer-urls={peer_url}", SHORT, own=True)
    return res.stdout


def member_remove(conn: Connector, master: Master, env: dict[str, str], hex_id: str) -> None:
    etcdctl(conn, master, env, "member", "remove", hex_id, SHORT, own=True)


# -- space: alarms, compaction, defragmentation ------------------------------------------

def read_health(conn: Connector, master: Master, env: dict[str, str]) -> tuple[bool, str]:
    """This member's health and, when unhealthy, etcdctl's reason ("Active Alarm(s): NOSPACE")."""
    res = etcdctl(conn, master, env, "endpoint", "health", "-w", "json", SHORT, own=True, check=False)
    try:
        return parse_health_errors(res.stdout).get(master.client_url, (False, "not in etcdctl's answer"))
    except NovaDRError:
        return False, (res.stderr.strip().splitlines() or ["no answer"])[-1][:200]


def read_alarms(conn: Connector, master: Master, env: dict[str, str]) -> list[Alarm]:
    return parse_alarm_list(etcdctl(conn, master, env, "alarm", "list", "-w", "json", SHORT, own=True).stdout)


def compact(conn: Connector, master: Master, env: dict[str, str], revision: int, timeout: float) -> str:
    """`compaction REV --physical` (returns once the backend has dropped the history). Compacting
    to a revision that already was is etcd's "required revision has been compacted": done."""
    res = etcdctl(conn, master, env, "compaction", str(revision), "--physical", f"--command-timeout={timeout:.0f}s",
                  own=True, check=False, timeout=timeout + 30)
    if res.code == 0:
        return f"compacted to {revision}"
    if "required revision has been compacted" in res.stderr:
        return f"already compacted to {revision} or later"
    raise NovaDRError(f"etcdctl compaction {revision} on {master.etcd_member} failed: {res.stderr.strip()[-300:]}")


def defragment(conn: Connector, master: Master, env: dict[str, str], timeout: float) -> None:
    etcdctl(conn, master, env, "defrag", f"--command-timeout={timeout:.0f}s", own=True, timeout=timeout + 30)


def disarm_alarms(conn: Connector, master: Master, env: dict[str, str]) -> list[Alarm]:
    return parse_alarm_list(etcdctl(conn, master, env, "alarm", "disarm", "-w", "json", SHORT, own=True).stdout)


def put_and_delete(conn: Connector, master: Master, env: dict[str, str], key: str) -> None:
    """A write through the cluster and its undoing: the proof that etcd takes writes again."""
    etcdctl(conn, master, env, "put", key, "written by nova-dr to prove that etcd takes writes", SHORT, own=True)
    etcdctl(conn, master, env, "del", key, SHORT, own=True)
