"""compact-history: the newest full snapshot and the history recorded since, folded into a new
full snapshot (in a scratch etcd, as a restore to a point builds one), so that a restore to a
recent point replays hours of history at most, not days (etcd-druid compacts every million
events the same way).

The folded snapshot is stored as a set of its own, an etcd snapshot and a signed manifest
that says which revision of the history it holds: a txn per thousand keys replays a history
of many revisions, so the file's own revision is lower. It has no node archives, so `latest`
never picks it for a plain restore; a restore to a point starts from it when it is the
newest full snapshot before the point. Retention takes it with the others.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger

from blocks.inventory import resolve_inventory
from core.errors import NovaDRError
from core.etcd import parse_snapshot_status
from core.history import chain_from, parse_segment_name
from core.names import etcd_snapshot_name, manifest_name, parse_timestamp, timestamp
from core.sets import WINDOW, read_sets
from core.signing import sign
from flows import machinery as mc
from flows.backup import UNSIGNED, signing_key
from tasks.crypto import EncryptingStore, recipients_from
from tasks.drill import find_etcd_bins
from tasks.history_store import full_snapshots
from tasks.point import build_point
from tasks.scratch import scratch_dir
from tasks.storage import open_store

FLOW_NAME = "compact-history"


@flow(name=FLOW_NAME, log_prints=True)
def compact_history(
    inventory: str,
    store: str,
    min_revisions: int = 1_000_000,
    s3_block: str | None = None,
    identity_block: str | None = None,
    encrypt_etcd_snapshot: bool = False,
    recipients: list[str] | None = None,
) -> dict:
    """Fold the newest full snapshot and the history since into a new full snapshot.

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        store: the cluster's backup store, where continuous-backup records its history
        min_revisions: fold only when the history since the newest full snapshot holds this many revisions
        s3_block: a Nova Backup S3 Credentials block for an s3:// store (default: the environment)
        identity_block: a Nova Backup Age Identity block, when the history or the snapshot is encrypted
        encrypt_etcd_snapshot: encrypt the folded snapshot (as backup-master-nodes' switch of the same name)
        recipients: age public keys for it (default: the inventory's backup_recipients)
    """
    log = get_run_logger()
    if min_revisions < 1:
        raise NovaDRError(f"min_revisions={min_revisions}: give 1 or more")
    cluster = resolve_inventory(inventory)
    signer = signing_key(cluster, log)
    st = open_store(store, s3_block)
    bases, _ = full_snapshots(st, cluster.backup_signers)
    if not bases:
        raise NovaDRError(f"store {st.url}: no full snapshot a trusted key signed, so nothing to fold the history "
                          "into; run backup-master-nodes first")
    base = bases[-1]
    names = [f.name for f in st.list() if parse_segment_name(f.name)]
    reaches = chain_from(base.revision, names).reaches
    if reaches - base.revision < min_revisions:
        print(f"nothing to fold: {reaches - base.revision} revisions recorded since the full snapshot of "
              f"{base.set.ts} (revision {base.revision}), fewer than min_revisions={min_revisions}")
        return {"folded": False, "base": base.set.ts, "revisions": reaches - base.revision}
    keys = recipients if recipients is not None else cluster.backup_recipients
    if encrypt_etcd_snapshot and not keys:
        raise NovaDRError("encrypt_etcd_snapshot is on but there are no recipients: set backup_recipients in the "
                          "inventory or pass recipients")
    out = EncryptingStore(st, recipients_from(keys), {"etcd"}) if encrypt_etcd_snapshot else st
    with scratch_dir("nova-dr-compact-", mc.state_dir()) as tmp:
        built = build_point(st, cluster, Path(tmp), revision=reaches, identity_block=identity_block)
        ts = timestamp(datetime.fromtimestamp(built.at, timezone.utc))
        # A set's files are grouped by time (core/sets.py): a folded snapshot stamped within
        # WINDOW of a daemon's set (whose archives carry each master's own time) could take
        # one of its archives. Ours carry their set's exact timestamp and stay with it.
        near = [s.ts for s in read_sets(st.list())[0]
                if abs(s.time - parse_timestamp(ts)) <= WINDOW and (s.ts == ts or not s.manifest)]
        if near:
            print(f"not folded now: set {near[0]} is within {WINDOW} of the point the fold would be stamped "
                  f"with ({ts}); the next run folds")
            return {"folded": False, "base": base.set.ts, "revisions": reaches - base.revision, "near": near[0]}
        status = parse_snapshot_status(subprocess.run(
            [str(find_etcd_bins() / "etcdutl"), "snapshot", "status", built.db, "-w", "json"],
            capture_output=True, text=True, check=True, timeout=3600).stdout)
        db_name = etcd_snapshot_name(cluster.nova_version, cluster.k8s_version, ts, packed=False)
        name = db_name + ".tar.gz"
        size, sha = out.put(name, lambda f: _tar_gz(f, built.db, db_name), mode=0o600)
    stored = getattr(out, "stored", {}).get(name, {"name": name})
    doc = {
        "format": 1, "created_by": "nova-dr compact-history", "timestamp": ts, "cluster": cluster.name,
        "nova_version": cluster.nova_version, "k8s_version": cluster.k8s_version, "settings": {},
        "etcd_snapshot": {"member": f"folded from {base.set.ts}", "status": json.loads(status.model_dump_json()),
                          "saved_at": built.at, "history_revision": reaches, "folded_from": base.set.ts},
        "masters": [m.archive_name for m in cluster.masters],
        "files": {stored["name"]: {"size": size, "sha256": sha, "kind": "etcd",
                                   **({k: stored[k] for k in ("plain_sha256", "plain_size")} if "plain_sha256" in stored
                                      else {})}},
        "encrypted_to": len(keys or []) if encrypt_etcd_snapshot else 0,
    }
    body = json.dumps(doc, indent=1, sort_keys=True).encode()
    st.put(manifest_name(ts), lambda f: f.write(sign(body, signer) if signer else body), mode=0o600)
    summary = {"folded": True, "base": base.set.ts, "set": ts, "history_revision": reaches,
               "file_revision": status.revision, "revisions": reaches - base.revision, "applied": built.applied,
               "size": size}
    mc.publish("compact-history-report",
               f"# compact-history of `{cluster.name}`\n\nThe full snapshot of {base.set.ts} (revision {base.revision}) "
               f"and {reaches - base.revision} revisions of history, folded into set `{ts}`: the keyspace at revision "
               f"{reaches}, {built.applied['puts']} keys written and {built.applied['deletes']} deleted in "
               f"{built.applied['txns']} txns, {size} bytes." + ("" if signer else f"\n\n> **Warning:** {UNSIGNED}"),
               "compact-history: what was folded")
    return summary


def _tar_gz(out, db: str, db_name: str) -> None:
    """The folded .db as a set's etcd archive holds one: `opt/backup/<name>.db`, mode 0600."""
    from isal import igzip  # as the backup's archives are gzipped: several times faster, still plain gzip

    with igzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tar.gettarinfo(db, arcname=f"opt/backup/{db_name}")
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "root", "root"
        with open(db, "rb") as f:
            tar.addfile(info, f)
