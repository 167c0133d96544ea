"""Pure functions over etcd: parsing etcdctl's JSON output, the env file, restore commands.

Tested on output captured from etcdctl 3.5 (tests/captured/). No I/O here.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex

from pydantic import BaseModel, ConfigDict

from core.errors import NovaDRError


class ParseError(NovaDRError):
    pass


class _M(BaseModel):
    model_config = ConfigDict(frozen=True)


class EndpointStatus(_M):
    endpoint: str
    member_id: int
    leader_id: int
    revision: int
    raft_term: int
    raft_index: int
    raft_applied_index: int
    db_size: int
    version: str
    db_size_in_use: int = 0  # what defragmentation would keep

    @property
    def is_leader(self) -> bool:
        return self.member_id == self.leader_id and self.leader_id != 0


class MemberInfo(_M):
    id: int
    name: str  # empty while a member was added but has not started yet
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False

    @property
    def hex_id(self) -> str:
        return f"{self.id:x}"

    @property
    def started(self) -> bool:
        return bool(self.name)


class SnapshotStatus(_M):
    hash: int
    revision: int
    total_key: int  # every entry in the bolt file: never compare it with a live key count
    total_size: int


class HashKV(_M):
    endpoint: str
    revision: int
    hash: int
    compact_revision: int


def _json(text: str, what: str):
    # etcdctl prints warnings on stderr only; stdout is one JSON document.
    text = text.strip()
    if not text:
        raise ParseError(f"{what}: empty output from etcdctl")
    try:
        return json.loads(text)
    except ValueError:
        raise ParseError(f"{what}: not JSON from etcdctl: {text[:200]!r}") from None


def parse_health_errors(text: str) -> dict[str, tuple[bool, str]]:
    """`endpoint health -w json` -> {endpoint: (healthy, etcdctl's reason when not)}. Prints
    JSON even when unhealthy ("Active Alarm(s): NOSPACE" under an alarm)."""
    return {e["endpoint"]: (bool(e.get("health")), e.get("error", "")) for e in _json(text, "endpoint health")}


def parse_endpoint_health(text: str) -> dict[str, bool]:
    """`endpoint health -w json` -> {endpoint: healthy}."""
    return {ep: healthy for ep, (healthy, _) in parse_health_errors(text).items()}


ALARM_NAMES = {0: "NONE", 1: "NOSPACE", 2: "CORRUPT"}  # etcdserverpb.AlarmType: JSON gives the number


class Alarm(_M):
    member_id: int
    alarm: str


def parse_alarm_list(text: str) -> list[Alarm]:
    """`alarm list -w json` (and `alarm disarm -w json`): no `alarms` key when there is none."""
    return [Alarm(member_id=int(a.get("memberID", 0)), alarm=ALARM_NAMES.get(a.get("alarm"), str(a.get("alarm"))))
            for a in _json(text, "alarm list").get("alarms") or []]


def parse_endpoint_status(text: str) -> list[EndpointStatus]:
    out = []
    for e in _json(text, "endpoint status"):
        s = e["Status"]
        out.append(EndpointStatus(
            endpoint=e["Endpoint"], member_id=int(s["header"]["member_id"]), leader_id=int(s.get("leader", 0)),
            revision=int(s["header"].get("revision", 0)), raft_term=int(s.get("raftTerm", 0)),
            raft_index=int(s.get("raftIndex", 0)), raft_applied_index=int(s.get("raftAppliedIndex", 0)),
            db_size=int(s.get("dbSize", 0)), version=s.get("version", ""), db_size_in_use=int(s.get("dbSizeInUse", 0)),
        ))
    return out


def parse_member_list(text: str) -> list[MemberInfo]:
    data = _json(text, "member list")
    return [
        MemberInfo(id=int(m["ID"]), name=m.get("name", ""), peer_urls=tuple(m.get("peerURLs") or ()),
                   client_urls=tuple(m.get("clientURLs") or ()), is_learner=bool(m.get("isLearner")))
        for m in data.get("members", [])
    ]


def parse_snapshot_status(text: str) -> SnapshotStatus:
    d = _json(text, "snapshot status")
    return SnapshotStatus(hash=int(d["hash"]), revision=int(d["revision"]), total_key=int(d["totalKey"]),
                          total_size=int(d["totalSize"]))


def parse_hashkv(text: str) -> list[HashKV]:
    return [
        HashKV(endpoint=e["Endpoint"], revision=int(e["HashKV"]["header"]["revision"]),
               hash=int(e["HashKV"]["hash"]), compact_revision=int(e["HashKV"].get("compact_revision", 0)))
        for e in _json(text, "endpoint hashkv")
    ]


def parse_count_fields(text: str) -> int:
    """`get --count-only -w fields` (the only form that prints the count in etcdctl 3.5.1)."""
    m = re.search(r'^"Count"\s*:\s*(\d+)\s*$', text, re.M)
    if not m:
        raise ParseError(f"get --count-only: no Count in {text[:200]!r}")
    return int(m.group(1))


# -- the env file ------------------------------------------------------------------------

_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def parse_env_file(text: str) -> dict[str, str]:
    """`/etc/etcd.env` as systemd's EnvironmentFile= and the operators' `source` read it."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _ENV_LINE.match(line)
        if not m:
            continue
        value = m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[m.group(1)] = value
    return env


def _urls(value: str) -> set[str]:
    return {u.strip().rstrip("/") for u in value.split(",") if u.strip()}


def _dir(value: str) -> str:
    return posixpath.normpath(value) if value else ""


def env_mismatches(master, token: str, env: dict[str, str], env_path: str) -> list[str]:
    """Where the inventory and the master's own env file disagree, each naming both values.

    A restore aimed by a wrong inventory writes where etcd never reads (measured: an approved
    restore "swapped" etcd3's data in a directory etcd does not use, and only the final
    verification noticed, with the cluster already inconsistent). A setting the env file does
    not have (given as a flag in ExecStart=, say) cannot be compared and is not refused."""
    where = f"{master.etcd_member} ({env_path})"
    out = []

    def differ(key: str, ours: str, field: str) -> None:
        out.append(f"{where}: {key}={env[key]!r} but the inventory says {field} {ours!r}")

    if env.get("ETCD_NAME") and env["ETCD_NAME"] != master.etcd_member:
        differ("ETCD_NAME", master.etcd_member, "etcd_member")
    if env.get("ETCD_DATA_DIR") and _dir(env["ETCD_DATA_DIR"]) != _dir(master.paths.data_dir):
        differ("ETCD_DATA_DIR", master.paths.data_dir, "paths.data_dir")
    wal = _dir(env.get("ETCD_WAL_DIR", ""))
    if wal and wal != _dir(f"{master.paths.data_dir}/member/wal"):
        out.append(f"{where}: ETCD_WAL_DIR={env['ETCD_WAL_DIR']!r} is outside the data dir; nova-dr restores the WAL "
                   f"into {master.paths.data_dir}/member/wal, where this etcd would not read it. Move the WAL into "
                   "the data dir (unset ETCD_WAL_DIR) before a recovery")
    if env.get("ETCD_INITIAL_ADVERTISE_PEER_URLS") and master.peer_url not in _urls(env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]):
        differ("ETCD_INITIAL_ADVERTISE_PEER_URLS", master.peer_url, "peer_url")
    if env.get("ETCD_ADVERTISE_CLIENT_URLS") and master.client_url not in _urls(env["ETCD_ADVERTISE_CLIENT_URLS"]):
        differ("ETCD_ADVERTISE_CLIENT_URLS", master.client_url, "client_url")
    if env.get("ETCD_INITIAL_CLUSTER_TOKEN") and env["ETCD_INITIAL_CLUSTER_TOKEN"] != token:
        differ("ETCD_INITIAL_CLUSTER_TOKEN", token, "etcd_token")
    return out


def set_env_var(text: str, key: str, value: str) -> str:
    """Set KEY=value in an env file's text, keeping every other line as it was."""
    lines, done = [], False
    for line in text.splitlines():
        m = _ENV_LINE.match(line)
        if m and m.group(1) == key and not line.lstrip().startswith("#"):
            if not done:
                lines.append(f"{key}={value}")
                done = True
            continue
        lines.append(line)
    if not done:
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


# etcdctl takes a user and password from ETCDCTL_USER ("name[:password]") and ETCDCTL_PASSWORD.
# On a command line they would show in every local user's `ps` on the master, and in our own
# error messages: they reach the remote shell on stdin instead, one `NAME=value` line each.
SECRET_VARS = ("ETCDCTL_USER", "ETCDCTL_PASSWORD")
_FROM_STDIN = ('n=$1; shift; while [ "$n" -gt 0 ]; do IFS= read -r kv || exit 70; '
               'export "${kv%%=*}=${kv#*=}"; n=$((n - 1)); done; exec "$@"')


def etcdctl_env(env: dict[str, str], endpoints: list[str] | None = None) -> list[str]:
    """The `env K=V ...` prefix that gives etcdctl the master's own ETCDCTL_* settings, the
    secret ones left out (see etcdctl_command).

    To aim at chosen members the variable is overridden, never combined with --endpoints:
    etcdctl refuses a flag that shadows an exported variable."""
    ctl = {k: v for k, v in env.items() if k.startswith("ETCDCTL_") and k not in SECRET_VARS}
    ctl.setdefault("ETCDCTL_API", "3")
    if endpoints is not None:
        ctl["ETCDCTL_ENDPOINTS"] = ",".join(endpoints)
    return ["env"] + [f"{k}={v}" for k, v in sorted(ctl.items())]


def etcdctl_command(env: dict[str, str], endpoints: list[str] | None = None) -> tuple[list[str], bytes]:
    """The prefix to run etcdctl with the master's ETCDCTL_* settings, and what goes on stdin:
    the secret ones, which a small shell exports before it execs the rest."""
    prefix = etcdctl_env(env, endpoints)
    secrets = [(k, env[k]) for k in SECRET_VARS if env.get(k)]
    if not secrets:
        return prefix, b""
    return (["sh", "-c", _FROM_STDIN, "nova-dr-etcdctl", str(len(secrets)), *prefix],
            "".join(f"{k}={v}\n" for k, v in secrets).encode())


# -- snapshot restore --------------------------------------------------------------------

def supports_bump_revision(help_text: str) -> bool:
    """`--bump-revision`/`--mark-compacted` came after 3.5.1; detect them from --help."""
    return "--bump-revision" in help_text and "--mark-compacted" in help_text


def restore_argv(binary: str, snapshot: str, data_dir: str, name: str, initial_cluster: str, token: str,
                 peer_url: str, bump_revision: int = 0) -> list[str]:
    argv = [binary, "snapshot", "restore", snapshot, f"--data-dir={data_dir}", f"--name={name}",
            f"--initial-cluster={initial_cluster}", f"--initial-cluster-token={token}",
            f"--initial-advertise-peer-urls={peer_url}"]
    if bump_revision:
        argv += [f"--bump-revision={bump_revision}", "--mark-compacted"]
    return argv


def revision_after_restore(snapshot_revision: int, bump: int = 0) -> int:
    """The revision members serve once restored from a snapshot. `snapshot status` reports the
    last key's revision, and etcd's store begins at 1: a snapshot in which no key was ever
    written says 0 and serves 1 (measured with etcd 3.5.1)."""
    return max(snapshot_revision + bump, 1)


def work_timeout(size_bytes: int, floor: float = 120.0, slowest_bytes_per_s: float = 2e6) -> float:
    """A timeout sized from the bytes a command handles: `floor` plus the time it takes at a
    rate no working disk is slower than (2 MB/s). A 20 MB snapshot gets 130 s, an 8 GB one
    about 70 min. (A dead master is caught in seconds by the connection's own probe; this
    bounds a command that hangs on a live one.)"""
    return floor + max(0, size_bytes) / slowest_bytes_per_s


def start_timeout(size_bytes: int, floor: float = 120.0) -> float:
    """How long members restored from a `size_bytes` snapshot may take to answer healthy: etcd
    reads its whole keyspace into its index at start. Not work_timeout's 2 MB/s worst case: a
    member that never starts would hold the restore for an hour at 8 GB."""
    return floor + max(0, size_bytes) / 50e6


def show(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


JOURNAL_PREFIX = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ [^\s:\[]+(\[\d+\])?: ")


def summarize_log(text: str, most: int = 6) -> str:
    """The lines of an etcd log that explain a failure: its error/fatal/panic entries (without
    the Go stack traces), or the last lines when there are none."""
    picked = []
    for line in text.splitlines():
        # journalctl's default output puts "Dec 02 05:57:01 host etcd[52]: " before each entry
        line = JOURNAL_PREFIX.sub("", line.strip(), count=1)
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") in ("error", "fatal", "panic", "dpanic"):
                err = f" ({entry['error']})" if entry.get("error") else ""
                picked.append(f"{entry['level']}: {entry.get('msg', '')}{err}")
        elif line.startswith(("panic:", "fatal error:")):
            picked.append(line)
    if not picked:
        picked = [x for x in text.strip().splitlines() if x.strip()][-most:]
    return " | ".join(picked[-most:])[-2000:] or "(no log lines)"
