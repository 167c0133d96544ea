"""Backup archives made from a master and streamed into a store.

Tar streams come from the master (GNU tar); gzip happens on the machine running the flow with
python-isal (several times faster than gzip, still plain gzip for `tar -zxf`), straight into
the store: no full copy on either side.
"""

from __future__ import annotations

import json

from isal import igzip

from core.errors import NovaDRError
from core.etcd import work_timeout
from core.inventory import Master
from core.pki import PKIEntry, parse_pki_listing, select_pki_files
from tasks.etcd import etcdctl, read_etcd_env, read_snapshot_status
from tasks.remote import Connector
from tasks.storage import BackupStore

PKI_LIST = r"""
d=$1
[ -d "$d" ] || exit 0
find "$d" -type f | sort | while IFS= read -r f; do
  haskey=0; grep -q 'PRIVATE KEY' "$f" 2>/dev/null && haskey=1
  if openssl x509 -in "$f" -noout 2>/dev/null; then
    ca=0; openssl x509 -in "$f" -noout -ext basicConstraints 2>/dev/null | grep -q 'CA:TRUE' && ca=1
    pk=$(openssl x509 -in "$f" -noout -pubkey 2>/dev/null | openssl sha256 -r | cut -d' ' -f1)
    end=$(openssl x509 -in "$f" -noout -enddate 2>/dev/null | cut -d= -f2)
    printf 'cert\t%s\t%s\t%s\t%s\t%s\n' "$f" "$ca" "$pk" "$end" "$haskey"
  elif [ $haskey = 1 ] && pub=$(openssl pkey -in "$f" -pubout -passin pass: 2>/dev/null) && [ -n "$pub" ]; then
    printf 'key\t%s\t%s\n' "$f" "$(printf '%s\n' "$pub" | openssl sha256 -r | cut -d' ' -f1)"
  else
    printf 'file\t%s\t%s\n' "$f" "$haskey"
  fi
done
"""


def list_pki(conn: Connector, master: Master) -> list[PKIEntry]:
    return parse_pki_listing(conn.run(["sh", "-c", PKI_LIST, "sh", master.paths.pki_dir], timeout=300).stdout)


def existing(conn: Connector, paths: list[str]) -> list[str]:
    if not paths:
        return []
    res = conn.run(["sh", "-c", 'for f in "$@"; do [ -e "$f" ] && echo "$f"; done; exit 0', "sh", *paths])
    return res.stdout.splitlines()


def node_archive_members(conn: Connector, master: Master, settings: dict) -> tuple[list[str], list[str], list[PKIEntry]]:
    """What this master's archive holds, by the switches: (files, left out with why, certificates)."""
    files, left, certs = [], [], []
    if settings["INCLUDE_PKI_DATA"]:
        entries = list_pki(conn, master)
        keep, left = select_pki_files(entries)
        files += keep
        certs = [e for e in entries if e.kind == "cert"]
    extra = []
    if settings["INCLUDE_DATA_ENCRYPTION_CONFIG"]:
        extra.append(master.paths.encryption_config)
    if settings["INCLUDE_STARVAULT_UNSEAL_TOKENS"]:
        extra.append(master.paths.unseal_tokens)
    files += existing(conn, extra)
    return files, left, certs


class _Gzip:
    """gzip (isal) onto a store's writer; closing finishes the gzip stream, not the writer.
    It keeps the tar stream's length and tail: a whole tar ends with two zero blocks."""

    def __init__(self, out):
        self.gz = igzip.GzipFile(fileobj=out, mode="wb", compresslevel=1)
        self.size, self.tail = 0, b""

    def write(self, data) -> int:
        self.size += len(data)
        self.tail = (self.tail + bytes(data[-1024:]))[-1024:]
        return self.gz.write(data)

    def close(self) -> None:
        self.gz.close()

    def whole_tar(self) -> bool:
        return self.size >= 1024 and self.size % 512 == 0 and self.tail == bytes(1024)


class _Unzstd:
    """zstd's frames from the master, decompressed onto the gzip writer as they come, in pieces
    of at most 1 MiB (a few bytes of zstd can stand for gigabytes: never all in memory). A cut
    stream leaves the tar inside without its end marker, which stream_tar_gz refuses."""

    def __init__(self, out):
        import zstandard

        self.w = zstandard.ZstdDecompressor().stream_writer(out, write_size=1 << 20, closefd=False)

    def write(self, data) -> None:
        import zstandard

        try:
            self.w.write(bytes(data))
        except zstandard.ZstdError as err:
            raise NovaDRError(f"the master's zstd stream is damaged ({err}); nothing was kept of this file") from None


# tar into zstd on the master, with both exit codes: a pipe in sh keeps only the last one.
_TAR_ZSTD = r"""
f=$(mktemp) || exit 1
{ "$@"; echo $? > "$f"; } | zstd -1 -q -c
z=$?; t=$(cat "$f"); rm -f "$f"
[ "$t" = 0 ] && [ "$z" = 0 ] || { echo "tar exited $t, zstd $z" >&2; exit 1; }
"""


def stream_tar_gz(conn: Connector, argv: list[str], out, timeout: float = 3600, zstd: bool = False) -> None:
    """A tar made on the master, stored gzipped. `zstd`: the master has zstd, and the tar crosses
    the link compressed by it (decompressed and gzipped here, in the same pass)."""
    gz = _Gzip(out)
    if zstd:
        conn.stream(["sh", "-c", _TAR_ZSTD, "tar-zstd", *argv], _Unzstd(gz), timeout=timeout)
    else:
        conn.stream(argv, gz, timeout=timeout)
    gz.close()
    if not gz.whole_tar():  # never store a cut archive as if it were whole
        raise NovaDRError(f"{conn.name}: the tar stream of `{' '.join(argv[:3])}` ended early ({gz.size} bytes, "
                          "no end-of-archive marker); nothing was kept of this file")


def store_node_archive(conn: Connector, master: Master, files: list[str], store: BackupStore, name: str) -> tuple[int, str]:
    """`tar` of the files (paths relative to /, as the daemon's archives hold them), mode 0600."""
    rel = [f.lstrip("/") for f in files]
    argv = ["tar", "-cf", "-", "-C", "/", "--", *rel] if rel else ["tar", "-cf", "-", "-T", "/dev/null"]
    return store.put(name, lambda out: stream_tar_gz(conn, argv, out), mode=0o600)


# The room in the backup dir (made if missing) and whether the master has zstd, in one command.
SAVE_PROBE = r"""mkdir -p "$1" && df -P -B1 "$1" | awk 'NR == 2 {printf "%s ", $4}'
command -v zstd >/dev/null 2>&1 && echo zstd || echo none
"""


def save_snapshot_on_master(conn: Connector, master: Master, tmp_path: str, db_size: int) -> tuple[dict, bool]:
    """`etcdctl snapshot save` against this member alone, then `snapshot status` of the file.
    Both etcdctl's own deadline and ours are sized from the member's db size (endpoint status).
    Returns the status and whether the master has zstd (the archive's stream uses it)."""
    env = read_etcd_env(conn, master)
    folder = tmp_path.rsplit("/", 1)[0]
    free, zstd = (conn.run(["sh", "-c", SAVE_PROBE, "probe", folder]).stdout.split() + ["", ""])[:2]
    need = db_size + (64 << 20)  # the saved file, plus room for what else writes there meanwhile
    if free.isdigit() and int(free) < need:
        raise NovaDRError(f"{master.etcd_member}: {folder} has {int(free) >> 20} MiB free, the snapshot needs about "
                          f"{need >> 20} MiB there (the database is {db_size >> 20} MiB); free some space or set "
                          "paths.backup_dir to a larger disk. Nothing was written")
    bound = int(work_timeout(db_size))
    etcdctl(conn, master, env, "snapshot", "save", tmp_path, f"--command-timeout={bound}s", own=True,
            timeout=bound + 60)
    st = read_snapshot_status(conn, master, tmp_path, db_size)
    return json.loads(st.model_dump_json()), zstd == "zstd"


def store_snapshot_archive(conn: Connector, tmp_path: str, member_name: str, store: BackupStore,
                           name: str, mode: int = 0o600, db_size: int = 0, zstd: bool = False) -> tuple[int, str]:
    """The saved db as a gzip tar whose one member is `opt/backup/<name>.db`, so the seed's
    restore commands (untar in /tmp, restore /tmp/opt/backup/<name>.db) work unchanged."""
    folder, base = tmp_path.rsplit("/", 1)
    pattern = base.replace(".", "\\.")
    argv = ["tar", "-cf", "-", "-C", folder, f"--transform=s|^{pattern}$|opt/backup/{member_name}|", "--", base]
    # Bounded by the bytes, not a fixed hour: an 8 GiB database on a slow disk takes longer.
    return store.put(name, lambda out: stream_tar_gz(conn, argv, out, max(3600.0, work_timeout(db_size)), zstd),
                     mode=mode)


def remove_temp_snapshot(conn: Connector, tmp_path: str) -> None:
    conn.run(["rm", "-f", "--", tmp_path])


def clear_temp_snapshots(conn: Connector, master: Master, older_than_minutes: int) -> list[str]:
    """The `.nova-dr-<ts>.db` copies a killed backup left in the backup dir (a snapshot is as
    big as the db: enough of them fill the disk), untouched for that long."""
    out = conn.run(["find", master.paths.backup_dir, "-maxdepth", "1", "-type", "f", "-name", ".nova-dr-*.db",
                    "-mmin", f"+{int(older_than_minutes)}", "-print", "-delete"], check=False)
    return [line for line in out.stdout.splitlines() if line.strip()]
