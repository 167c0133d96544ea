"""The fake's Python side: tests act through these as controllers do (read and write objects,
set phases and conditions, make the pods a DaemonSet or Job would)."""

from __future__ import annotations

import copy
import secrets
from typing import Callable

from tests.fakekube.common import _now, _split_api_version


class ControllerMixin:
    def get(self, group: str, plural: str, namespace: str | None, name: str) -> dict | None:
        with self._lock:
            obj = self.objects.get((group, plural, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def list(self, group: str, plural: str, namespace: str | None = None) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(o) for (g, p, ns, _), o in sorted(self.objects.items())
                    if g == group and p == plural and (namespace is None or ns == namespace)]

    def put(self, obj: dict, manager: str = "test") -> dict:
        """Create or replace as a controller would (validation applies, concurrency not)."""
        group, version = _split_api_version(obj["apiVersion"])
        rt = self._type_of_kind(group, obj["kind"])
        ns = obj["metadata"].get("namespace") if rt.namespaced else None
        with self._lock:
            old = self.objects.get((group, rt.plural, ns, obj["metadata"]["name"]))
            return self._write(rt, version, ns, obj["metadata"]["name"], old, copy.deepcopy(obj), manager,
                               status_write=True)

    def set_status(self, group: str, plural: str, namespace: str | None, name: str, **status):
        with self._lock:
            obj = self.get(group, plural, namespace, name)
            if obj is None:
                raise KeyError(f"{plural} {namespace}/{name} does not exist")
            obj["status"] = {**(obj.get("status") or {}), **status}
            return self.put(obj, manager="controller")

    def set_condition(self, group: str, plural: str, namespace: str, name: str, type_: str, status: str,
                      reason: str = "", message: str = "", observed_generation: int | None = None,
                      status_observed: bool = True):
        """The condition carries the generation it is about; status.observedGeneration moves
        too only with status_observed (kustomize-controller moves it on success only)."""
        with self._lock:
            obj = self.get(group, plural, namespace, name)
            gen = obj["metadata"].get("generation", 1) if observed_generation is None else observed_generation
            conds = [c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] != type_]
            conds.append({"type": type_, "status": status, "reason": reason or type_, "message": message,
                          "lastTransitionTime": _now(), "observedGeneration": gen})
            more = {"observedGeneration": gen} if status_observed else {}
            return self.set_status(group, plural, namespace, name, conditions=conds, **more)

    def make_pods(self, owner: dict, nodes: list[str], phase: str = "Running",
                  name_fn: Callable[[int, str], str] | None = None) -> list[dict]:
        """Pods a DaemonSet or Job controller would make from the owner's template, one per node."""
        tmpl = owner["spec"].get("template") or owner["spec"]["jobTemplate"]["spec"]["template"]
        meta, ns = owner["metadata"], owner["metadata"]["namespace"]
        pods = []
        for i, node in enumerate(nodes):
            name = name_fn(i, node) if name_fn else f"{meta['name']}-{secrets.token_hex(3)[:5]}"
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": ns, "labels": dict(tmpl["metadata"].get("labels") or {}),
                                "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                                     "name": meta["name"], "uid": meta["uid"], "controller": True}]},
                   "spec": {**copy.deepcopy(tmpl["spec"]), "nodeName": node},
                   "status": {"phase": phase}}
            pods.append(self.put(pod, manager="controller"))
        return pods

