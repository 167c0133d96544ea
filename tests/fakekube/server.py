"""The fake API server: aiohttp on a loopback port in a thread of the test process. It keeps
objects the way kube-apiserver does (uid, resourceVersion, generation, managedFields), answers
with Kubernetes `Status` bodies, takes the patch formats the real server takes, validates
custom resources against their CRDs, and runs pod exec over the channel websocket protocol.
Tests act as controllers through its Python methods (set a phase, make a Job's pods...)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from aiohttp import web

from tests.fakekube import patches
from tests.fakekube.common import V4, V5, ApiError, ExecResult, _api_version, _now  # noqa: F401
from tests.fakekube.controllers import ControllerMixin
from tests.fakekube.exec import ExecMixin
from tests.fakekube.rules import SelectorError, field_matcher, label_matcher, validate



@dataclass
class ResourceType:
    group: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = True
    schemas: dict[str, dict | None] = field(default_factory=dict)  # version -> openAPIV3Schema
    custom: bool = False

    def resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


BUILTIN = [
    ("", "v1", "pods", "Pod", True), ("", "v1", "secrets", "Secret", True),
    ("", "v1", "configmaps", "ConfigMap", True), ("", "v1", "serviceaccounts", "ServiceAccount", True),
    ("", "v1", "namespaces", "Namespace", False), ("", "v1", "nodes", "Node", False),
    ("apps", "v1", "deployments", "Deployment", True), ("apps", "v1", "daemonsets", "DaemonSet", True),
    ("batch", "v1", "jobs", "Job", True), ("batch", "v1", "cronjobs", "CronJob", True),
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False),
]
NO_STATUS = {"Secret", "ConfigMap", "ServiceAccount"}


def _spec_part(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class FakeKube(ControllerMixin, ExecMixin):
    def __init__(self, token: str | None = None):
        self.token = token or secrets.token_urlsafe(24)
        self.types: dict[tuple[str, str], ResourceType] = {}  # (group, plural)
        self.versions: dict[str, set[str]] = {}  # group -> served versions
        self.objects: dict[tuple, dict] = {}  # (group, plural, namespace, name)
        self.owners: dict[tuple, dict] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path?query, content type)
        self.exec_protocols = (V5, V4)
        self._exec: list[Callable] = []
        self._reactors: list[tuple[str, str, Callable]] = []
        self._rv = 1000
        self._lock = threading.RLock()
        for group, version, plural, kind, namespaced in BUILTIN:
            self._add_type(ResourceType(group, plural, kind, namespaced, kind not in NO_STATUS), version, None)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1") -> "FakeKube":
        ready = threading.Event()

        def serve():
            self.loop = asyncio.new_event_loop()
            app = web.Application(client_max_size=64 << 20)
            app.router.add_route("*", "/{path:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, 0)
            self.loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]
            self.url = f"http://{host}:{port}"
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-kube", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self):
        if self.loop:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def kubeconfig(self, namespace: str = "default") -> dict:
        """What `kubectl config view --raw` would show for this server."""
        return {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "tester", "user": {"token": self.token}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}]}

    # --- registration ------------------------------------------------------------------------

    def _add_type(self, rt: ResourceType, version: str, schema: dict | None):
        rt = self.types.setdefault((rt.group, rt.plural), rt)
        rt.schemas[version] = schema
        self.versions.setdefault(rt.group, set()).add(version)

    def register_crd(self, crd: dict | str | Path):
        if not isinstance(crd, dict):
            crd = yaml.safe_load(Path(crd).read_text())
        spec = crd["spec"]
        for v in spec["versions"]:
            if not v.get("served", True):
                continue
            rt = ResourceType(spec["group"], spec["names"]["plural"], spec["names"]["kind"],
                              spec.get("scope", "Namespaced") == "Namespaced",
                              "status" in (v.get("subresources") or {}), custom=True)
            self._add_type(rt, v["name"], (v.get("schema") or {}).get("openAPIV3Schema"))

    def on_exec(self, handler: Callable[[dict, str, list[str]], ExecResult | None]):
        """handler(pod, container, command) -> ExecResult, or None to pass to the next one."""
        self._exec.append(handler)

    def react(self, group: str, plural: str, fn: Callable[[str, dict], None]):
        """fn(verb, object) after every create/update/delete of that type, as a watching
        controller would see it (called in the server thread)."""
        self._reactors.append((group, plural, fn))

    def later(self, delay: float, fn: Callable[[], None]):
        self.loop.call_soon_threadsafe(self.loop.call_later, delay, fn)

    # --- HTTP ------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ctype = request.headers.get("Content-Type", "")
        self.requests.append((request.method, request.path_qs, ctype))
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if request.path == "/version":
                return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"})
            route = self._route(request.path)
            if route[4] == "exec":
                return await self._exec_ws(request, *route)
            body = await request.read()
            with self._lock:
                status, out = self._dispatch(request, route, body, ctype)
            return web.json_response(out, status=status)
        except ApiError as err:
            return web.json_response(err.body(), status=err.code)

    def _route(self, path: str) -> tuple[ResourceType, str, str | None, str | None, str | None]:
        """(type, version, namespace, name, subresource) of an API path."""
        segs = [s for s in path.split("/") if s]
        if segs[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", segs[2:]
        elif len(segs) >= 3 and segs[0] == "apis":
            group, version, rest = segs[1], segs[2], segs[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if version not in self.versions.get(group, ()):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces" and (group, rest[2]) in self.types:
            ns, rest = rest[1], rest[2:]
        rt = self.types.get((group, rest[0])) if rest else None
        if rt is None or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and ns is None and len(rest) > 1:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if version not in rt.schemas:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({rt.resource()} {version})")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub not in (None, "status", "exec") or (sub == "status" and not rt.status_subresource) or \
                (sub == "exec" and rt.kind != "Pod"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt, version, ns, name, sub

    def _dispatch(self, request, route, raw: bytes, ctype: str):
        rt, version, ns, name, sub = route
        q, method = request.query, request.method
        key = (rt.group, rt.plural, ns, name)
        if name is None:
            if method == "GET":
                return 200, self._list(rt, version, ns, q)
            if method == "POST" and (ns is not None or not rt.namespaced):
                obj = self._decode(raw, ctype, ("application/json",))
                meta = obj.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
                if not meta.get("name"):
                    raise ApiError(422, "Invalid", f"{rt.kind} \"\" is invalid: metadata.name: Required value: "
                                                   "name or generateName is required")
                self._check_identity(rt, ns, meta["name"], obj)
                if (rt.group, rt.plural, ns, meta["name"]) in self.objects:
                    raise ApiError(409, "AlreadyExists", f'{rt.resource()} "{meta["name"]}" already exists',
                                   {"name": meta["name"], "group": rt.group, "kind": rt.plural})
                return 201, self._write(rt, version, ns, meta["name"], None, obj, q.get("fieldManager"))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        old = self.objects.get(key)
        if method == "GET":
            return 200, self._out(self._require(rt, key, old), version)
        if method == "DELETE":
            self._require(rt, key, old)
            self._delete(key)
            if rt.custom:
                return 200, self._out(old, version)
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": rt.group, "kind": rt.plural, "uid": old["metadata"]["uid"]}}
        if method == "PUT":
            obj = self._decode(raw, ctype, ("application/json",))
            self._require(rt, key, old)
            self._check_identity(rt, ns, name, obj)
            self._check_rv(rt, name, old, obj)
            if sub == "status":
                obj = {**copy.deepcopy(old), "status": obj.get("status")}
            return 200, self._write(rt, version, ns, name, old, obj, q.get("fieldManager"), status_write=sub == "status")
        if method == "PATCH":
            return self._patch(rt, version, ns, name, sub, old, raw, ctype, q)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    def _patch(self, rt, version, ns, name, sub, old, raw, ctype, q):
        key = (rt.group, rt.plural, ns, name)
        kind = ctype.split(";")[0].strip()
        if kind == "application/apply-patch+yaml":
            manager = q.get("fieldManager")
            if not manager:
                raise ApiError(422, "Invalid", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                                               "is required for apply patch")
            config = yaml.safe_load(raw.decode() or "{}")
            if not isinstance(config, dict):
                raise ApiError(400, "BadRequest", "error decoding YAML: not an object")
            self._check_identity(rt, ns, name, config)
            if sub != "status" and rt.status_subresource:
                config.pop("status", None)
            new, owners, conflicts = patches.apply(old, config, self.owners.get(key, {}), manager,
                                                   q.get("force") == "true")
            if conflicts:
                causes = [{"reason": "FieldManagerConflict", "field": "." + ".".join(p),
                           "message": f'conflict with "{sorted(m)[0]}": .{".".join(p)}'} for p, m in conflicts]
                raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s): "
                               + "; ".join(c["message"] for c in causes), {"name": name, "group": rt.group,
                                                                           "kind": rt.plural, "causes": causes})
            self.owners[key] = owners
            new.setdefault("apiVersion", _api_version(rt.group, version))
            new.setdefault("kind", rt.kind)
            status = 201 if old is None else 200
            return status, self._write(rt, version, ns, name, old, new, None, status_write=sub == "status",
                                       owners_done=True)
        old = self._require(rt, key, old)
        if kind == "application/strategic-merge-patch+json" and rt.custom:
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted "
                           "media types include: application/json-patch+json, application/merge-patch+json, "
                           "application/apply-patch+yaml")
        body = self._decode(raw, ctype, ("application/json-patch+json", "application/merge-patch+json",
                                         "application/strategic-merge-patch+json"), allow_empty=False)
        try:
            if kind == "application/json-patch+json":
                if not isinstance(body, list):
                    raise ApiError(400, "BadRequest", "json patch must be a list of operations")
                new = patches.json_patch(old, body)
            elif not isinstance(body, dict):
                raise ApiError(400, "BadRequest", f"a {kind} body must be a JSON object, not a list")
            elif kind == "application/merge-patch+json":
                new = patches.merge_patch(old, body)
            else:
                new = patches.strategic_merge_patch(old, body)
        except (patches.PatchError, KeyError, ValueError, IndexError, TypeError) as err:
            raise ApiError(422, "Invalid", f"the patch could not be applied: {err}") from None
        self._check_rv(rt, name, old, new)
        self._check_identity(rt, ns, name, new)
        if sub == "status":
            new = {**copy.deepcopy(old), "status": new.get("status")}
        return 200, self._write(rt, version, ns, name, old, new, q.get("fieldManager"), status_write=sub == "status")

    # --- writing ---------------------------------------------------------------------------------

    def _write(self, rt: ResourceType, version: str, ns, name, old, new, manager, status_write=False,
               owners_done=False) -> dict:
        key = (rt.group, rt.plural, ns, name)
        if rt.namespaced and ns not in {k[3] for k in self.objects if k[1] == "namespaces" and k[0] == ""}:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                           {"name": ns, "kind": "namespaces"})
        if rt.status_subresource and not status_write:
            new["status"] = copy.deepcopy((old or {}).get("status")) if old else None
            if new["status"] is None:
                new.pop("status")
        new["apiVersion"], new["kind"] = _api_version(rt.group, version), rt.kind
        if rt.custom and rt.schemas.get(version):
            schema = {k: v for k, v in rt.schemas[version].items() if k != "properties"}
            schema["properties"] = {k: v for k, v in rt.schemas[version].get("properties", {}).items() if k != "metadata"}
            body = {k: v for k, v in new.items() if k != "metadata"}
            errors = validate(schema, body)
            if errors:
                causes = [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in errors]
                text = ", ".join(f"{f}: {m}" for f, m in errors)
                raise ApiError(422, "Invalid", f'{rt.kind}.{rt.group} "{name}" is invalid: [{text}]',
                               {"name": name, "group": rt.group, "kind": rt.kind, "causes": causes})
        if rt.kind == "Secret" and "stringData" in new:  # write-only: the server stores it under data, base64
            new["data"] = {**(new.get("data") or {}), **{k: base64.b64encode(v.encode()).decode()
                                                         for k, v in new.pop("stringData").items()}}
        meta = new.setdefault("metadata", {})
        meta["name"] = name
        if ns is not None:
            meta["namespace"] = ns
        for k in ("managedFields", "resourceVersion"):
            meta.pop(k, None)
        if old:
            for k in ("uid", "creationTimestamp"):
                meta[k] = old["metadata"][k]
            gen = old["metadata"].get("generation", 1)
            meta["generation"] = gen + 1 if _spec_part(old) != _spec_part(new) else gen
        else:
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if not owners_done:
            self.owners[key] = patches.record_update(old or {}, new, self.owners.get(key, {}),
                                                     manager or "kubernetes-python-client")
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        by_manager: dict[str, list] = {}
        for path, managers in self.owners.get(key, {}).items():
            for m in managers:
                by_manager.setdefault(m, []).append(path)
        meta["managedFields"] = [{"manager": m, "operation": "Apply" if owners_done else "Update",
                                  "apiVersion": new["apiVersion"], "time": _now(), "fieldsType": "FieldsV1",
                                  "fieldsV1": patches.fields_v1(paths)} for m, paths in sorted(by_manager.items())]
        self.objects[key] = new
        if rt.kind == "CustomResourceDefinition":
            self.register_crd(new)
        self._notify(rt, "MODIFIED" if old else "ADDED", new)
        return self._out(new, version)

    def _delete(self, key):
        obj = self.objects.pop(key)
        self.owners.pop(key, None)
        uid = obj["metadata"]["uid"]
        rt = self.types[(key[0], key[1])]
        self._notify(rt, "DELETED", obj)
        # Garbage collection: dependents go with their owner, and a namespace takes its objects.
        for k, o in list(self.objects.items()):
            if k not in self.objects:
                continue
            owned = any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))
            if owned or (rt.kind == "Namespace" and k[2] == key[3]):
                self._delete(k)

    def _notify(self, rt, verb, obj):
        for group, plural, fn in self._reactors:
            if (group, plural) == (rt.group, rt.plural):
                fn(verb, copy.deepcopy(obj))

    # --- helpers ---------------------------------------------------------------------------------

    def _list(self, rt, version, ns, q) -> dict:
        if q.get("watch") in ("true", "1"):
            raise ApiError(405, "MethodNotAllowed", "watch is not implemented by the fake API server")
        try:
            labels, fields = label_matcher(q.get("labelSelector")), field_matcher(q.get("fieldSelector"), rt.kind)
        except SelectorError as err:
            raise ApiError(400, "BadRequest", str(err)) from None
        items = [self._out(o, version) for (g, p, n, _), o in sorted(self.objects.items())
                 if (g, p) == (rt.group, rt.plural) and (ns is None or n == ns)
                 and labels(o["metadata"].get("labels")) and fields(o)]
        return {"apiVersion": _api_version(rt.group, version), "kind": f"{rt.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _type_of_kind(self, group, kind) -> ResourceType:
        return next(rt for (g, _), rt in self.types.items() if g == group and rt.kind == kind)

    @staticmethod
    def _out(obj, version):
        return copy.deepcopy(obj)

    @staticmethod
    def _require(rt, key, old):
        if old is None:
            raise ApiError(404, "NotFound", f'{rt.resource()} "{key[3]}" not found',
                           {"name": key[3], "group": rt.group, "kind": rt.plural})
        return old

    @staticmethod
    def _check_identity(rt, ns, name, obj):
        meta = obj.get("metadata") or {}
        if name and meta.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the name "
                                              f"on the URL ({name})")
        if rt.namespaced and meta.get("namespace") not in (None, ns):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                              "sent on the request")

    @staticmethod
    def _check_rv(rt, name, old, new):
        want = (new.get("metadata") or {}).get("resourceVersion")
        if want and want != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.resource()} "{name}": the object '
                           "has been modified; please apply your changes to the latest version and try again",
                           {"name": name, "group": rt.group, "kind": rt.plural})

    @staticmethod
    def _decode(raw: bytes, ctype: str, accepted: tuple[str, ...], allow_empty=True):
        kind = ctype.split(";")[0].strip()
        if kind and kind not in accepted:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                        f"accepted media types include: {', '.join(accepted)}")
        try:
            body = json.loads(raw or b"null")
        except ValueError as err:
            raise ApiError(400, "BadRequest", f"the body of the request is not JSON: {err}") from None
        if body is None or not isinstance(body, (dict, list)):
            raise ApiError(400, "BadRequest", "the body of the request is empty or not an object")
        return body
