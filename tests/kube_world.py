"""The cluster around the Kubernetes flows, for tests: the fake API server with the tests acting
as Flux, the CronJob controller, Velero and the Deployment controller, and a real S3 server (SeaweedFS) as
Velero's bucket. Controllers answer a moment later from the server's event loop, as real ones
would after a watch event."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import boto3
import yaml

from blocks.kube import KubernetesCredentials
from blocks.storage import S3Credentials
from tests.helpers import s3_env

FLUX = "kustomize.toolkit.fluxcd.io"


class World:
    def __init__(self, fake, s3_endpoint: str, bucket: str, tmp: Path):
        self.fake, self.endpoint, self.bucket = fake, s3_endpoint, bucket
        env = s3_env(s3_endpoint)
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                               aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        self.kubeconfig = tmp / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(fake.kubeconfig()))
        self.kubeconfig.chmod(0o600)
        KubernetesCredentials(kubeconfig=yaml.safe_dump(fake.kubeconfig())).save("kube-test", overwrite=True)
        S3Credentials(endpoint_url=s3_endpoint, access_key_id=env["AWS_ACCESS_KEY_ID"],
                      secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).save("s3-velero", overwrite=True)
        for ns in ("nova-gitops", "nova-cluster-backup"):
            fake.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self.backup_outcome: dict = {"phase": "Completed"}  # what "Velero" makes of the next Backup
        self.restore_outcome: dict = {"phase": "Completed"}
        self._bsl_specs: dict = {}  # the spec each BSL was last validated for
        self.unreachable_buckets: set[str] = set()  # buckets this "Velero" cannot reach

    # --- Flux --------------------------------------------------------------------------------

    def act_as_flux(self, good_paths: tuple[str, ...] = ("./releases/cluster-backup/cronjob/3-masters",
                                                          "./releases/cluster-backup/cronjob/1-master")):
        def reconcile(verb, obj):
            meta = obj["metadata"]
            ready = [c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == "Ready"]
            if verb == "DELETED" or (ready and ready[0].get("observedGeneration") == meta["generation"]):
                return  # this generation has its answer
            self.fake.later(0.1, lambda: self._flux(obj, good_paths))

        self.fake.react(FLUX, "kustomizations", reconcile)

    def _flux(self, obj, good_paths):
        meta, spec = obj["metadata"], obj["spec"]
        ns, name = meta["namespace"], meta["name"]
        if spec["path"] not in good_paths:
            # as kustomize-controller: the condition names this generation, status.observedGeneration
            # stays where the last success left it
            self.fake.set_condition(FLUX, "kustomizations", ns, name, "Ready", "False", "BuildFailed",
                                    f"kustomization path not found: {spec['path']}", meta["generation"],
                                    status_observed=False)
            return
        schedule = spec["postBuild"]["substitute"]["BACKUP_SCHEDULE"]
        patch = yaml.safe_load(spec["patches"][0]["patch"])
        volumes = patch["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
        self.fake.put({"apiVersion": "batch/v1", "kind": "CronJob",
                       "metadata": {"name": "nova-backup-scheduled", "namespace": "nova-cluster-backup"},
                       "spec": {"schedule": schedule, "jobTemplate": {"spec": {"template": {
                           "metadata": {"labels": {"app": "nova-backup"}},
                           "spec": {"restartPolicy": "Never", "volumes": volumes,
                                    "containers": [{"name": "backup", "image": "nova/backup"}]}}}}}})
        self.fake.set_condition(FLUX, "kustomizations", ns, name, "Ready", "True", "ReconciliationSucceeded",
                                "Applied revision: main@sha1:abc", meta["generation"])

    def run_cronjob(self, phases: list[str]) -> list[dict]:
        """A Job of the CronJob with one pod per master, ended in the given phases."""
        cron = self.fake.get("batch", "cronjobs", "nova-cluster-backup", "nova-backup-scheduled")
        n = len(self.fake.list("batch", "jobs", "nova-cluster-backup")) + 1
        job = self.fake.put({"apiVersion": "batch/v1", "kind": "Job",
                             "metadata": {"name": f"nova-backup-scheduled-{n}", "namespace": "nova-cluster-backup",
                                          "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob",
                                                               "name": "nova-backup-scheduled",
                                                               "uid": cron["metadata"]["uid"], "controller": True}]},
                             "spec": cron["spec"]["jobTemplate"]["spec"]})
        pods = self.fake.make_pods(job, [f"master-{i + 1}" for i in range(len(phases))], phase="Running")
        for pod, phase in zip(pods, phases):
            self.fake.set_status("", "pods", "nova-cluster-backup", pod["metadata"]["name"], phase=phase)
        return pods

    # --- the Deployment controller -------------------------------------------------------------

    def act_as_deployment_controller(self):
        def roll(verb, obj):
            st = obj.get("status") or {}
            if verb != "DELETED" and st.get("observedGeneration") != obj["metadata"]["generation"]:
                n = obj["spec"].get("replicas", 1)
                self.fake.later(0.1, lambda: self.fake.set_status(
                    "apps", "deployments", obj["metadata"]["namespace"], obj["metadata"]["name"],
                    observedGeneration=obj["metadata"]["generation"], replicas=n, updatedReplicas=n,
                    readyReplicas=n, availableReplicas=n))

        self.fake.react("apps", "deployments", roll)

    def velero_deployment(self):
        self.fake.put({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": "velero", "namespace": "nova-cluster-backup"},
                       "spec": {"replicas": 1, "selector": {"matchLabels": {"deploy": "velero"}},
                                "template": {"metadata": {"labels": {"deploy": "velero"}},
                                             "spec": {"containers": [{"name": "velero", "image": "velero"}]}}}})

    # --- Velero --------------------------------------------------------------------------------

    def act_as_velero(self):
        self.fake.react("velero.io", "backupstoragelocations", self._bsl)
        self.fake.react("velero.io", "backups", self._backup)
        self.fake.react("velero.io", "schedules", self._schedule)

    def _bsl(self, verb, obj):
        """As Velero's BSL controller: validate on create and on every spec change (its
        SpecChangePredicate), writing phase, message and lastValidationTime (whole seconds);
        a status-only write starts nothing. Its periodic re-validation is not modelled."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        spec = json.dumps(obj["spec"], sort_keys=True)
        if verb == "DELETED" or self._bsl_specs.get((ns, name)) == spec:
            return
        self._bsl_specs[(ns, name)] = spec
        bucket = obj["spec"]["objectStorage"]["bucket"]

        def validate():
            try:
                if bucket in self.unreachable_buckets:
                    raise ConnectionError(bucket)
                self.s3.head_bucket(Bucket=bucket)
                status = {"phase": "Available"}
            except Exception:
                status = {"phase": "Unavailable", "message": f"BackupStorageLocation \"{name}\" is unavailable: "
                                                             f"rpc error: bucket {bucket} not found"}
            cur = self.fake.get("velero.io", "backupstoragelocations", ns, name)
            st = {k: v for k, v in (cur.get("status") or {}).items() if k != "message"}  # omitempty: cleared
            cur["status"] = {**st, **status, "lastValidationTime": datetime.now(timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ")}
            self.fake.put(cur, manager="velero")

        self.fake.later(0.1, validate)

    def _schedule(self, verb, obj):
        if verb == "DELETED" or (obj.get("status") or {}).get("phase"):
            return
        self.fake.later(0.1, lambda: self.fake.set_status("velero.io", "schedules", obj["metadata"]["namespace"],
                                                          obj["metadata"]["name"], phase="Enabled"))

    def _backup(self, verb, obj):
        if verb != "ADDED":
            return
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        outcome = dict(self.backup_outcome)
        self.fake.later(0.1, lambda: self.fake.set_status("velero.io", "backups", ns, name, phase="InProgress"))
        self.fake.later(0.5, lambda: self._finish_backup(obj, outcome))

    def _finish_backup(self, obj, outcome):
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        results = outcome.pop("results", {"errors": {}, "warnings": {}})
        if outcome["phase"] != "FailedValidation":
            done = {**obj, "status": {**outcome}}
            self.s3.put_object(Bucket=self.bucket, Key=f"backups/{name}/velero-backup.json",
                               Body=json.dumps(done).encode())
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                data = b'{"kind": "Namespace"}'
                info = tarfile.TarInfo("resources/namespaces/cluster/nova-cluster-backup.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            self.s3.put_object(Bucket=self.bucket, Key=f"backups/{name}/{name}.tar.gz", Body=buf.getvalue())
            self.s3.put_object(Bucket=self.bucket, Key=f"backups/{name}/{name}-results.gz",
                               Body=gzip.compress(json.dumps(results).encode()))
            if obj["spec"].get("defaultVolumesToFsBackup"):
                self.s3.put_object(Bucket=self.bucket, Key="kopia/nova-cluster-backup/kopia.repository.f", Body=b"{}")
        self.fake.set_status("velero.io", "backups", ns, name, **outcome)


def velero_kopia_snapshot(velero: str, sid: str, pod: str, pod_uid: str, backup: str, start: str,
                          incomplete: str | None = None) -> dict:
    """One entry as `kopia snapshot list --all --json` prints a pod-volume snapshot Velero's
    uploader made (velero pkg/uploader/kopia/snapshot.go SnapshotSource: tags, description,
    pin; pkg/podvolume/backupper.go: the tags; kopia snapshot/manifest.go: the fields).
    `velero`: "1.16" (source /host_pods/<uid>/volumes/..., requester pod-volume-backup-restore)
    or "1.18" (from 1.17: source snapshot-pod-volume/kopia/<ns>/<pod>/<volume>)."""
    ns, volume = "nova-cluster-backup", "backup-volume"
    new = velero != "1.16"
    path = (f"snapshot-pod-volume/kopia/{ns}/{pod}/{volume}" if new
            else f"/host_pods/{pod_uid}/volumes/kubernetes.io~empty-dir/{volume}")
    out = {"id": sid, "source": {"host": "default", "userName": "default", "path": path},
           "description": "Kopia Uploader", "startTime": start, "endTime": start.replace(":05.", ":09."),
           "tags": {"backup": backup, "backup-uid": f"b-{backup[-14:]}", "pod": pod, "pod-uid": pod_uid, "ns": ns,
                    "volume": volume, "snapshot-requester": "snapshot-pod-volume" if new else "pod-volume-backup-restore",
                    "snapshot-uploader": "kopia"},
           "pins": ["velero-pin"],
           "stats": {"totalSize": 1000, "excludedTotalSize": 0, "fileCount": 2, "cachedFiles": 0, "nonCachedFiles": 2,
                     "dirCount": 1, "excludedFileCount": 0, "excludedDirCount": 0, "ignoredErrorCount": 0,
                     "errorCount": 0},
           "rootEntry": {"name": volume, "type": "d", "mode": "0777", "mtime": start, "obj": "k" + sid[:31],
                         "summ": {"size": 1000, "files": 2, "symlinks": 0, "dirs": 1, "maxTime": start,
                                  "numFailed": 0}},
           "retentionReason": ["latest-1", "daily-1"]}
    if incomplete:
        out["incomplete"] = incomplete
    return out
