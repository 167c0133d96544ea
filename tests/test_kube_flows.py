"""install-cronjob-backup, setup-data-protection and velero-backup against the wire-level fake
API server (the tests act as Flux, the CronJob's pods and Velero) and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import base64
import itertools
import os
import re
from datetime import datetime, timezone

import pytest
import yaml

from core.names import etcd_snapshot_name, node_archive_name, timestamp
from flows.cronjob import install_cronjob_backup
from flows.velero import setup_data_protection, velero_backup
from tests.helpers import make_bucket, needs_schemas
from tests.kube_world import FLUX, World
from tests.test_restore import error_of

pytestmark = needs_schemas()


_buckets = itertools.count()


@pytest.fixture
def world(fake_kube, s3_endpoint, tmp_path, request):
    bucket = f"velero-{next(_buckets)}-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    make_bucket(s3_endpoint, bucket)
    return World(fake_kube, s3_endpoint, bucket, tmp_path)


NFS = dict(nfs_server="10.0.0.5", nfs_path="/exports/nova-backup")


# --- install-cronjob-backup ---------------------------------------------------------------------

def test_install_applies_the_kustomization_and_waits_for_ready(world):
    world.act_as_flux()
    out = install_cronjob_backup(kube=str(world.kubeconfig), auto_approve=True, schedule="30 2 * * *",
                                 RETENTION_PERIOD_DAYS=3, INCLUDE_PKI_DATA=False, poll_seconds=0.2, **NFS)
    k = world.fake.get(FLUX, "kustomizations", "nova-gitops", "nova-release-cluster-backup-cronjob")
    sub = k["spec"]["postBuild"]["substitute"]
    assert sub["RETENTION_PERIOD_DAYS"] == "3" and sub["INCLUDE_PKI_DATA"] == "false"
    assert sub["INCLUDE_STARVAULT_UNSEAL_TOKENS"] == "true" and sub["BACKUP_SCHEDULE"] == "30 2 * * *"
    assert k["spec"]["path"].endswith("/3-masters") and k["spec"]["sourceRef"]["name"] == "nova-platform"
    assert [m["manager"] for m in k["metadata"]["managedFields"]] == ["controller", "nova-dr"]
    # the applied object went through server-side apply, as field manager nova-dr
    assert any(m == "PATCH" and "fieldManager=nova-dr" in p and ct == "application/apply-patch+yaml"
               for m, p, ct in world.fake.requests)
    cron = world.fake.get("batch", "cronjobs", "nova-cluster-backup", "nova-backup-scheduled")
    vol = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0]
    assert vol == {"name": "backup-volume", "nfs": {"server": "10.0.0.5", "path": "/exports/nova-backup",
                                                    "readOnly": False}}
    assert out["cronjob"]["schedule"] == "30 2 * * *" and out["generation"] == 1

    # a second run with a change moves the generation and waits for Flux to observe that one
    out = install_cronjob_backup(kube="block:kube-test", auto_approve=True, masters=1, poll_seconds=0.2, **NFS)
    assert out["generation"] == 2
    assert world.fake.get(FLUX, "kustomizations", "nova-gitops",
                          "nova-release-cluster-backup-cronjob")["spec"]["path"].endswith("/1-master")


def test_install_reports_why_flux_is_not_ready(world):
    world.act_as_flux(good_paths=())
    state = install_cronjob_backup(kube=str(world.kubeconfig), auto_approve=True, path="./nowhere",
                                   timeout_minutes=0.05, poll_seconds=0.2, return_state=True, **NFS)
    err = error_of(state)
    assert "BuildFailed: kustomization path not found: ./nowhere" in err and "./nowhere" in err


@pytest.mark.parametrize("kw, says", [
    (dict(schedule="61 4 * * *", **NFS), "'61' is not a valid minute"),
    (dict(schedule="0 4 * *", **NFS), "write 5 cron fields"),
    (dict(), "name the backup volume"),
    (dict(masters=2, **NFS), "write 3 or 1"),
    (dict(RETENTION_PERIOD_DAYS=0, **NFS), "RETENTION_PERIOD_DAYS"),
    (dict(kube="block:no-such-block", **NFS), "no such Kubernetes credentials block"),
])
def test_install_bad_input_changes_nothing(world, kw, says):
    world.act_as_flux()
    params = dict(kube=str(world.kubeconfig), auto_approve=True) | kw
    err = error_of(install_cronjob_backup(**params, return_state=True))
    assert says in err
    assert world.fake.list(FLUX, "kustomizations") == []
    assert not [r for r in world.fake.requests if r[0] != "GET"]


def test_check_reports_each_backup_pod(world, tmp_path):
    world.act_as_flux()
    install_cronjob_backup(kube=str(world.kubeconfig), auto_approve=True, poll_seconds=0.2, **NFS)
    world.run_cronjob(["Succeeded", "Succeeded", "Succeeded"])
    out = install_cronjob_backup(kube=str(world.kubeconfig), mode="check")
    assert [p["status"] for p in out["pods"]] == ["Completed"] * 3
    assert sorted(p["node"] for p in out["pods"]) == ["master-1", "master-2", "master-3"]
    world.run_cronjob(["Succeeded", "Failed", "Succeeded"])  # the newest run is the one checked
    err = error_of(install_cronjob_backup(kube=str(world.kubeconfig), mode="check", return_state=True))
    assert "on master-2: Error" in err and err.count("Error") == 1
    # with a store: the newest set there must hold an archive per backup pod
    world.run_cronjob(["Succeeded"] * 3)
    store = tmp_path / "nfs"
    store.mkdir()
    ts = timestamp(datetime(2026, 11, 27, 4, 0, 5, tzinfo=timezone.utc))
    for f in [etcd_snapshot_name("3.1.0", "1.31.4", ts), node_archive_name("master-1", ts),
              node_archive_name("master-2", ts)]:
        (store / f).write_bytes(b"x")
    err = error_of(install_cronjob_backup(kube=str(world.kubeconfig), mode="check", store=str(store),
                                          return_state=True))
    assert "has 2 archives for 3 pods" in err


# --- setup-data-protection ------------------------------------------------------------------------

@pytest.fixture
def vault():
    from tests.fake_starvault import KV

    kv = KV().start()
    yield kv
    kv.stop()


def test_setup_creates_credentials_rotates_and_waits_for_available(world, vault):
    world.act_as_velero()
    world.act_as_deployment_controller()
    world.velero_deployment()
    before = world.fake.get("apps", "deployments", "nova-cluster-backup", "velero")["metadata"]["generation"]
    state = setup_data_protection(kube=str(world.kubeconfig), s3_block="s3-velero", bucket=world.bucket,
                                  rotate_password=True, starvault_block=vault.block, auto_approve=True,
                                  poll_seconds=0.2, return_state=True)
    out = state.result()
    secret = world.fake.get("", "secrets", "nova-cluster-backup", "cloud-credentials")
    cloud = base64.b64decode(secret["data"]["cloud"]).decode()
    assert cloud.startswith("[default]\naws_access_key_id=nova-test\naws_secret_access_key=nova-test-secret")
    bsl = world.fake.get("velero.io", "backupstoragelocations", "nova-cluster-backup", "default")
    assert bsl["spec"]["config"] == {"region": "us-east-1", "s3Url": world.endpoint, "s3ForcePathStyle": "true"}
    assert bsl["spec"]["provider"] == "aws" and bsl["status"]["phase"] == "Available"
    dep = world.fake.get("apps", "deployments", "nova-cluster-backup", "velero")
    assert dep["metadata"]["generation"] == before + 1
    assert "kubectl.kubernetes.io/restartedAt" in dep["spec"]["template"]["metadata"]["annotations"]
    assert len(vault.versions) == 1 and len(vault.versions[0]["repository_password"]) >= 32
    assert vault.versions[0]["other"] == "kept"  # the secret's other keys survive the new version
    assert out["velero rollout"].startswith("1 of 1 replicas")
    # the new password and the S3 secret key are in no log line, artifact, parameter or result
    from tests.helpers import run_record

    record = run_record(str(state.state_details.flow_run_id)) + repr(out)
    assert vault.versions[0]["repository_password"] not in record and "nova-test-secret" not in record


def test_setup_bad_input(world, vault):
    world.act_as_velero()
    world.velero_deployment()
    kw = dict(kube=str(world.kubeconfig), auto_approve=True, poll_seconds=0.2)
    err = error_of(setup_data_protection(**kw, s3_block="s3-velero", bucket="no-such-bucket", return_state=True))
    assert "bucket no-such-bucket does not exist" in err
    err = error_of(setup_data_protection(**kw, bucket=world.bucket, return_state=True))
    assert "s3_block: name the" in err
    assert world.fake.list("", "secrets") == []
    # rotation after backups exist orphans the repositories: refused unless forced
    world.s3.put_object(Bucket=world.bucket, Key="kopia/nova-cluster-backup/kopia.repository.f", Body=b"{}")
    err = error_of(setup_data_protection(**kw, s3_block="s3-velero", bucket=world.bucket, rotate_password=True,
                                         starvault_block=vault.block, return_state=True))
    assert "refusing to rotate" in err and "Kopia repository" in err
    assert vault.versions == [] and world.fake.list("", "secrets") == []
    # the secret's newest version soft-deleted: said so (once a cas=0 write and a wrong story)
    world.s3.delete_object(Bucket=world.bucket, Key="kopia/nova-cluster-backup/kopia.repository.f")
    vault.deleted = True
    err = error_of(setup_data_protection(**kw, s3_block="s3-velero", bucket=world.bucket, rotate_password=True,
                                         starvault_block=vault.block, return_state=True))
    assert "the newest version (1) of nova-secrets/credentials/nova-velero is deleted" in err
    assert "vault kv undelete -mount=nova-secrets -versions=1 credentials/nova-velero" in err
    assert vault.versions == [] and world.fake.list("", "secrets") == []  # refused before anything


def test_setup_reports_an_unavailable_location(world):
    world.act_as_velero()
    world.s3.delete_bucket(Bucket=world.bucket)  # gone after the preflight would have seen it: Velero says so
    make_bucket(world.endpoint, world.bucket)
    real_validate = world._bsl

    def deny(verb, obj):  # this "Velero" cannot reach the bucket
        world.s3.delete_bucket(Bucket=world.bucket)
        real_validate(verb, obj)

    world.fake._reactors = [r for r in world.fake._reactors if r[1] != "backupstoragelocations"]
    world.fake.react("velero.io", "backupstoragelocations", deny)
    err = error_of(setup_data_protection(kube=str(world.kubeconfig), s3_block="s3-velero", bucket=world.bucket,
                                         auto_approve=True, timeout_minutes=0.05, poll_seconds=0.2,
                                         return_state=True))
    assert "Unavailable: BackupStorageLocation \"default\" is unavailable" in err


def test_a_location_reapplied_with_a_bucket_velero_cannot_reach_is_not_read_as_available(world):
    """Re-applied, the BSL keeps its old Available until Velero validates the new spec."""
    world.act_as_velero()
    kw = dict(kube=str(world.kubeconfig), s3_block="s3-velero", auto_approve=True, poll_seconds=0.2)
    assert setup_data_protection(bucket=world.bucket, **kw)["BackupStorageLocation default"] == "Available"
    other = f"{world.bucket}-moved"
    make_bucket(world.endpoint, other)  # we can reach it; Velero cannot
    world.unreachable_buckets.add(other)
    err = error_of(setup_data_protection(bucket=other, timeout_minutes=0.05, return_state=True, **kw))
    assert "Unavailable: BackupStorageLocation \"default\" is unavailable: rpc error: bucket " + other in err


# --- velero-backup ------------------------------------------------------------------------------

def _bsl(world):
    world.fake.put({"apiVersion": "velero.io/v1", "kind": "BackupStorageLocation",
                    "metadata": {"name": "default", "namespace": "nova-cluster-backup"},
                    "spec": {"provider": "aws", "objectStorage": {"bucket": world.bucket},
                             "config": {"s3Url": world.endpoint}}})


def test_velero_backup_completes_and_the_bucket_agrees(world):
    world.act_as_velero()
    _bsl(world)
    world.backup_outcome = {"phase": "Completed", "warnings": 1,
                            "results": {"warnings": {"namespaces": {"nova-cluster-backup": ["pod x: volume skipped"]}}}}
    out = velero_backup(kube=str(world.kubeconfig), s3_block="s3-velero", name="b1", poll_seconds=0.2,
                        ordered_resources={"pods": "nova-cluster-backup/a"})
    b = world.fake.get("velero.io", "backups", "nova-cluster-backup", "b1")
    assert b["spec"]["defaultVolumesToFsBackup"] is True and b["spec"]["orderedResources"] == {
        "pods": "nova-cluster-backup/a"}
    assert out["messages"] == ["warning (namespace nova-cluster-backup): pod x: volume skipped"]
    err = error_of(velero_backup(kube=str(world.kubeconfig), s3_block="s3-velero", name="b1", return_state=True))
    assert "already exists" in err


@pytest.mark.parametrize("outcome, says", [
    ({"phase": "PartiallyFailed", "errors": 2, "results": {"errors": {"velero": ["kopia: repo locked"]}}},
     "phase PartiallyFailed (2 errors, 0 warnings): error (velero): kopia: repo locked"),
    ({"phase": "FailedValidation", "validationErrors": ["an existing backup storage location wasn't specified"]},
     "validation errors: an existing backup storage location wasn't specified"),
    ({"phase": "Failed", "failureReason": "get a backup with status InProgress"},
     "failure reason: get a backup with status InProgress"),
])
def test_velero_backup_failures_fail_the_flow(world, outcome, says):
    world.act_as_velero()
    _bsl(world)
    world.backup_outcome = outcome
    err = error_of(velero_backup(kube=str(world.kubeconfig), s3_block="s3-velero", name="bad", poll_seconds=0.2,
                                 return_state=True))
    assert says in err


def test_velero_schedule_and_bad_input(world):
    world.act_as_velero()
    kw = dict(kube=str(world.kubeconfig), s3_block="s3-velero", poll_seconds=0.2)
    err = error_of(velero_backup(**kw, return_state=True))
    assert "BackupStorageLocation nova-cluster-backup/default does not exist" in err
    _bsl(world)
    err = error_of(velero_backup(**kw, schedule="every night", return_state=True))
    assert "write 5 cron fields" in err
    assert world.fake.list("velero.io", "schedules") == []
    out = velero_backup(**kw, schedule="0 3 * * *")
    s = world.fake.get("velero.io", "schedules", "nova-cluster-backup", "control-plane-backup")
    assert out["phase"] == "Enabled" and s["spec"]["schedule"] == "0 3 * * *"
    assert s["spec"]["template"]["defaultVolumesToFsBackup"] is True


@pytest.mark.real_cluster
@pytest.mark.skipif(not os.environ.get("NOVA_DR_TEST_KUBECONFIG"), reason="no real cluster: set "
                    "NOVA_DR_TEST_KUBECONFIG to a kubeconfig of a disposable cluster with Flux and Velero")
def test_against_a_real_cluster():
    """The same flows against a real API server; read-only (check mode) unless told otherwise."""
    kube = os.environ["NOVA_DR_TEST_KUBECONFIG"]
    out = install_cronjob_backup(kube=kube, mode="check")
    assert out["pods"]
    assert yaml.safe_load(open(kube))["clusters"]
