"""The cluster lock's file on one master: read it, or replace it only if it is unchanged.

Every change is a compare-and-swap under `flock`, so two orchestrators that reach one master
at once are serialised there. A new record is written to a side file and renamed over the
lock: the lock never exists without a whole holder record in it, whenever a process dies.
The record goes on the command line, quoted, not on stdin: it holds no secret, and a bare
`cat` from stdin is what the lab holds to stop a copy half way.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import NovaDRError
from core.inventory import Master
from tasks.remote import Connector

# $1 dir, $2 cluster name, $3 read|put|delete, $4 sha256 expected (or "none"), $5 the new record
_LOCK_SCRIPT = r"""set -u
dir=$1; lock="$1/$2.lock"; mode=$3; expected=$4
command -v flock >/dev/null || { echo "nova-dr: the cluster lock needs flock (util-linux) here" >&2; exit 72; }
umask 077
mkdir -p "$dir" || exit 71
exec 9>>"$dir/$2.guard" || exit 71
flock -w 10 9 || { echo "nova-dr: $dir/$2.guard stayed locked for 10s" >&2; exit 75; }
cur=none
if [ -e "$lock" ]; then cur=$(sha256sum "$lock") || exit 71; cur=${cur%% *}; fi
result=read
if [ "$mode" != read ]; then
  if [ "$cur" != "$expected" ]; then result=conflict
  elif [ "$mode" = put ]; then printf '%s\n' "$5" > "$lock.new" && mv -f "$lock.new" "$lock" || exit 71; result=done
  else rm -f "$lock" || exit 71; result=done
  fi
fi
echo "now=$(date +%s) sha=$cur result=$result"
[ "$result" = done ] || [ ! -e "$lock" ] || cat "$lock"
"""


@dataclass(frozen=True)
class LockFile:
    now: float  # the master's clock
    sha256: str  # of the file before this call; "none" when there was none
    result: str  # read | done | conflict
    text: str  # the file before this call (empty when absent; not read back after a change)


def lock_path(master: Master, cluster: str) -> str:
    return f"{master.paths.lock_dir}/{cluster}.lock"


def parse_lock_output(stdout: str) -> LockFile:
    head, _, text = stdout.partition("\n")
    fields = dict(p.split("=", 1) for p in head.split() if "=" in p)
    try:
        return LockFile(float(fields["now"]), fields["sha"], fields["result"], text)
    except (KeyError, ValueError):
        raise NovaDRError(f"the cluster lock script printed {head[:200]!r}, not now=... sha=... result=...") from None


def _lock(conn: Connector, master: Master, cluster: str, mode: str, expected: str = "none", record: str = "") -> LockFile:
    res = conn.run(["sh", "-c", _LOCK_SCRIPT, "lock", master.paths.lock_dir, cluster, mode, expected, record],
                   timeout=30)
    return parse_lock_output(res.stdout)


def read_lock(conn: Connector, master: Master, cluster: str) -> LockFile:
    return _lock(conn, master, cluster, "read")


def replace_lock(conn: Connector, master: Master, cluster: str, expected_sha: str, record: str) -> LockFile:
    """Write `record` if the file's sha256 is still `expected_sha` ("none": still absent)."""
    return _lock(conn, master, cluster, "put", expected_sha, record)


def remove_lock(conn: Connector, master: Master, cluster: str, expected_sha: str) -> LockFile:
    return _lock(conn, master, cluster, "delete", expected_sha)


def record_sha256(record: str) -> str:
    """The sha256 of the file that `replace_lock` writes for `record` (printf adds a newline)."""
    import hashlib

    return hashlib.sha256((record + "\n").encode()).hexdigest()
