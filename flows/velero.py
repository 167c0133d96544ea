"""setup-data-protection (SPEC P2) and velero-backup (SPEC P3): Velero through the Kubernetes
API and its bucket through boto3; no `velero` or `kubectl` binary."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger

from blocks.kube import resolve_kube
from blocks.storage import S3Credentials, StarVaultCredentials
from core import kube as k
from core.errors import NovaDRError
from core.plan import Plan, Step
from flows import machinery as mc
from tasks import starvault
from tasks.bucket import VeleroBucket
from tasks.kube import Kube, KubeError, wait_for

SETUP = "setup-data-protection"
BACKUP = "velero-backup"
KV_MOUNT, KV_PATH, KV_KEY = "nova-secrets", "credentials/nova-velero", "repository_password"


def load_block(cls, name: str | None, what: str):
    if not name:
        raise NovaDRError(f"{what}: name the {cls._block_type_name} block; nothing was changed")
    try:
        return cls.load(name)
    except ValueError:
        raise NovaDRError(f"{what}: no {cls._block_type_name} block named {name!r}; save one first") from None


def existing_backups(api: Kube, bucket: VeleroBucket) -> list[str]:
    """Evidence that repositories already exist: Velero Backups, or a Kopia repository in the bucket."""
    found = [f"Backup {b['metadata']['name']}" for b in api.list_cr(k.VELERO, "backups", k.BACKUP_NS)]
    if bucket.has(k.KOPIA_PREFIX):
        found.append(f"a Kopia repository under {bucket.prefix}{k.KOPIA_PREFIX}")
    return found


@flow(name=SETUP)
def setup_data_protection(
    kube: str | None = None,
    s3_block: str | None = None,
    bucket: str | None = None,
    prefix: str = "",
    bsl_name: str = "default",
    rotate_password: bool = False,
    starvault_block: str | None = None,
    force_rotation: bool = False,
    auto_approve: bool = False,
    approval_timeout_minutes: float = 60,
    timeout_minutes: float = 5,
    poll_seconds: float = 2.0,
) -> dict:
    """The `cloud-credentials` Secret from an S3 credentials block, optionally a new Kopia
    repository password (before any backup exists), and a BackupStorageLocation."""
    log = get_run_logger()
    creds = load_block(S3Credentials, s3_block, "s3_block")
    if not creds.endpoint_url:
        raise NovaDRError(f"s3_block {s3_block}: set endpoint_url; Velero needs its s3Url")
    bsl = k.render_bsl(bsl_name, bucket or "", prefix, creds.region_name, creds.endpoint_url)
    vault = load_block(StarVaultCredentials, starvault_block, "starvault_block") if rotate_password else None
    api = Kube(resolve_kube(kube))
    store = VeleroBucket(creds.session(), bsl["spec"]["objectStorage"]["bucket"], prefix)
    store.check_exists()
    if not api.namespace_exists(k.BACKUP_NS):
        raise NovaDRError(f"namespace {k.BACKUP_NS} does not exist at {api.host}: install the Data Protection "
                          "module first; nothing was changed")
    warnings = []
    if rotate_password:
        if api.read("Deployment", k.BACKUP_NS, "velero") is None:
            raise NovaDRError(f"deployment {k.BACKUP_NS}/velero does not exist; nothing was changed")
        starvault.kv2_read(vault, KV_MOUNT, KV_PATH)  # readable, not soft-deleted: before anything is applied
        found = existing_backups(api, store)
        if found and not force_rotation:
            raise NovaDRError("refusing to rotate the Kopia repository password: backups already exist ("
                              + ", ".join(found[:5]) + "). A new password does not re-key existing repositories, "
                              "which would then be unreadable; pass force_rotation=true only if you accept that. "
                              "Nothing was changed")
        if found:
            warnings.append("force_rotation: existing repositories keep the old password and will not open with "
                            "the new one")
    steps = [Step(id="cloud-credentials", action="apply", title=f"create or update Secret {k.BACKUP_NS}/cloud-credentials"
                  " (key cloud, from the S3 block)", command=f"server-side apply Secret {k.BACKUP_NS}/cloud-credentials")]
    if rotate_password:
        steps += [Step(id="rotate-password", action="kv", title="write a new version of the repository password",
                       command=f"StarVault KV v2 {KV_MOUNT}/{KV_PATH} key {KV_KEY}", destructive=True,
                       deps=("cloud-credentials",)),
                  Step(id="restart-velero", action="restart", title="rollout restart deployment/velero",
                       command=f"kubectl -n {k.BACKUP_NS} rollout restart deployment/velero",
                       deps=("rotate-password",))]
    steps.append(Step(id="bsl", action="apply", title=f"apply BackupStorageLocation {bsl_name} and wait for Available",
                      command=f"server-side apply BackupStorageLocation {k.BACKUP_NS}/{bsl_name}",
                      deps=(steps[-1].id,)))
    plan = Plan(flow=SETUP, cluster=api.host, recovery_id=mc.slug(f"{SETUP}-{bsl_name}"), steps=tuple(steps),
                warnings=tuple(warnings), summary=f"Bucket `{store.bucket}` at {creds.endpoint_url}")
    log.info("%s", plan.text())
    mc.publish(f"{mc.slug(SETUP)}-plan", plan.markdown(), f"What {SETUP} will do")
    approval = mc.approval_gate(plan, auto_approve, approval_timeout_minutes)

    api.apply_secret(k.BACKUP_NS, "cloud-credentials", {"cloud": k.cloud_credentials(
        creds.access_key_id, creds.secret_access_key.get_secret_value())})
    rows = [["cloud-credentials", "applied"]]
    if rotate_password:
        data, version = starvault.kv2_read(vault, KV_MOUNT, KV_PATH)
        version = starvault.kv2_write(vault, KV_MOUNT, KV_PATH, {**data, KV_KEY: secrets.token_urlsafe(32)}, version)
        rows.append(["repository password", f"new version {version} of {KV_MOUNT}/{KV_PATH}"])
        api.restart_deployment(k.BACKUP_NS, "velero")
        why = wait_for(f"rollout of deployment {k.BACKUP_NS}/velero",
                       lambda: k.rollout_state(api.read("Deployment", k.BACKUP_NS, "velero")),
                       timeout_minutes * 60, poll_seconds)
        rows.append(["velero rollout", why])
    before = api.get_cr(k.VELERO, "backupstoragelocations", k.BACKUP_NS, bsl_name) or {}
    previous = (before.get("status") or {}).get("lastValidationTime")
    if previous and previous >= datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"):
        # validated this very second: wait for the next, or its validation of our spec would
        # carry the same whole-second time as the old one
        time.sleep(1.05 - datetime.now(timezone.utc).microsecond / 1e6)
    applied_at = datetime.now(timezone.utc)
    api.apply_cr(k.VELERO, "backupstoragelocations", bsl, force=True)

    def bsl_probe():  # the old phase says nothing of the new bucket or keys
        settled, ok, why = k.bsl_state(api.get_cr(k.VELERO, "backupstoragelocations", k.BACKUP_NS, bsl_name),
                                       applied_at, previous)
        return settled and ok, why

    try:
        rows.append([f"BackupStorageLocation {bsl_name}", wait_for(
            f"BackupStorageLocation {k.BACKUP_NS}/{bsl_name}", bsl_probe, timeout_minutes * 60, poll_seconds)])
    except KubeError as err:
        raise KubeError(f"{err}. Check the bucket, the endpoint and the keys in s3_block {s3_block}") from None
    mc.publish(f"{mc.slug(SETUP)}-report", f"# {SETUP}\n\nApproved by {approval['approved_by']}.\n\n"
               + mc.render_table(["what", "result"], rows), "Data Protection set up")
    return {r[0]: r[1] for r in rows}


@flow(name=BACKUP)
def velero_backup(
    kube: str | None = None,
    s3_block: str | None = None,
    name: str | None = None,
    schedule: str | None = None,
    namespaces: list[str] | None = None,
    fs_backup: bool = True,
    ordered_resources: dict[str, str] | None = None,
    ttl: str = "720h0m0s",
    storage_location: str = "default",
    timeout_minutes: float = 60,
    poll_seconds: float = 5.0,
) -> dict:
    """A one-time Backup (name, default nova-dr-<time>) or, with schedule, the Schedule
    control-plane-backup; then the bucket is checked against what Velero reports."""
    log = get_run_logger()
    cron = k.check_cron(schedule) if schedule else None
    creds = None if cron else load_block(S3Credentials, s3_block, "s3_block")  # to check the bucket afterwards
    api = Kube(resolve_kube(kube))
    bsl = api.get_cr(k.VELERO, "backupstoragelocations", k.BACKUP_NS, storage_location)
    if bsl is None:
        raise NovaDRError(f"BackupStorageLocation {k.BACKUP_NS}/{storage_location} does not exist: run "
                          f"{SETUP} first; nothing was created")
    spec = k.backup_spec(namespaces or [k.BACKUP_NS], fs_backup, ordered_resources, ttl, storage_location)
    if cron:
        obj = {"apiVersion": "/".join(k.VELERO), "kind": "Schedule",
               "metadata": {"name": k.SCHEDULE, "namespace": k.BACKUP_NS},
               "spec": {"schedule": cron, "template": spec}}
        api.apply_cr(k.VELERO, "schedules", obj, force=True)

        def schedule_probe():
            cur = api.get_cr(k.VELERO, "schedules", k.BACKUP_NS, k.SCHEDULE)
            st = cur.get("status") or {}
            if st.get("phase") == "FailedValidation":
                raise NovaDRError(f"Schedule {k.BACKUP_NS}/{k.SCHEDULE}: FailedValidation: "
                                  + "; ".join(st.get("validationErrors") or ["no details"]))
            return st.get("phase") == "Enabled", st.get("phase") or "New"

        wait_for(f"Schedule {k.BACKUP_NS}/{k.SCHEDULE} Enabled", schedule_probe, timeout_minutes * 60, poll_seconds)
        log.info("Schedule %s/%s is Enabled: %s", k.BACKUP_NS, k.SCHEDULE, cron)
        return {"schedule": k.SCHEDULE, "cron": cron, "phase": "Enabled"}

    name = name or "nova-dr-" + datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    if api.get_cr(k.VELERO, "backups", k.BACKUP_NS, name) is not None:
        raise NovaDRError(f"Backup {k.BACKUP_NS}/{name} already exists; choose another name")
    api.create_cr(k.VELERO, "backups", {"apiVersion": "/".join(k.VELERO), "kind": "Backup",
                                         "metadata": {"name": name, "namespace": k.BACKUP_NS}, "spec": spec})
    bucket = VeleroBucket(creds.session(), bsl["spec"]["objectStorage"]["bucket"],
                          bsl["spec"]["objectStorage"].get("prefix", ""))
    outcome = wait_velero(api, "backups", name, k.BACKUP_FAILED, timeout_minutes, poll_seconds)
    messages = k.results_messages(bucket.read_json(f"backups/{name}/{name}-results.gz", gz=True) or {})
    for m in messages:
        log.warning("%s", m)
    if not outcome[0]:
        raise NovaDRError(f"Backup {k.BACKUP_NS}/{name}: {outcome[1]}" + (": " + "; ".join(messages[:10])
                                                                           if messages else ""))
    checks = check_backup_in_bucket(bucket, name, fs_backup)
    mc.publish(f"{mc.slug(BACKUP)}-report", f"# {BACKUP} {name}\n\n{outcome[1]}\n\n"
               + mc.render_table(["check", "result"], checks + [["message", m] for m in messages]),
               "The Velero backup and what its bucket holds")
    bad = [c for c in checks if not c[1].startswith("ok")]
    if bad:
        raise NovaDRError(f"Backup {name} is Completed but its bucket disagrees: " + "; ".join(f"{c[0]}: {c[1]}"
                                                                                              for c in bad))
    return {"backup": name, "phase": "Completed", "messages": messages}


def wait_velero(api: Kube, plural: str, name: str, failed: set[str], timeout_minutes: float,
                poll_seconds: float) -> tuple[bool, str]:
    def probe():
        obj = api.get_cr(k.VELERO, plural, k.BACKUP_NS, name)
        if obj is None:
            raise NovaDRError(f"{plural[:-1]} {k.BACKUP_NS}/{name} disappeared while waiting")
        terminal, ok, why = k.velero_state(obj, failed)
        return terminal, (ok, why)

    return wait_for(f"{plural[:-1].capitalize()} {k.BACKUP_NS}/{name}", probe, timeout_minutes * 60, poll_seconds)


def check_backup_in_bucket(bucket: VeleroBucket, name: str, fs_backup: bool) -> list[list[str]]:
    rows = []
    meta = bucket.read_json(f"backups/{name}/velero-backup.json")
    if meta is None:
        rows.append(["velero-backup.json", f"missing under {bucket.prefix}backups/{name}/"])
    else:
        phase = (meta.get("status") or {}).get("phase")
        rows.append(["velero-backup.json", "ok" if phase == "Completed" else f"phase there is {phase}"])
    rows.append([f"{name}.tar.gz", "ok" if bucket.has(f"backups/{name}/{name}.tar.gz") else "missing"])
    if fs_backup:
        rows.append(["Kopia repository", "ok" if bucket.has(k.KOPIA_PREFIX) else
                     f"nothing under {bucket.prefix}{k.KOPIA_PREFIX}"])
    return rows
