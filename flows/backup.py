"""backup-master-nodes: what the Nova Backup Daemon does, as a flow, to a directory (NFS) or S3.

One run, one timestamp: the etcd snapshot once (from a follower), one archive per master in
parallel, the StarVault snapshot once, then the manifest, written last. Retention runs only
after a successful backup.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.inventory import resolve_inventory
from core.errors import NovaDRError, PreflightError
from core.facts import ClusterFacts
from core.inventory import Cluster
from core.history import expired_segments
from core.names import etcd_snapshot_name, manifest_name, node_archive_name, starvault_snapshot_name, timestamp
from core.sets import ahead_note, expired, read_sets, retention_clock, spare_locked
from core.settings import resolve_settings
from core.signing import fingerprint, sign, trusts
from flows import machinery as mc
from flows.machinery import Run
from tasks import archive
from tasks.crypto import EncryptingStore, recipients_from, signing_key_from_block
from tasks.storage import BackupStore, StoreError, open_store

FLOW_NAME = "backup-master-nodes"
UNSIGNED = ("sets are stored unsigned: every reader refuses them unless told allow_unsigned=true, since anyone "
            "who can write to the store could have made them. Set backup_signing_block and backup_signers in the "
            "inventory")
UNENCRYPTED = ("secrets are stored unencrypted: the node archives hold private keys, unseal tokens and the etcd "
               "encryption keys. Set backup_recipients (age public keys) in the inventory")


def choose_snapshot_member(facts: ClusterFacts) -> str:
    """A healthy follower (the leader has enough to do), else the leader."""
    followers = [f.member for f in facts.masters if f.healthy and not (f.status and f.status.is_leader)]
    if followers:
        return followers[0]
    if facts.healthy:
        return facts.healthy[0]
    raise PreflightError("no healthy etcd member to take the snapshot from; nothing was written")


@task(name="clear-leftovers", retries=1, retry_delay_seconds=3, cache_policy=NO_CACHE)
def clear_leftovers(run: Run, store: BackupStore, age_minutes: int) -> dict:
    """What earlier backups that were killed left behind. A partial file never has a final name
    and no manifest names it (so no reader takes it for part of a set); this frees the space."""
    try:
        gone = {"store": store.clear_leftovers(age_minutes * 60)}
    except StoreError as err:  # a credential without ListMultipartUploads must not stop the backup
        get_run_logger().warning("could not clear what killed backups left in the store: %s", err)
        gone = {"store": []}
    per_master = mc.each_master(run.cluster.masters, lambda m: archive.clear_temp_snapshots(
        run.conn(m.etcd_member), m, age_minutes))
    gone.update({m.etcd_member: g for m, g in zip(run.cluster.masters, per_master)})
    found = [f"{where}: {', '.join(names)}" for where, names in gone.items() if names]
    if found:
        get_run_logger().info("removed what killed backups left: %s", "; ".join(found))
    return gone


@task(name="save-etcd-snapshot", retries=1, retry_delay_seconds=3, cache_policy=NO_CACHE)
def save_etcd_snapshot(run: Run, member: str, store: BackupStore, ts: str, db_size: int) -> dict:
    c = run.cluster
    m = c.master(member)
    conn = run.conn(member)
    db = etcd_snapshot_name(c.nova_version, c.k8s_version, ts, packed=False)
    tmp = f"{m.paths.backup_dir}/.nova-dr-{ts}.db"
    try:
        status, zstd = archive.save_snapshot_on_master(conn, m, tmp, db_size)
        # By this time the file's revision had been reached: a restore to a point in time may
        # start from this snapshot for any point after it (the set's timestamp is earlier).
        saved_at = round(time.time(), 3)
        name = db + ".tar.gz"
        size, sha = archive.store_snapshot_archive(conn, tmp, db, store, name, db_size=db_size, zstd=zstd)
    finally:
        archive.remove_temp_snapshot(conn, tmp)
    return {"name": name, "size": size, "sha256": sha, "kind": "etcd", "member": member, "status": status,
            "saved_at": saved_at}


@task(name="archive-master-files", retries=1, retry_delay_seconds=3, cache_policy=NO_CACHE)
def archive_master_files(run: Run, member: str, store: BackupStore, ts: str, settings: dict) -> dict:
    m = run.cluster.master(member)
    conn = run.conn(member)
    files, left_out, certs = archive.node_archive_members(conn, m, settings)
    name = node_archive_name(m.archive_name, ts)
    size, sha = archive.store_node_archive(conn, m, files, store, name)
    return {"name": name, "size": size, "sha256": sha, "kind": "node", "node": m.archive_name, "files": len(files),
            "left_out": left_out, "certificates": {e.path: e.not_after for e in certs}}


@task(name="save-starvault-snapshot", retries=1, retry_delay_seconds=3, cache_policy=NO_CACHE)
def save_starvault_snapshot(cluster: Cluster, block: str, store: BackupStore, ts: str) -> dict:
    from blocks.storage import StarVaultCredentials
    from tasks.starvault import store_raft_snapshot

    name = starvault_snapshot_name(cluster.nova_version, ts)
    size, sha = store_raft_snapshot(StarVaultCredentials.load(block), store, name)
    return {"name": name, "size": size, "sha256": sha, "kind": "starvault"}


def signing_key(cluster: Cluster, log):
    """The key this run signs with, read before anything is written; a warning when there is
    none, or when the readers would not trust it."""
    if not cluster.backup_signing_block:
        log.warning(UNSIGNED)
        return None
    key = signing_key_from_block(cluster.backup_signing_block)
    if not any(trusts(t, key.public_key()) for t in cluster.backup_signers):
        log.warning("the signing key %s of block %r is not one of the inventory's backup_signers: every reader "
                    "will refuse these sets. Add its public key to backup_signers", fingerprint(key.public_key()),
                    cluster.backup_signing_block)
    return key


def write_manifest(store: BackupStore, cluster: Cluster, ts: str, results: list[dict], settings: dict,
                   encrypted_to: list[str], signer=None) -> str:
    etcd = next(r for r in results if r["kind"] == "etcd")
    doc = {
        "format": 1, "created_by": "nova-dr backup-master-nodes", "timestamp": ts, "cluster": cluster.name,
        "nova_version": cluster.nova_version, "k8s_version": cluster.k8s_version, "settings": settings,
        # status: of the saved file (`snapshot status`), so its revision is the file's own, never
        # one read beside it (gardener/etcd-backup-restore#1044)
        "etcd_snapshot": {"member": etcd["member"], "status": etcd["status"], "saved_at": etcd["saved_at"]},
        "masters": [m.archive_name for m in cluster.masters],
        # sha256 is of what was stored (the ciphertext for .age files); plain_sha256 of what it decrypts to
        "files": {r["name"]: {"size": r["size"], "sha256": r["sha256"], "kind": r["kind"],
                              **({"node": r["node"]} if "node" in r else {}),
                              **({"plain_sha256": r["plain_sha256"], "plain_size": r["plain_size"]}
                                 if "plain_sha256" in r else {})} for r in results},
        "encrypted_to": len(encrypted_to),
    }
    body = json.dumps(doc, indent=1, sort_keys=True).encode()
    if signer is not None:
        body = sign(body, signer)
    name = manifest_name(ts)
    store.put(name, lambda out: out.write(body), mode=0o600)
    return name


def apply_retention(store: BackupStore, cluster: Cluster, days: int, require_starvault: bool) -> dict:
    files = store.list()
    sets, orphans = read_sets(files)
    now, clock = retention_clock(datetime.now(timezone.utc), files)
    doomed, why = expired(sets, now, days, [m.archive_name for m in cluster.masters], require_starvault)
    locks = {n: r[1] for n in doomed if (r := store.retention_of(n))}
    doomed, locked = spare_locked(sets, doomed, locks, now)
    why += locked
    for name in doomed:
        store.delete(name)
    kept = [s for s in sets if s.etcd not in doomed]
    history = expired_segments([f.name for f in files], min((s.time.timestamp() for s in kept), default=None))
    for name in history:
        store.delete(name)
    return {"deleted": doomed, "history_deleted": len(history), "kept": why, "left_alone": orphans, "clock": clock, "ahead": ahead_note(sets, now)}


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def backup_master_nodes(
    inventory: str,
    store: str,
    INCLUDE_STARVAULT_UNSEAL_TOKENS: bool | None = None,
    INCLUDE_PKI_DATA: bool | None = None,
    INCLUDE_DATA_ENCRYPTION_CONFIG: bool | None = None,
    INCLUDE_STARVAULT_DB_BACKUP: bool | None = None,
    RETENTION_PERIOD_DAYS: int | None = None,
    s3_block: str | None = None,
    starvault_block: str | None = None,
    recipients: list[str] | None = None,
    encrypt_etcd_snapshot: bool = False,
    leftover_age_minutes: int = 240,
    object_lock: str | None = None,
) -> dict:
    """Back up every master: the etcd snapshot, one archive per master, the StarVault snapshot,
    a manifest; then retention. Each INCLUDE_* / RETENTION_PERIOD_DAYS left empty comes from the
    environment variable of the same name, else the documented default.

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        store: where backups go: a directory (an NFS mount) or s3://bucket/prefix
        INCLUDE_STARVAULT_UNSEAL_TOKENS: add the StarVault unseal tokens held on each master (default true)
        INCLUDE_PKI_DATA: add every issued TLS certificate with its key, never a CA key (default true)
        INCLUDE_DATA_ENCRYPTION_CONFIG: add the etcd encryption-at-rest config (default true)
        INCLUDE_STARVAULT_DB_BACKUP: add a StarVault raft snapshot (default true; needs starvault_block)
        RETENTION_PERIOD_DAYS: days to keep sets in the store (default 7); the newest complete set always stays
        s3_block: a Nova Backup S3 Credentials block for an s3:// store (default: the environment)
        starvault_block: a Nova StarVault Credentials block (address and token)
        recipients: age public keys (age1...) to encrypt the node archives and the StarVault snapshot to
            (default: the inventory's backup_recipients; none: stored unencrypted, with a warning)
        encrypt_etcd_snapshot: encrypt the etcd snapshot too (its Secrets are encrypted at rest already
            when the platform's encryption config is on, but its keys are in the node archives)
        leftover_age_minutes: what a killed backup left (partial files in the store, open multipart
            uploads, snapshot copies on the masters) is removed once it is this old (default 4 h)
        object_lock: GOVERNANCE or COMPLIANCE: write every file of the set with S3 Object Lock for
            RETENTION_PERIOD_DAYS, so that nobody (COMPLIANCE: not even the bucket's admin) can delete
            or overwrite it before then; needs an s3:// bucket created with Object Lock
    """
    log = get_run_logger()
    settings = resolve_settings(dict(INCLUDE_STARVAULT_UNSEAL_TOKENS=INCLUDE_STARVAULT_UNSEAL_TOKENS,
                                     INCLUDE_PKI_DATA=INCLUDE_PKI_DATA,
                                     INCLUDE_DATA_ENCRYPTION_CONFIG=INCLUDE_DATA_ENCRYPTION_CONFIG,
                                     INCLUDE_STARVAULT_DB_BACKUP=INCLUDE_STARVAULT_DB_BACKUP,
                                     RETENTION_PERIOD_DAYS=RETENTION_PERIOD_DAYS))
    if object_lock not in (None, "", "GOVERNANCE", "COMPLIANCE"):
        raise NovaDRError(f"object_lock={object_lock!r}: give GOVERNANCE, COMPLIANCE or leave it empty")
    if object_lock and not store.startswith("s3://"):
        raise NovaDRError(f"object_lock={object_lock} needs an s3:// store; {store!r} is a directory, whose "
                          "files its admin can always delete")
    cluster = resolve_inventory(inventory)
    if settings["INCLUDE_STARVAULT_DB_BACKUP"] and not starvault_block:
        raise NovaDRError("INCLUDE_STARVAULT_DB_BACKUP is on but no starvault_block is given: save a Nova StarVault "
                          "Credentials block and pass its name, or turn the switch off")
    signer = signing_key(cluster, log)
    keys = recipients if recipients is not None else cluster.backup_recipients
    st = open_store(store, s3_block)
    st.list()  # the store answers before any master is touched
    lock = None
    if object_lock:  # the set then outlives its retention period whatever happens to the bucket's keys
        lock = (object_lock, datetime.now(timezone.utc) + timedelta(days=settings["RETENTION_PERIOD_DAYS"]))
        st.lock_puts(*lock)
    base = st
    if keys:
        st = EncryptingStore(st, recipients_from(keys), {"node", "starvault"} | ({"etcd"} if encrypt_etcd_snapshot
                                                                                  else set()))
    else:
        log.warning(UNENCRYPTED)
    run = Run(FLOW_NAME, cluster)
    try:
        facts = mc.preflight(run)
        if facts.unreachable:
            raise PreflightError("cannot back up: " + "; ".join(f.error for f in facts.masters if not f.reachable)
                                 + ". No manifest was written")
        clear_leftovers(run, base, leftover_age_minutes)
        member = choose_snapshot_member(facts)
        ts = timestamp(datetime.now(timezone.utc))
        print(f"backup {ts}: etcd snapshot from {member}, {len(cluster.masters)} node archives -> {st.url}")
        status = facts.by_member(member).status
        futures = [save_etcd_snapshot.submit(run, member, st, ts, status.db_size if status else 0)]
        futures += [archive_master_files.submit(run, m.etcd_member, st, ts, settings) for m in cluster.masters]
        if settings["INCLUDE_STARVAULT_DB_BACKUP"]:
            futures.append(save_starvault_snapshot.submit(cluster, starvault_block, st, ts))
        results, errors = [], []
        for f in futures:  # read every result: a failed task must fail the run
            try:
                results.append(f.result())
            except Exception as err:
                errors.append(str(err))
        if errors:
            raise NovaDRError(f"backup {ts} failed, no manifest written: " + " | ".join(errors))
        for r in results:  # the names as stored, with the plaintext's digest beside the ciphertext's
            r.update(getattr(st, "stored", {}).get(r["name"], {}))
        manifest = write_manifest(st, cluster, ts, results, settings, list(keys or []), signer)
        retention = apply_retention(st, cluster, settings["RETENTION_PERIOD_DAYS"],
                                    settings["INCLUDE_STARVAULT_DB_BACKUP"])
    finally:
        run.close()
    log.info("retention: deleted %d files; %s", len(retention["deleted"]), retention["kept"])
    if retention["ahead"]:
        log.warning("store %s: sets %s", st.url, retention["ahead"])
    rows = [[r["name"], r["size"], r["sha256"][:16]] for r in results]
    mc.publish("backup-report", f"# Backup {ts} to `{st.url}`\n\n" + mc.render_table(["file", "bytes", "sha256"], rows)
               + f"\n\nmanifest `{manifest}`; retention: deleted {len(retention['deleted'])}, {retention['kept']}"
               + (f"\n\nEncrypted with age to {len(keys)} recipient(s)." if keys else f"\n\n> **Warning:** {UNENCRYPTED}")
               + (f"\n\nEvery file locked ({lock[0]}) until {lock[1]:%Y-%m-%d %H:%M} UTC." if lock else ""),
               "backup-master-nodes: what was written")
    return {"timestamp": ts, "store": st.url, "files": results, "manifest": manifest, "retention": retention,
            "settings": settings, "object_lock": {"mode": lock[0], "until": lock[1].isoformat()} if lock else None}
