"""The patch formats the API server takes, as pure functions on JSON-like dicts."""

from __future__ import annotations

import copy

# Strategic merge: lists of these fields merge by the named key (from the upstream
# `patchMergeKey` tags of the core types); every other list is replaced whole.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name",
    "conditions": "type", "ownerReferences": "uid", "envFrom": None, "tolerations": None,
}


def merge_patch(target, patch):
    """RFC 7386: objects merge, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge_patch(target, patch, field: str | None = None):
    """Kubernetes' strategic merge for built-in types: like a merge patch, except that lists
    with a merge key merge item by item (`$patch: delete` removes an item)."""
    if isinstance(patch, list):
        key = MERGE_KEYS.get(field or "")
        if not key or not isinstance(target, list):
            return [x for x in copy.deepcopy(patch) if not (isinstance(x, dict) and x.get("$patch") == "delete")]
        out = copy.deepcopy(target)
        for item in patch:
            idx = next((i for i, old in enumerate(out) if isinstance(old, dict) and old.get(key) == item.get(key)), None)
            if item.get("$patch") == "delete":
                if idx is not None:
                    out.pop(idx)
            elif idx is None:
                out.append(copy.deepcopy(item))
            else:
                out[idx] = strategic_merge_patch(out[idx], item)
        return out
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = strategic_merge_patch(out.get(key), value, key)
    return out


class PatchError(ValueError):
    pass


def json_patch(target, ops: list):
    """RFC 6902 add/remove/replace/test, enough for what clients send."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.get(p)
            if parent is None:
                raise PatchError(f"path {op['path']} does not exist")
        last = parts[-1]
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise PatchError(f"test failed at {op['path']}")
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            elif last in parent:
                del parent[last]
            else:
                raise PatchError(f"path {op['path']} does not exist")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                if kind == "replace" and last not in parent:
                    raise PatchError(f"path {op['path']} does not exist")
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise PatchError(f"unsupported op {kind!r}")
    return doc


# --- server-side apply -------------------------------------------------------------------
# Ownership is tracked per leaf field (lists are atomic), which is what conflicts need.

IDENTITY = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace")}
SYSTEM = {"uid", "creationTimestamp", "generation", "resourceVersion", "managedFields"}


def leaves(obj, prefix=()) -> dict[tuple, object]:
    out = {}
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            out.update(leaves(v, prefix + (k,)))
    elif prefix:
        out[prefix] = obj
    return {p: v for p, v in out.items()
            if p not in IDENTITY and not (len(p) > 1 and p[0] == "metadata" and p[1] in SYSTEM)}


def get_path(obj, path):
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return _MISSING
        obj = obj[p]
    return obj


_MISSING = object()


def set_path(obj, path, value):
    for p in path[:-1]:
        if not isinstance(obj.get(p), dict):
            obj[p] = {}
        obj = obj[p]
    obj[path[-1]] = copy.deepcopy(value)


def del_path(obj, path):
    parents = []
    for p in path[:-1]:
        if not isinstance(obj.get(p), dict):
            return
        parents.append((obj, p))
        obj = obj[p]
    obj.pop(path[-1], None)
    for parent, key in reversed(parents):  # drop maps left empty
        if parent[key] == {}:
            del parent[key]


def apply(current: dict | None, config: dict, owners: dict[tuple, set], manager: str,
          force: bool) -> tuple[dict, dict[tuple, set], list[tuple[tuple, set]]]:
    """Returns (new object, new ownership, conflicts). Conflicts: fields the config sets to a
    different value that another manager owns; with force they change hands."""
    current = current or {}
    mine = leaves(config)
    conflicts = []
    for path, value in mine.items():
        others = owners.get(path, set()) - {manager}
        if others and get_path(current, path) != value:
            conflicts.append((path, others))
    if conflicts and not force:
        return current, owners, conflicts
    new = copy.deepcopy(current)
    owners = {p: set(m) for p, m in owners.items()}
    for path, managers in list(owners.items()):
        if manager in managers and path not in mine:
            managers.discard(manager)
            if not managers:  # only this manager set it, and it no longer does
                del_path(new, path)
                del owners[path]
    for path, value in mine.items():
        if get_path(current, path) != value:
            owners[path] = {manager}
        else:
            owners.setdefault(path, set()).add(manager)
        set_path(new, path, value)
    return new, owners, []


def record_update(old: dict, new: dict, owners: dict[tuple, set], manager: str) -> dict[tuple, set]:
    """A non-apply write takes ownership of the fields it changed."""
    owners = {p: set(m) for p, m in owners.items()}
    before, after = leaves(old), leaves(new)
    for path in set(before) | set(after):
        if before.get(path, _MISSING) != after.get(path, _MISSING):
            if path in after:
                owners[path] = {manager}
            else:
                owners.pop(path, None)
    return owners


def fields_v1(paths) -> dict:
    """The `fieldsV1` shape of managedFields, from leaf paths."""
    out: dict = {}
    for path in paths:
        node = out
        for p in path:
            node = node.setdefault(f"f:{p}", {})
    return out
