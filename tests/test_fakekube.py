"""The fake API server is test infrastructure the Kubernetes flows trust: each behaviour is
driven here through the unmodified official client, over real HTTP and websockets."""

from __future__ import annotations

import json
import os

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

from tests.fakekube import FakeKube
from tests.fakekube.common import V4, ExecResult
from tests.helpers import kube_client, needs_schemas

VELERO = ("velero.io", "v1")
FLUX = ("kustomize.toolkit.fluxcd.io", "v1")


def status_of(err: ApiException) -> dict:
    body = json.loads(err.body)
    assert body["kind"] == "Status" and body["code"] == err.status
    return body


@pytest.fixture
def api(fake_kube):
    c = kube_client(fake_kube)
    core = client.CoreV1Api(c)
    core.create_namespace({"metadata": {"name": "ns1"}})
    return c


def test_core_crud_versions_and_stale_update(api, fake_kube):
    core = client.CoreV1Api(api)
    created = core.create_namespaced_secret("ns1", {"metadata": {"name": "s1"}, "stringData": {"k": "v"}})
    assert created.metadata.uid and created.metadata.creation_timestamp and created.metadata.generation == 1
    rv1 = created.metadata.resource_version
    got = core.read_namespaced_secret("s1", "ns1")
    got.metadata.labels = {"a": "b"}
    updated = core.replace_namespaced_secret("s1", "ns1", got)
    assert int(updated.metadata.resource_version) > int(rv1)
    got.metadata.labels = {"a": "c"}  # still carries rv1: stale
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_secret("s1", "ns1", got)
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"
    assert core.read_namespaced_secret("s1", "ns1").metadata.labels == {"a": "b"}
    with pytest.raises(ApiException) as err:
        core.create_namespaced_secret("ns1", {"metadata": {"name": "s1"}})
    assert status_of(err.value)["reason"] == "AlreadyExists"
    core.delete_namespaced_secret("s1", "ns1")
    with pytest.raises(ApiException) as err:
        core.read_namespaced_secret("s1", "ns1")
    assert err.value.status == 404 and status_of(err.value)["details"]["name"] == "s1"
    with pytest.raises(ApiException) as err:
        core.create_namespaced_secret("nowhere", {"metadata": {"name": "s2"}})
    assert err.value.status == 404 and "namespaces \"nowhere\" not found" in status_of(err.value)["message"]


def test_wrong_token_and_unknown_path_are_refused(api, fake_kube):
    from kubernetes import config

    kc = fake_kube.kubeconfig()
    kc["users"][0]["user"]["token"] = "wrong"
    c = config.new_client_from_config_dict(kc)
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(c).list_namespace()
    assert err.value.status == 401
    with pytest.raises(ApiException) as err:
        client.CustomObjectsApi(api).list_namespaced_custom_object("velero.io", "v1", "ns1", "backupz")
    assert err.value.status == 404


def test_create_without_content_type_is_json(api, fake_kube):
    url = api.configuration.host + "/api/v1/namespaces/ns1/configmaps"
    headers = {"Authorization": f"Bearer {fake_kube.token}"}
    r = api.rest_client.request("POST", url, headers=headers, body={"metadata": {"name": "cm"}, "data": {"x": "1"}})
    assert r.status == 201
    assert client.CoreV1Api(api).read_namespaced_config_map("cm", "ns1").data == {"x": "1"}


def test_label_and_field_selectors(api, fake_kube):
    core = client.CoreV1Api(api)
    for name, labels, node in [("p1", {"app": "a", "tier": "x"}, "n1"), ("p2", {"app": "b", "env": "prod"}, "n2"),
                               ("p3", {"app": "c"}, "n1")]:
        core.create_namespaced_pod("ns1", {"metadata": {"name": name, "labels": labels},
                                           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}})

    def names(**kw):
        return sorted(p.metadata.name for p in core.list_namespaced_pod("ns1", **kw).items)

    assert names(label_selector="app in (a,b)") == ["p1", "p2"]
    assert names(label_selector="app notin (a)") == ["p2", "p3"]
    assert names(label_selector="!tier") == ["p2", "p3"]
    assert names(label_selector="app=a,tier") == ["p1"]
    assert names(label_selector="env!=prod") == ["p1", "p3"]
    assert names(field_selector="spec.nodeName=n1") == ["p1", "p3"]
    assert names(field_selector="metadata.name=p2") == ["p2"]
    assert sorted(p.metadata.name for p in core.list_pod_for_all_namespaces(label_selector="app=c").items) == ["p3"]
    with pytest.raises(ApiException) as err:
        names(field_selector="spec.color=red")
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:
        names(label_selector="app in (a")
    assert err.value.status == 400


def test_generation_moves_on_spec_changes_only(api):
    apps = client.AppsV1Api(api)
    d = apps.create_namespaced_deployment("ns1", {
        "metadata": {"name": "velero"},
        "spec": {"selector": {"matchLabels": {"app": "v"}},
                 "template": {"metadata": {"labels": {"app": "v"}}, "spec": {"containers": [{"name": "v", "image": "a"}]}}}})
    assert d.metadata.generation == 1
    d = apps.patch_namespaced_deployment("velero", "ns1", {"metadata": {"labels": {"x": "y"}}})
    assert d.metadata.generation == 1
    # the client's default for a dict is a strategic merge patch: containers merge by name
    d = apps.patch_namespaced_deployment("velero", "ns1", {"spec": {"template": {"spec": {
        "containers": [{"name": "v", "image": "b"}]}}}})
    assert d.metadata.generation == 2
    assert [(c.name, c.image) for c in d.spec.template.spec.containers] == [("v", "b")]
    d = apps.patch_namespaced_deployment("velero", "ns1", {"spec": {"template": {"spec": {
        "containers": [{"name": "sidecar", "image": "s"}]}}}})
    assert [c.name for c in d.spec.template.spec.containers] == ["v", "sidecar"]
    # status goes through the status subresource only
    d = apps.patch_namespaced_deployment("velero", "ns1", {"status": {"readyReplicas": 5}})
    assert d.status is None or d.status.ready_replicas is None
    d = apps.patch_namespaced_deployment_status("velero", "ns1", {"status": {"readyReplicas": 5}})
    assert d.status.ready_replicas == 5 and d.metadata.generation == 3


@needs_schemas()
def test_custom_resources_are_validated_against_the_real_crds(api):
    co = client.CustomObjectsApi(api)
    good = {"apiVersion": "velero.io/v1", "kind": "Backup", "metadata": {"name": "b1"},
            "spec": {"includedNamespaces": ["nova-cluster-backup"], "ttl": "720h0m0s"}}
    made = co.create_namespaced_custom_object(*VELERO, "ns1", "backups", good)
    assert made["metadata"]["generation"] == 1
    for spec, field in [({"includedNamespace": ["x"]}, "spec.includedNamespace"), ({"ttl": 5}, "spec.ttl"),
                        ({"defaultVolumesToFsBackup": "yes"}, "spec.defaultVolumesToFsBackup")]:
        with pytest.raises(ApiException) as err:
            co.create_namespaced_custom_object(*VELERO, "ns1", "backups", {**good, "metadata": {"name": "b2"},
                                                                           "spec": spec})
        body = status_of(err.value)
        assert err.value.status == 422 and body["reason"] == "Invalid"
        assert field in [c["field"] for c in body["details"]["causes"]], body
    assert [b["metadata"]["name"] for b in co.list_namespaced_custom_object(*VELERO, "ns1", "backups")["items"]] == ["b1"]


@needs_schemas()
def test_patches_on_custom_resources(api, fake_kube):
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object(*VELERO, "ns1", "backups", {
        "apiVersion": "velero.io/v1", "kind": "Backup", "metadata": {"name": "b1"}, "spec": {"ttl": "1h0m0s"}})
    # a strategic merge patch is refused on a custom resource, as the real server does
    with pytest.raises(ApiException) as err:
        co.patch_namespaced_custom_object(*VELERO, "ns1", "backups", "b1", {"spec": {"ttl": "2h0m0s"}},
                                          _content_type="application/strategic-merge-patch+json")
    assert err.value.status == 415 and status_of(err.value)["reason"] == "UnsupportedMediaType"
    assert fake_kube.get("velero.io", "backups", "ns1", "b1")["spec"]["ttl"] == "1h0m0s"
    out = co.patch_namespaced_custom_object(*VELERO, "ns1", "backups", "b1", {"spec": {"ttl": "2h0m0s"}})
    assert fake_kube.requests[-1][2] == "application/merge-patch+json"  # the client's default here
    assert out["spec"]["ttl"] == "2h0m0s" and out["metadata"]["generation"] == 2
    out = co.patch_namespaced_custom_object(*VELERO, "ns1", "backups", "b1",
                                            [{"op": "replace", "path": "/spec/ttl", "value": "3h0m0s"}],
                                            _content_type="application/json-patch+json")
    assert out["spec"]["ttl"] == "3h0m0s"
    with pytest.raises(ApiException) as err:  # a merge patch that makes the object invalid
        co.patch_namespaced_custom_object(*VELERO, "ns1", "backups", "b1", {"spec": {"ttl": 7}},
                                          _content_type="application/merge-patch+json")
    assert err.value.status == 422
    # Backup has no status subresource: status is part of the object, and /status is not found
    out = co.patch_namespaced_custom_object(*VELERO, "ns1", "backups", "b1", {"status": {"phase": "InProgress"}},
                                            _content_type="application/merge-patch+json")
    assert out["status"]["phase"] == "InProgress"
    with pytest.raises(ApiException) as err:
        co.get_namespaced_custom_object_status(*VELERO, "ns1", "backups", "b1")
    assert err.value.status == 404


def kustomization(path="./a", interval="10m"):
    return {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
            "metadata": {"name": "k1", "namespace": "ns1"},
            "spec": {"interval": interval, "path": path, "prune": True,
                     "sourceRef": {"kind": "GitRepository", "name": "repo"}}}


@needs_schemas()
def test_server_side_apply_owns_fields_and_conflicts(api, fake_kube):
    co = client.CustomObjectsApi(api)

    def apply(body, manager, force=None):
        return co.patch_namespaced_custom_object(*FLUX, "ns1", "kustomizations", "k1", body, field_manager=manager,
                                                 force=force, _content_type="application/apply-patch+yaml")

    mine = kustomization()
    mine["spec"]["timeout"] = "5m"
    # an apply that creates answers 201, which this client maps to no object at all: read it back
    assert apply(mine, "nova-dr") is None
    assert fake_kube.requests[-1][:2] == ("PATCH", "/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/ns1/"
                                                   "kustomizations/k1?fieldManager=nova-dr")
    made = co.get_namespaced_custom_object(*FLUX, "ns1", "kustomizations", "k1")
    assert made["metadata"]["generation"] == 1 and made["spec"]["path"] == "./a"
    assert [m["manager"] for m in made["metadata"]["managedFields"]] == ["nova-dr"]
    assert apply(mine, "nova-dr")["metadata"]["generation"] == 1  # same config: no change
    with pytest.raises(ApiException) as err:
        apply(kustomization(path="./b"), "someone-else")
    body = status_of(err.value)
    assert err.value.status == 409 and ".spec.path" in [c["field"] for c in body["details"]["causes"]]
    assert fake_kube.get("kustomize.toolkit.fluxcd.io", "kustomizations", "ns1", "k1")["spec"]["path"] == "./a"
    taken = apply(kustomization(path="./b"), "someone-else", force=True)
    assert taken["spec"]["path"] == "./b" and taken["metadata"]["generation"] == 2
    # a field the manager no longer sets goes away when nobody else sets it (timeout), and stays
    # when another manager applied the same value too (prune)
    less = kustomization(path="./b")
    del less["spec"]["prune"]
    out = apply(less, "nova-dr")
    assert "timeout" not in out["spec"] and out["spec"]["prune"] is True
    with pytest.raises(ApiException) as err:  # an apply must name its manager
        co.patch_namespaced_custom_object(*FLUX, "ns1", "kustomizations", "k1", kustomization(),
                                          _content_type="application/apply-patch+yaml")
    assert err.value.status == 422


@needs_schemas()
def test_kustomization_status_only_through_its_subresource(api, fake_kube):
    co = client.CustomObjectsApi(api)
    body = {**kustomization(), "status": {"observedGeneration": 9}}
    made = co.create_namespaced_custom_object(*FLUX, "ns1", "kustomizations", body)
    assert "status" not in made  # dropped on create, as with every status subresource
    fake_kube.set_condition(*FLUX[:1], "kustomizations", "ns1", "k1", "Ready", "False", "BuildFailed", "no such path",
                            status_observed=False)
    got = co.get_namespaced_custom_object_status(*FLUX, "ns1", "kustomizations", "k1")
    ready = got["status"]["conditions"][0]
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("False", "BuildFailed", 1)
    assert "observedGeneration" not in got["status"]  # as Flux leaves it after a failure
    with pytest.raises(ApiException) as err:  # a misspelled field in a status write is refused too
        co.patch_namespaced_custom_object_status(*FLUX, "ns1", "kustomizations", "k1",
                                                 {"status": {"observedGenerations": 2}},
                                                 _content_type="application/merge-patch+json")
    assert err.value.status == 422


def test_exec_returns_binary_bytes_intact_over_v5_and_v4(api, fake_kube):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod("ns1", {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "backup-daemon", "image": "i"}, {"name": "other", "image": "i"}]}, })
    fake_kube.set_status("", "pods", "ns1", "p", phase="Running")
    payload = os.urandom(3 << 20)
    seen = []

    def handler(pod, container, command):
        seen.append((pod["metadata"]["name"], container, command))
        if command[:2] == ["tar", "cf"]:
            return ExecResult(stdout=payload)
        if command[0] == "false":
            return ExecResult(stderr=b"no\n", exit_code=2)
        return None

    fake_kube.on_exec(handler)

    def run(command, container="backup-daemon"):
        ws = stream(core.connect_get_namespaced_pod_exec, "p", "ns1", command=command, container=container,
                    stderr=True, stdin=False, stdout=True, tty=False, binary=True, _preload_content=False)
        out, err = b"", b""
        while ws.is_open():
            ws.update(timeout=5)
            out += ws.read_stdout(timeout=0) if ws.peek_stdout() else b""
            err += ws.read_stderr(timeout=0) if ws.peek_stderr() else b""
        out += ws.read_stdout(timeout=0) if ws.peek_stdout() else b""
        return out, err, ws.returncode, ws.subprotocol

    out, err, code, proto = run(["tar", "cf", "-", "-C", "/opt/backup", "."])
    assert (len(out), out == payload, code, proto) == (len(payload), True, 0, "v5.channel.k8s.io")
    assert seen[-1] == ("p", "backup-daemon", ["tar", "cf", "-", "-C", "/opt/backup", "."])
    out, err, code, _ = run(["false"])
    assert (out, err, code) == (b"", b"no\n", 2)
    fake_kube.exec_protocols = (V4,)
    out, _, code, proto = run(["tar", "cf", "-"])
    assert (out == payload, code, proto) == (True, 0, V4)
    with pytest.raises(ApiException):
        run(["true"], container="nope")
    # a binary the image lacks: the kubelet's InternalError, whose text the client int()s
    with pytest.raises(ValueError, match="invalid literal for int"):
        run(["no-such-binary"])


def _pod(api, fake_kube):
    client.CoreV1Api(api).create_namespaced_pod("ns1", {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "backup-daemon", "image": "i"}]}})
    fake_kube.set_status("", "pods", "ns1", "p", phase="Running")


def test_exec_to_names_a_command_that_could_not_run_and_passes_exit_codes(api, fake_kube, tmp_path):
    from tasks.kube import Kube, KubeError

    _pod(api, fake_kube)
    fake_kube.on_exec(lambda pod, c, cmd: ExecResult(b"out", b"no\n", exit_code=2) if cmd == ["false"] else None)
    kube = Kube(api)
    with open(tmp_path / "sink", "wb") as sink:
        assert kube.exec_to("ns1", "p", "backup-daemon", ["false"], sink) == (2, "no\n")
        with pytest.raises(KubeError) as err:
            kube.exec_to("ns1", "p", "backup-daemon", ["tar", "cf", "-"], sink)
    assert str(err.value).startswith("exec in pod ns1/p container backup-daemon: tar cf - could not run: Internal "
                                     "error occurred: error executing command in container: failed to exec")
    assert 'exec: "tar": executable file not found in $PATH' in str(err.value)


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise AssertionError(field)


def test_exec_to_streams_without_keeping_a_copy(api, fake_kube, tmp_path):
    """Read with the client's update()/read_stdout(), 256 MiB from a pod that sends faster than
    we write raised peak RSS by 520 MiB (every waiting frame appended to one buffer, and a
    capture_all copy) and took 500 s (each append copies). Peak RSS is reset first
    (clear_refs 5), so earlier tests do not count."""
    from tasks.kube import Kube

    _pod(api, fake_kube)
    chunk, n = os.urandom(1 << 20), 256
    fake_kube.on_exec(lambda pod, c, cmd: ExecResult(stdout=(chunk for _ in range(n))))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS")
    with open(tmp_path / "sink", "wb") as sink:
        assert Kube(api).exec_to("ns1", "p", "backup-daemon", ["tar", "cf", "-"], sink) == (0, "")
    assert (tmp_path / "sink").stat().st_size == n << 20
    grew = _rss("VmHWM") - base
    assert grew < 96 << 20, f"peak RSS grew {grew >> 20} MiB while copying {n} MiB"


def test_controller_helpers_and_garbage_collection(api, fake_kube):
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    ds = apps.create_namespaced_daemon_set("ns1", {
        "metadata": {"name": "nova-backup-daemon"},
        "spec": {"selector": {"matchLabels": {"app.kubernetes.io/component": "nova-backup-daemon"}},
                 "template": {"metadata": {"labels": {"app.kubernetes.io/component": "nova-backup-daemon"}},
                              "spec": {"containers": [{"name": "backup-daemon", "image": "d"}]}}}})
    made = fake_kube.make_pods(api.sanitize_for_serialization(ds), ["master-1", "master-2"])
    pods = core.list_namespaced_pod("ns1", label_selector="app.kubernetes.io/component=nova-backup-daemon").items
    assert sorted(p.spec.node_name for p in pods) == ["master-1", "master-2"]
    assert {p.metadata.owner_references[0].uid for p in pods} == {ds.metadata.uid}
    assert {p.status.phase for p in pods} == {"Running"} and len(made) == 2
    apps.delete_namespaced_daemon_set("nova-backup-daemon", "ns1")
    assert core.list_namespaced_pod("ns1").items == []


def test_fake_stops_and_refuses_connections():
    fake = FakeKube().start()
    c = kube_client(fake)
    assert client.CoreV1Api(c).list_namespace().items == []
    fake.stop()
    c.configuration.retries = 0
    with pytest.raises(Exception):
        client.CoreV1Api(c).list_namespace(_request_timeout=2)
