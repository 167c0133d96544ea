"""A master's etcd data dir, env file and kube-apiserver manifest: probe, stage, swap, park.

Nothing here deletes etcd data: old contents are moved into a quarantine dir inside the data
dir (the same filesystem, because /var/lib/etcd is often a mount point and cannot itself be
renamed). Every function reads the master's state first, so running it twice is harmless.
Shell snippets are constants; every value reaches them as a quoted positional argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from core.etcd import set_env_var, work_timeout
from core.facts import parse_probe
from core.inventory import Master
from core.snapshot import SnapshotCheck
from tasks.remote import Connector

PROBE = r"""
d=$1; manifest=$2; park=$3
[ -d "$d" ] && echo exists=1 || echo exists=0
[ -d "$d/member" ] && echo member=1 || echo member=0
mountpoint -q "$d" 2>/dev/null && echo mount_point=1 || echo mount_point=0
echo bytes=$(du -sb "$d/member" 2>/dev/null | cut -f1)
p=$d; while [ ! -d "$p" ]; do p=$(dirname "$p"); done
echo free=$(df -B1 --output=avail "$p" | tail -n1 | tr -d ' ')
if [ -n "$manifest" ]; then
  if [ -f "$manifest" ]; then echo manifest=present
  elif [ -f "$park/$(basename "$manifest")" ]; then echo manifest=parked
  else echo manifest=absent; fi
fi
for e in "$d"/nova-dr-*; do [ -e "$e" ] && echo "entry=$(basename "$e")"; done
exit 0
"""

# Move the old member dir into quarantine, then the restored one into place, then mark it.
# Each stage checks what is already done, so a run killed anywhere in it can run again.
# What we create takes the data dir's owner, group (and SELinux label): a `User=etcd` unit
# cannot start on a member dir that root owns. The data dir itself is the reference: it is
# there even when the member dir was wiped.
SWAP = r"""
set -eu
d=$1; stage=$2; q=$3; marker=$4; rid=$5
# A quarantine this recovery made already (a re-run) is the one: one command, not three.
for f in "$d"/nova-dr-quarantine-*-"$rid"; do [ -d "$f" ] && q=$f; done
trap '[ -d "$q" ] && echo "quarantine=$q"' EXIT
[ -e "$marker" ] && { echo already; exit 0; }
like_data_dir() {
  chown -R --reference="$d" "$@"
  if command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled; then chcon -R --reference="$d" "$@"; fi
}
if [ -d "$stage/member" ]; then
  like_data_dir "$stage/member"
  if [ -d "$d/member" ]; then
    mkdir -p -m 0700 "$q"
    like_data_dir "$q"
    [ -e "$q/member" ] && { echo "$q/member exists; refusing to overwrite it" >&2; exit 3; }
    mv "$d/member" "$q/member"
    echo quarantined
  fi
  mv "$stage/member" "$d/member"
  touch "$marker"
  echo swapped
elif [ -d "$d/member" ] && [ -d "$q/member" ]; then
  touch "$marker"; echo swapped
else
  echo "no restored data in $stage and no swap recorded; re-run the restore step" >&2; exit 4
fi
"""

WRITE_FILE = r"""
set -eu
f=$1; keep=$2; size=$3
[ -n "$keep" ] && [ ! -e "$keep" ] && cp -p "$f" "$keep"
cat > "$f.nova-dr-new"
# stdin cut short (a dropped connection) ends `cat` with 0: only the whole text replaces the file
[ "$(stat -c %s "$f.nova-dr-new")" = "$size" ] || { rm -f "$f.nova-dr-new"; echo "$f: the new text arrived cut short" >&2; exit 1; }
chmod --reference="$f" "$f.nova-dr-new" 2>/dev/null || true
chown --reference="$f" "$f.nova-dr-new" 2>/dev/null || true
# A bind-mounted file cannot be renamed over (EBUSY): then write it in place.
mv -f "$f.nova-dr-new" "$f" 2>/dev/null || { cat "$f.nova-dr-new" > "$f"; rm -f "$f.nova-dr-new"; }
"""


# One restore into staging at a time on a master; only the holder of the lock clears or
# renames staging.tmp. A run killed mid-restore leaves its command running on the master
# (sshd does not stop a command whose client went away): a re-run waits for that orphan to
# end instead of deleting the dir under it or restoring beside it into the same dir. The lock
# is fd 9, which the restore inherits, so it lasts as long as any process of that run does;
# `timeout` bounds the restore on the master itself, so no orphan holds it for ever. A failed
# restore (a full disk) removes its partial staging.tmp at once: the etcd that still runs
# there must not stay on a full disk until some later run.
STAGE = r"""
wd=$1; wait=$2; bound=$3; shift 3
exec 9>>"$wd/staging.lock" || exit 1
if ! flock -w "$wait" 9; then
  echo "an earlier run's restore into $wd/staging.tmp is still running after ${wait}s of waiting (pgrep -af 'snapshot restore' shows it); it is stopped ${bound}s after it began: run this again then" >&2
  exit 75
fi
[ -d "$wd/staging/member" ] && { echo "already staged"; exit 0; }
rm -rf --one-file-system "$wd/staging.tmp"
timeout -k 10 "$bound" "$@"
rc=$?
if [ "$rc" != 0 ]; then
  rm -rf --one-file-system "$wd/staging.tmp"
  [ "$rc" = 124 ] && echo "the restore was still running after ${bound}s and was stopped" >&2
  exit "$rc"
fi
# -T: onto an empty staging dir left by a hand, not into it
mv -T "$wd/staging.tmp" "$wd/staging" && echo staged
"""


def work_dir(master: Master, recovery_id: str) -> str:
    return f"{master.paths.data_dir}/nova-dr-{recovery_id}"


def probe_data_dir(conn: Connector, master: Master) -> dict:
    p = master.paths
    res = conn.run(["sh", "-c", PROBE, "sh", p.data_dir, p.kube_apiserver_manifest or "", p.manifest_park_dir],
                   timeout=60)
    return parse_probe(res.stdout)


# One command for everything the copy must know first (a re-run's "already done" and the
# folders): on a 20 ms link each command is two round trips or more.
COPY_CHECK = r"""
set -eu
wd=$1 target=$2 want=$3 d=$4 ensure=$5; shift 5
[ -e "$wd/swapped" ] && { echo swapped; exit 0; }
if [ -f "$target" ] && [ "$(sha256sum "$target" | cut -d' ' -f1)" = "$want" ]; then echo there; exit 0; fi
sh -c "$ensure" ensure "$d" "$@" >/dev/null
mkdir -p "$wd" && chmod 0700 "$d" "$wd"
echo copy
"""


def copy_snapshot(conn: Connector, master: Master, snap: SnapshotCheck, recovery_id: str) -> str:
    """Put the snapshot in this recovery's work dir on the master; skip when already there,
    or when this master's restored data is already in place."""
    wd = work_dir(master, recovery_id)
    target = f"{wd}/snapshot.db"
    said = conn.run(["sh", "-c", COPY_CHECK, "copy", wd, target, snap.sha256, master.paths.data_dir, ENSURE_DATA_DIR,
                     *master.paths.service_user], timeout=max(120, work_timeout(snap.size))).stdout.strip()
    if said == "swapped":
        return "not needed: restored data already in place"
    if said == "there":
        return "already there"
    # No second hash pass over the copy: SSH checks every byte in transit, gzip's CRC every
    # unpacked one, the copy gets its name only once complete and of the right size, and the
    # staging restore on this master checks the snapshot's own sha256 trailer before anything
    # stops (a pass per master cost ~1 s at 250 MB).
    if snap.archive_member:  # the archive, about 4x smaller than the .db, unpacked there
        conn.put_file(snap.source, target, mode=0o600, unpack=snap.archive_member, size=snap.size)
        return "copied (compressed)"
    conn.put_file(snap.db_path, target, mode=0o600)
    return "copied"


# What the staging restore must know, in one command: the staging state, the copy's size,
# which binary restores, and its --help (whether it can bump the revision).
STAGING_PROBE = r"""
wd=$1 utl=$2 ctl=$3
if [ -e "$wd/swapped" ]; then s=swapped; elif [ -d "$wd/staging/member" ]; then s=staged; else s=none; fi
if [ -n "$utl" ] && [ -x "$utl" ]; then b=$utl; else b=$ctl; fi
echo "$s $(stat -c %s "$wd/snapshot.db" 2>/dev/null || echo -)"
echo "$b"
ETCDCTL_API=3 "$b" snapshot restore --help 2>&1 || true
"""


@dataclass(frozen=True)
class StagingProbe:
    state: str  # swapped | staged | none
    snapshot_size: int | None  # of this recovery's copy on the master; None: not there
    binary: str  # etcdutl where the master has it (etcdctl's restore is deprecated in 3.5)
    restore_help: str


def probe_staging(conn: Connector, master: Master, recovery_id: str) -> StagingProbe:
    p = master.paths
    out = conn.run(["sh", "-c", STAGING_PROBE, "probe", work_dir(master, recovery_id), p.etcdutl or "",
                    p.etcdctl]).stdout
    first, binary, *help_lines = out.split("\n")
    state, size = first.split()
    return StagingProbe(state, int(size) if size.isdigit() else None, binary, "\n".join(help_lines))


def restore_into_staging(conn: Connector, master: Master, recovery_id: str, argv: list[str],
                         bound: float) -> str:
    """Run the restore `argv` (which writes staging.tmp) under the master's staging lock,
    bounded by `bound` seconds there, and name its result staging once complete."""
    wd = work_dir(master, recovery_id)
    b = str(int(bound))
    wait = str(int(bound) + 20)  # an orphan under the same bound ends by then
    res = conn.run(["sh", "-c", STAGE, "sh", wd, wait, b, *argv], timeout=2 * int(bound) + 60)
    return res.stdout.strip()


def swap_in_restored(conn: Connector, master: Master, recovery_id: str, quarantine: str) -> tuple[str, str | None]:
    """Quarantine the old member dir (in `quarantine`, or the one this recovery made already)
    and rename the restored one into place. Returns what was done and the quarantine, if any."""
    wd = work_dir(master, recovery_id)
    res = conn.run(["sh", "-c", SWAP, "sh", master.paths.data_dir, f"{wd}/staging", quarantine, f"{wd}/swapped",
                    recovery_id])
    lines = res.stdout.strip().splitlines()
    kept = next((x.split("=", 1)[1] for x in lines if x.startswith("quarantine=")), None)
    return ", ".join(x for x in lines if not x.startswith("quarantine=")), kept


def find_quarantine(conn: Connector, master: Master, recovery_id: str) -> str | None:
    res = conn.run(["sh", "-c", 'for q in "$1"/nova-dr-quarantine-*-"$2"; do [ -d "$q" ] && echo "$q"; done; exit 0',
                    "sh", master.paths.data_dir, recovery_id])
    found = res.stdout.split()
    return found[-1] if found else None


def write_remote_file(conn: Connector, path: str, text: str, keep_copy: str = "") -> None:
    data = text.encode()
    conn.run(["sh", "-c", WRITE_FILE, "sh", path, keep_copy, str(len(data))], stdin=data)


def set_initial_cluster_state(conn: Connector, master: Master, state: str, recovery_id: str,
                              initial_cluster: str | None = None) -> str:
    """ETCD_INITIAL_CLUSTER_STATE (and optionally ETCD_INITIAL_CLUSTER) in the env file,
    keeping a copy of the original next to it."""
    path = master.paths.etcd_env
    text = conn.run(["cat", path]).stdout
    new = set_env_var(text, "ETCD_INITIAL_CLUSTER_STATE", state)
    if initial_cluster:
        new = set_env_var(new, "ETCD_INITIAL_CLUSTER", initial_cluster)
    if new == text:
        return "unchanged"
    write_remote_file(conn, path, new, keep_copy=f"{path}.nova-dr-{recovery_id}")
    return f"set (original kept as {path}.nova-dr-{recovery_id})"


def park_manifest(conn: Connector, master: Master) -> str:
    """Move the kube-apiserver static pod manifest out of the manifests folder (the kubelet
    runs every file it finds there, whatever its name)."""
    p = master.paths
    if not p.kube_apiserver_manifest:
        return "no manifest configured"
    name = PurePosixPath(p.kube_apiserver_manifest).name
    res = conn.run(["sh", "-c", 'if [ -f "$1" ]; then mkdir -p "$2" && mv "$1" "$2/$3" && echo parked; '
                    'elif [ -f "$2/$3" ]; then echo already; else echo absent; fi',
                    "sh", p.kube_apiserver_manifest, p.manifest_park_dir, name])
    return res.stdout.strip()


def unpark_manifest(conn: Connector, master: Master) -> str:
    p = master.paths
    if not p.kube_apiserver_manifest:
        return "no manifest configured"
    name = PurePosixPath(p.kube_apiserver_manifest).name
    res = conn.run(["sh", "-c", 'if [ -f "$2/$3" ] && [ ! -e "$1" ]; then mv "$2/$3" "$1" && echo restored; '
                    'elif [ -f "$1" ]; then echo already; else echo absent; fi',
                    "sh", p.kube_apiserver_manifest, p.manifest_park_dir, name])
    return res.stdout.strip()


def clean_work_dir(conn: Connector, master: Master, recovery_id: str) -> str:
    """After verification: our copy of the snapshot, the staging lock and the (now empty)
    staging dir go; the `swapped` marker stays, so that a late re-run knows the data in place
    is the restored one."""
    wd = work_dir(master, recovery_id)
    conn.run(["rm", "-f", f"{wd}/snapshot.db", f"{wd}/staging.lock"])
    conn.run(["sh", "-c", 'rmdir "$1" 2>/dev/null; exit 0', "sh", f"{wd}/staging"])
    return "cleaned"


def delete_quarantine(conn: Connector, master: Master, recovery_id: str) -> str:
    """Only when the operator asked for it (delete_old_data) and after verification."""
    q = find_quarantine(conn, master, recovery_id)
    if not q:
        return "nothing to delete"
    assert PurePosixPath(q).name.startswith("nova-dr-quarantine-")
    conn.run(["rm", "-rf", "--one-file-system", q])
    return f"deleted {q}"


# A wiped data dir (`rm -rf /var/lib/etcd`) must come back as the unit's user's: created by
# root through sudo, it made a `User=etcd` unit fail with "open /var/lib/etcd: permission
# denied" (seen on the real-host lab). Nothing else is there to copy the owner from.
ENSURE_DATA_DIR = r"""
set -eu
d=$1; shift
[ -d "$d" ] && { echo exists; exit 0; }
u=$("$@" 2>/dev/null || true)
mkdir -p -m 0700 "$d"
if [ -n "$u" ] && [ "$u" != root ]; then chown "$u:$(id -gn "$u")" "$d"; fi
if command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled; then restorecon "$d" 2>/dev/null || true; fi
echo "created for ${u:-root}"
"""


def ensure_data_dir(conn: Connector, master: Master) -> str:
    """The data dir exists, owned as the unit expects (a no-op when it is there)."""
    return conn.run(["sh", "-c", ENSURE_DATA_DIR, "ensure", master.paths.data_dir,
                     *master.paths.service_user]).stdout.strip()


QUARANTINE = r"""
set -eu
d=$1; q=$2; marker=$3
[ -e "$marker" ] && { echo already; exit 0; }
if [ -d "$d/member" ]; then
  mkdir -p -m 0700 "$q"
  chown --reference="$d" "$q"  # the data dir's owner, as in SWAP
  [ -e "$q/member" ] && { echo "$q/member exists; refusing to overwrite it" >&2; exit 3; }
  mv "$d/member" "$q/member"
  echo quarantined
else
  echo "no member dir"
fi
mkdir -p "$(dirname "$marker")"; touch "$marker"
"""


def quarantine_member_dir(conn: Connector, master: Master, recovery_id: str, quarantine: str) -> str:
    """Move the member dir aside (replace: the member then starts empty and fetches from the leader).
    A marker makes a re-run leave alone the member dir that the new member has created since."""
    marker = f"{work_dir(master, recovery_id)}/quarantined"
    ensure_data_dir(conn, master)
    res = conn.run(["sh", "-c", QUARANTINE, "sh", master.paths.data_dir, quarantine, marker])
    return res.stdout.strip()
