"""The Kubernetes side of the platform's backups, as pure functions: the objects we send
(rendered from parameters) and what the objects we read mean (phases, conditions, pods)."""

from __future__ import annotations

import json
import re
from datetime import datetime

import yaml

from core.errors import NovaDRError

GITOPS_NS = "nova-gitops"
BACKUP_NS = "nova-cluster-backup"
RESTORE_NS = "nova-cluster-restore"
CRONJOB_KUSTOMIZATION = "nova-release-cluster-backup-cronjob"
CRONJOB = "nova-backup-scheduled"
DAEMONSET = "nova-backup-daemon"
DAEMON_LABEL = "app.kubernetes.io/component=nova-backup-daemon"
DAEMON_CONTAINER = "backup-daemon"
DAEMON_DIR = "/opt/backup"
SCHEDULE = "control-plane-backup"
KOPIA_PREFIX = "kopia/nova-cluster-backup/"
FIELD_MANAGER = "nova-dr"
VELERO = ("velero.io", "v1")
FLUX = ("kustomize.toolkit.fluxcd.io", "v1")

# --- cron -------------------------------------------------------------------------------------

_CRON_FIELDS = [("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
                ("month", 1, 12, {m: i for i, m in enumerate(
                    "jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}),
                ("day of week", 0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())})]
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def check_cron(expr: str) -> str:
    """The standard 5-field cron syntax Kubernetes CronJobs and Velero Schedules take."""
    text = " ".join(str(expr).split())
    if text.lower() in _CRON_MACROS:
        return text
    parts = text.split(" ")
    if len(parts) != 5:
        raise NovaDRError(f"schedule {expr!r}: write 5 cron fields (minute hour day-of-month month day-of-week), "
                          "e.g. '0 4 * * *'")
    for part, (name, lo, hi, names) in zip(parts, _CRON_FIELDS):
        for item in part.split(","):
            base, _, step = item.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                raise NovaDRError(f"schedule {expr!r}: bad step {step!r} in the {name} field")
            if base == "*":
                continue
            bounds = base.split("-")
            if len(bounds) > 2:
                raise NovaDRError(f"schedule {expr!r}: bad range {base!r} in the {name} field")
            values = []
            for b in bounds:
                v = names.get(b.lower()) if b.isalpha() else (int(b) if b.isdigit() else None)
                if v is None or not lo <= v <= hi:
                    raise NovaDRError(f"schedule {expr!r}: {b!r} is not a valid {name} ({lo}-{hi})")
                values.append(v)
            if len(values) == 2 and values[0] > values[1]:
                raise NovaDRError(f"schedule {expr!r}: range {base!r} runs backwards in the {name} field")
    return text


# --- install-cronjob-backup -----------------------------------------------------------------------

def cronjob_path(masters: int) -> str:
    if masters not in (1, 3):
        raise NovaDRError(f"masters={masters}: the platform ships a 3-master and a 1-master variant; write 3 or 1")
    return f"./releases/cluster-backup/cronjob/{'3-masters' if masters == 3 else '1-master'}"


def backup_volume(nfs_server: str | None, nfs_path: str | None, volume: dict | None) -> dict:
    """The `backup-volume` source: NFS (the seed's recommendation) or any volume source."""
    if volume and (nfs_server or nfs_path):
        raise NovaDRError("give the backup volume once: either nfs_server and nfs_path, or volume")
    if volume:
        if not isinstance(volume, dict) or len(volume) != 1:
            raise NovaDRError("volume: write one volume source, e.g. {\"persistentVolumeClaim\": {\"claimName\": \"x\"}}")
        return volume
    if not nfs_server or not nfs_path:
        raise NovaDRError("name the backup volume: nfs_server and nfs_path (an NFS export), or volume (any volume "
                          "source); nothing was applied")
    if not nfs_path.startswith("/"):
        raise NovaDRError(f"nfs_path {nfs_path!r}: write the export's absolute path")
    return {"nfs": {"server": nfs_server, "path": nfs_path, "readOnly": False}}


def render_cronjob_kustomization(*, source_kind: str, source_name: str, source_namespace: str, path: str,
                                 settings: dict, schedule: str, volume: dict, interval: str = "10m") -> dict:
    """The Flux Kustomization that installs CronJob backups, with our settings passed through
    postBuild substitution and the schedule and volume through a patch on the CronJob."""
    substitute = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in settings.items()}
    substitute["BACKUP_SCHEDULE"] = schedule
    patch = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": CRONJOB, "namespace": BACKUP_NS},
             "spec": {"schedule": schedule, "jobTemplate": {"spec": {"template": {"spec": {
                 "volumes": [{"name": "backup-volume", **volume}]}}}}}}
    return {"apiVersion": "/".join(FLUX), "kind": "Kustomization",
            "metadata": {"name": CRONJOB_KUSTOMIZATION, "namespace": GITOPS_NS,
                         "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
            "spec": {"interval": interval, "path": path, "prune": True, "wait": True, "timeout": "5m",
                     "sourceRef": {"kind": source_kind, "name": source_name, "namespace": source_namespace},
                     "postBuild": {"substitute": substitute},
                     "patches": [{"patch": yaml.safe_dump(patch, sort_keys=False),
                                  "target": {"kind": "CronJob", "name": CRONJOB}}]}}


# Ready=False reasons that kustomize-controller retries by itself (a source not fetched yet, a
# dependency not ready): not an answer yet. internal/controller/kustomization_controller.go.
FLUX_RETRIED = ("ArtifactFailed", "DependencyNotReady")


def kustomization_state(obj: dict) -> tuple[bool, bool, str]:
    """(settled, ready, why). Settled once Flux reported on this very generation: the Ready
    condition's own observedGeneration, as `flux` reads it. kustomize-controller writes it on
    every outcome (fluxcd/pkg runtime/conditions), but moves status.observedGeneration only on
    success, so waiting for that one turned every BuildFailed into a 10-minute timeout."""
    gen = obj["metadata"].get("generation")
    status = obj.get("status") or {}
    ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
    seen = None if ready is None else ready.get("observedGeneration", status.get("observedGeneration"))
    if ready is None or seen != gen:
        return False, False, f"Flux has not reconciled generation {gen} yet"
    why = f"{ready.get('reason', '')}: {ready.get('message', '')}".strip(": ")
    if ready.get("status") == "True":
        return True, True, why
    if ready.get("status") == "False" and ready.get("reason") not in FLUX_RETRIED:
        return True, False, why
    return False, False, why or "reconciling"


def pod_outcome(pod: dict) -> str:
    """What `kubectl get pods` prints in the seed for a backup pod: Completed or Error."""
    phase = (pod.get("status") or {}).get("phase", "Unknown")
    return {"Succeeded": "Completed", "Failed": "Error"}.get(phase, phase)


def newest_job(jobs: list[dict], cronjob: str) -> dict | None:
    mine = [j for j in jobs if any(r.get("kind") == "CronJob" and r.get("name") == cronjob
                                   for r in j["metadata"].get("ownerReferences", []))]
    return max(mine, key=lambda j: j["metadata"]["creationTimestamp"], default=None)


# --- Velero ----------------------------------------------------------------------------------------

def cloud_credentials(access_key_id: str, secret_access_key: str) -> str:
    """The `cloud` key of Secret cloud-credentials: an AWS-style shared credentials file."""
    return f"[default]\naws_access_key_id={access_key_id}\naws_secret_access_key={secret_access_key}\n"


def render_bsl(name: str, bucket: str, prefix: str, region: str, s3_url: str) -> dict:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket or ""):
        raise NovaDRError(f"bucket {bucket!r}: not a valid S3 bucket name")
    if prefix.strip("/").startswith("kopia"):
        raise NovaDRError(f"prefix {prefix!r}: Velero keeps its Kopia repository under kopia/; choose another prefix")
    return {"apiVersion": "/".join(VELERO), "kind": "BackupStorageLocation",
            "metadata": {"name": name, "namespace": BACKUP_NS},
            "spec": {"provider": "aws", "default": name == "default",
                     "objectStorage": {"bucket": bucket, **({"prefix": prefix.strip("/")} if prefix.strip("/") else {})},
                     "credential": {"name": "cloud-credentials", "key": "cloud"},
                     "config": {"region": region, "s3Url": s3_url, "s3ForcePathStyle": "true"}}}


def backup_spec(namespaces: list[str], fs_backup: bool, ordered: dict[str, str] | None, ttl: str,
                location: str) -> dict:
    spec = {"includedNamespaces": namespaces, "storageLocation": location, "ttl": ttl}
    if fs_backup:
        spec["defaultVolumesToFsBackup"] = True
    if ordered:
        spec["orderedResources"] = ordered
    return spec


# Velero phases (pkg/apis/velero/v1): Completed passes; these end a run badly.
BACKUP_FAILED = {"PartiallyFailed", "Failed", "FailedValidation", "Deleting"}
RESTORE_FAILED = {"PartiallyFailed", "Failed", "FailedValidation"}


def velero_state(obj: dict, failed: set[str]) -> tuple[bool, bool, str]:
    """(terminal, ok, why) of a Backup or Restore. Status is part of the object (no subresource)."""
    st = obj.get("status") or {}
    phase = st.get("phase") or "New"
    if phase == "Completed":
        return True, True, _velero_counts(st, phase)
    if phase in failed:
        why = [_velero_counts(st, phase)]
        if st.get("failureReason"):
            why.append(f"failure reason: {st['failureReason']}")
        if st.get("validationErrors"):
            why.append("validation errors: " + "; ".join(st["validationErrors"]))
        return True, False, ", ".join(why)
    return False, False, phase


def _velero_counts(st: dict, phase: str) -> str:
    return f"phase {phase} ({st.get('errors', 0)} errors, {st.get('warnings', 0)} warnings)"


def results_messages(results: dict) -> list[str]:
    """The messages of a `<name>-results.gz` (errors/warnings by velero, cluster, namespace)."""
    out = []
    for level in ("errors", "warnings"):
        part = results.get(level) or {}
        for scope in ("velero", "cluster"):
            out += [f"{level[:-1]} ({scope}): {m}" for m in part.get(scope) or []]
        for ns, msgs in sorted((part.get("namespaces") or {}).items()):
            out += [f"{level[:-1]} (namespace {ns}): {m}" for m in msgs]
    return out


def rollout_state(dep: dict) -> tuple[bool, str]:
    """What `kubectl rollout status` waits for: the new generation observed, every replica
    updated and available, no old ones left."""
    gen = dep["metadata"].get("generation")
    want = (dep.get("spec") or {}).get("replicas", 1)
    st = dep.get("status") or {}
    if st.get("observedGeneration", 0) < gen:
        return False, f"generation {gen} not observed yet"
    updated, avail, total = st.get("updatedReplicas", 0), st.get("availableReplicas", 0), st.get("replicas", 0)
    if updated < want:
        return False, f"{updated} of {want} replicas updated"
    if total > updated:
        return False, f"{total - updated} old replicas pending termination"
    if avail < updated:
        return False, f"{avail} of {updated} updated replicas available"
    return True, f"{avail} of {want} replicas updated and available"


def bsl_state(obj: dict, applied_at: datetime | None = None, previous: str | None = None) -> tuple[bool, bool, str]:
    """(settled, ok, why). With applied_at, only a validation after it counts: the CRD has no
    status subresource, and until Velero validates again (on a spec change, then every
    validationFrequency: velero pkg/controller/backup_storage_location_controller.go) the
    object keeps the phase of its old spec. lastValidationTime has whole seconds."""
    st = obj.get("status") or {}
    if applied_at is not None:
        lvt = st.get("lastValidationTime")
        try:
            seen = datetime.fromisoformat(lvt.replace("Z", "+00:00")) if isinstance(lvt, str) else None
        except ValueError:
            seen = None
        if seen is None or lvt == previous or seen < applied_at.replace(microsecond=0):
            return False, False, (f"Velero has not validated it since the apply (last validation: {lvt or 'never'}; "
                                  "it validates on a spec change, then every validationFrequency, default 1m)")
    phase = st.get("phase")
    if phase == "Available":
        return True, True, "Available"
    if phase == "Unavailable":
        return True, False, f"Unavailable: {st.get('message') or 'no message from Velero'}"
    return False, False, phase or "not validated yet"


def exec_exit_code(status: str | bytes) -> int:
    """The exit code in an exec's final Status (channel 3). The kubelet sends Success, or
    NonZeroExitCode with an ExitCode cause; anything else (a missing binary, an OCI runtime
    error, a container gone) is an InternalError whose cause is text, where the Python
    client's `returncode` raises ValueError (kubernetes ws_client.py; the kubelet's
    cri/streaming/remotecommand/exec.go ServeExec). ValueError here carries the message."""
    try:
        st = json.loads(status or b"{}")
    except ValueError:
        raise ValueError(f"an unreadable status: {status[:200]!r}") from None
    if not isinstance(st, dict) or not st:
        raise ValueError("the exec ended without a status (the connection was lost)")
    if st.get("status") == "Success":
        return 0
    if st.get("reason") == "NonZeroExitCode":
        for cause in (st.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode" or cause.get("type") == "ExitCode":
                return int(cause["message"])
    raise ValueError(st.get("message") or st.get("reason") or "failed without a message")
