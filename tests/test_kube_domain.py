"""The pure parts of the Kubernetes-side flows: cron, states of what we read, Kopia's list."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from core import files as cf
from core import kube as k
from core.errors import NovaDRError


@pytest.mark.parametrize("expr", ["0 4 * * *", "*/15 0-6 1,15 jan-jun mon-fri", "@daily", "30 2 * * 7"])
def test_cron_accepts(expr):
    assert k.check_cron(expr) == " ".join(expr.split())


@pytest.mark.parametrize("expr, says", [("0 24 * * *", "valid hour"), ("0 4 * *", "5 cron fields"),
                                        ("*/0 * * * *", "bad step"), ("0 4 31-1 * *", "runs backwards"),
                                        ("0 4 * foo *", "valid month"), ("every night", "5 cron fields")])
def test_cron_refuses(expr, says):
    with pytest.raises(NovaDRError, match=says):
        k.check_cron(expr)


def _k(gen, observed, status=None, reason="", message="", cond_gen=None):
    conds = [] if status is None else [{"type": "Ready", "status": status, "reason": reason, "message": message,
                                        "observedGeneration": observed if cond_gen is None else cond_gen}]
    return {"metadata": {"generation": gen}, "status": {"observedGeneration": observed, "conditions": conds}}


def test_kustomization_ready_counts_only_for_its_generation():
    assert k.kustomization_state(_k(2, 1, "True", "ReconciliationSucceeded")) == (
        False, False, "Flux has not reconciled generation 2 yet")
    assert k.kustomization_state(_k(2, 2, "True", "ReconciliationSucceeded", "Applied"))[:2] == (True, True)
    assert k.kustomization_state(_k(2, 2, "Unknown", "Progressing", "running"))[:2] == (False, False)
    # A failed build, as kustomize-controller writes it: the condition is about generation 2,
    # status.observedGeneration still at 1 (the last success). Settled, with Flux's reason.
    assert k.kustomization_state(_k(2, 1, "False", "BuildFailed", "no path", cond_gen=2)) == (
        True, False, "BuildFailed: no path")
    # ...but a source Flux has not fetched yet is retried by Flux: not an answer
    assert k.kustomization_state(_k(2, 1, "False", "ArtifactFailed", "Source not found", cond_gen=2)) == (
        False, False, "ArtifactFailed: Source not found")
    # a condition without its own generation (old Flux): status.observedGeneration decides
    old = _k(2, 2, "True", "ReconciliationSucceeded")
    del old["status"]["conditions"][0]["observedGeneration"]
    assert k.kustomization_state(old)[:2] == (True, True)


def test_velero_phases():
    fail = k.BACKUP_FAILED
    assert k.velero_state({"status": {"phase": "InProgress"}}, fail) == (False, False, "InProgress")
    assert k.velero_state({}, fail) == (False, False, "New")
    assert k.velero_state({"status": {"phase": "Completed", "warnings": 2}}, fail)[:2] == (True, True)
    done, ok, why = k.velero_state({"status": {"phase": "FailedValidation", "validationErrors": ["a", "b"]}}, fail)
    assert (done, ok) == (True, False) and why.endswith("validation errors: a; b")
    assert k.velero_state({"status": {"phase": "Deleting"}}, fail)[:2] == (True, False)
    assert k.velero_state({"status": {"phase": "WaitingForPluginOperations"}}, fail)[0] is False


def test_rollout_state_is_kubectls():
    dep = {"metadata": {"generation": 3}, "spec": {"replicas": 2}}
    assert k.rollout_state({**dep, "status": {"observedGeneration": 2}})[0] is False
    st = {"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}
    assert k.rollout_state({**dep, "status": st}) == (False, "1 old replicas pending termination")
    st = {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    assert k.rollout_state({**dep, "status": st})[0] is True


def test_results_messages_in_order():
    res = {"errors": {"velero": ["e1"], "namespaces": {"b": ["e3"], "a": ["e2"]}}, "warnings": {"cluster": ["w1"]}}
    assert k.results_messages(res) == ["error (velero): e1", "error (namespace a): e2", "error (namespace b): e3",
                                       "warning (cluster): w1"]


def test_bsl_refuses_a_prefix_under_kopia_and_bad_buckets():
    with pytest.raises(NovaDRError, match="kopia"):
        k.render_bsl("default", "bucket", "kopia/x", "us-east-1", "http://s3")
    with pytest.raises(NovaDRError, match="not a valid S3 bucket"):
        k.render_bsl("default", "Bad_Bucket", "", "us-east-1", "http://s3")
    assert "prefix" not in k.render_bsl("default", "bucket", "", "r", "u")["spec"]["objectStorage"]


LIST = json.dumps([
    {"id": "a1", "source": {"host": "default", "userName": "default",
                            "path": "/host_pods/11111111-2222-3333-4444-555555555555/volumes/kubernetes.io~empty-dir/backup-volume"},
     "startTime": "2026-11-26T04:00:05.123456789Z", "endTime": "2026-11-26T04:00:07Z", "stats": {"fileCount": 2},
     "rootEntry": {"name": "backup-volume", "type": "d"}},
    {"id": "a2", "source": {"host": "default", "userName": "default",
                            "path": "/host_pods/11111111-2222-3333-4444-555555555555/volumes/kubernetes.io~empty-dir/backup-volume"},
     "startTime": "2026-11-27T04:00:05.5Z", "endTime": "2026-11-27T04:00:07Z", "stats": {"fileCount": 2},
     "rootEntry": {"name": "backup-volume", "type": "d"}},
])


def test_kopia_list_and_point_in_time():
    snaps = cf.parse_kopia_snapshots(LIST)
    assert snaps[0].start == datetime(2026, 11, 26, 4, 0, 5, 123456, tzinfo=timezone.utc)
    chosen, warn = cf.choose_snapshots(snaps, None)
    assert [s.id for s in chosen.values()] == ["a2"] and warn == []
    chosen, _ = cf.choose_snapshots(snaps, cf.parse_point("2026-11-27T04:00:05"))
    assert [s.id for s in chosen.values()] == ["a1"]  # started half a second after the point
    with pytest.raises(NovaDRError, match="oldest in the repository is 2026-11-26 04:00:05Z"):
        cf.choose_snapshots(snaps, cf.parse_point("2026-01-01T00:00:00Z"))
    with pytest.raises(NovaDRError, match="output not understood"):
        cf.parse_kopia_snapshots('[{"id": "x"}]')


def test_sources_are_named_by_pod_then_by_archive():
    snap = cf.parse_kopia_snapshots(LIST)[0]  # kopia by hand: no tags, a 1.16-style path
    assert snap.pod_uid == "11111111-2222-3333-4444-555555555555" and snap.pod is None
    assert cf.name_source(snap, {"11111111-2222-3333-4444-555555555555": "master-2"}, []) == "master-2"
    assert cf.name_source(snap, {}, ["m1_kubereresources_2026-11-27_040005.tar.gz"]) == "m1"
    with pytest.raises(NovaDRError, match="maps to no master"):
        cf.name_source(snap, {}, ["x.bin"])
    assert cf.flat_collisions({"p1": ["a", "b"], "p2": ["b"]}) == ["b (from p1 and p2)"]


UID1, UID2 = "0000000a-aaaa-bbbb-cccc-00000000000a", "0000000b-aaaa-bbbb-cccc-00000000000b"


@pytest.mark.parametrize("velero", ["1.16", "1.18"])
def test_velero_snapshots_one_backup_is_one_point_named_by_its_tags(velero):
    from tests.kube_world import velero_kopia_snapshot as snap

    b1, b2, b3 = (f"control-plane-backup-2026112{d}040000" for d in (5, 6, 7))
    listing = [
        snap(velero, "p1", "daemon-aaaaa", UID1, b1, "2026-11-25T04:00:05.1Z"),
        snap(velero, "p2", "daemon-bbbbb", UID2, b1, "2026-11-25T04:00:06.1Z"),
        # the pods were recreated: new names, new UIDs, new sources
        snap(velero, "q1", "daemon-ccccc", UID2[:-1] + "c", b2, "2026-11-26T04:00:05.1Z"),
        snap(velero, "q2", "daemon-ddddd", UID2[:-1] + "d", b2, "2026-11-26T04:00:07.1Z"),
        # the newest backup's uploads were cut off: kopia's JSON lists them all the same
        snap(velero, "r1", "daemon-ccccc", UID2[:-1] + "c", b3, "2026-11-27T04:00:05.1Z", incomplete="checkpoint"),
        snap(velero, "r2", "daemon-ddddd", UID2[:-1] + "d", b3, "2026-11-27T04:00:05.1Z", incomplete="canceled"),
    ]
    snaps = cf.parse_kopia_snapshots(json.dumps(listing))
    chosen, notes = cf.choose_snapshots(snaps, None)
    assert sorted(s.id for s in chosen.values()) == ["q1", "q2"]  # b2 whole; never b1's old pods, never b3
    assert "skipped 2 incomplete snapshot(s)" in notes[0] and f"Velero backup {b2} (2 pod volumes" in notes[1]
    # a point between b2's two snapshots: b2 had not finished starting, so b1
    chosen, _ = cf.choose_snapshots(snaps, cf.parse_point("2026-11-26T04:00:06Z"))
    assert sorted(s.id for s in chosen.values()) == ["p1", "p2"]
    first = snaps[0]
    assert (first.pod, first.pod_uid) == ("daemon-aaaaa", UID1)
    assert cf.name_source(first, {UID1: "master-1"}, []) == "master-1"  # by the pod-uid tag
    assert cf.name_source(first, {"daemon-aaaaa": "master-3"}, []) == "master-3"  # by the pod tag
    untagged = json.loads(json.dumps(listing[0]))
    untagged["tags"] = {}  # the path alone still names the pod, in either layout
    s = cf.parse_kopia_snapshots(json.dumps([untagged]))[0]
    assert (s.pod, s.pod_uid) == (("daemon-aaaaa", None) if velero == "1.18" else (None, UID1))
    only_partial = cf.parse_kopia_snapshots(json.dumps(listing[4:]))
    with pytest.raises(NovaDRError, match="no complete snapshots"):
        cf.choose_snapshots(only_partial, None)
