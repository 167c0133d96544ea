"""Selectors and OpenAPI v3 validation, as pure functions (the server's rules)."""

from __future__ import annotations

import re


class SelectorError(ValueError):
    pass


_REQ = re.compile(r"^\s*(!?)([A-Za-z0-9._/-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def _split(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p.strip()]


def label_matcher(selector: str | None):
    """Equality- and set-based label selectors: `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
    `a notin (x)`, `a`, `!a`."""
    reqs = []
    for part in _split(selector or ""):
        m = _REQ.match(part)
        if not m:
            raise SelectorError(f"unable to parse requirement: {part.strip()!r}")
        neg, key, op, value, setop, values = m.groups()
        if neg and (op or setop):
            raise SelectorError(f"unable to parse requirement: {part.strip()!r}")
        reqs.append((neg, key, op, value, setop, {v.strip() for v in (values or "").split(",") if v.strip()}))

    def match(labels: dict) -> bool:
        labels = labels or {}
        for neg, key, op, value, setop, values in reqs:
            if neg and key in labels:
                return False
            if not neg and not op and not setop and key not in labels:
                return False
            if op in ("=", "==") and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
            if setop == "in" and labels.get(key) not in values:
                return False
            if setop == "notin" and key in labels and labels[key] in values:
                return False
        return True

    return match


FIELDS = {"metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace"),
          "spec.nodeName": ("spec", "nodeName"), "status.phase": ("status", "phase")}


def field_matcher(selector: str | None, kind: str):
    reqs = []
    for part in _split(selector or ""):
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise SelectorError(f"invalid field selector: {part.strip()!r}")
        field, op, value = m.groups()
        allowed = ["metadata.name", "metadata.namespace"] + (["spec.nodeName", "status.phase"] if kind == "Pod" else [])
        if field not in allowed:
            raise SelectorError(f'field label not supported: {field}')
        reqs.append((FIELDS[field], op, value))

    def match(obj: dict) -> bool:
        for (a, b), op, value in reqs:
            actual = (obj.get(a) or {}).get(b) or ""
            if (actual == value) != (op != "!="):
                return False
        return True

    return match


# --- OpenAPI v3 structural schemas (the subset CRDs use) -------------------------------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def validate(schema: dict, value, path: str = "") -> list[tuple[str, str]]:
    """(field path, message) for each violation; unknown fields are violations unless the
    schema preserves them."""
    if value is None:
        return [] if schema.get("nullable") else [(path, "Invalid value: \"null\": must not be null")]
    errors = []
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            errors.append((path, f"Invalid value: {_typename(value)}: must be an integer or a string"))
        return errors
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [(path, f'Invalid value: "{_typename(value)}": {path} in body must be of type integer: "{_typename(value)}"')]
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [(path, f'Invalid value: "{_typename(value)}": {path} in body must be of type number: "{_typename(value)}"')]
    elif kind in _TYPES and not isinstance(value, _TYPES[kind]):
        return [(path, f'Invalid value: "{_typename(value)}": {path} in body must be of type {kind}: "{_typename(value)}"')]
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(f'"{v}"' for v in schema["enum"])
        errors.append((path, f"Unsupported value: {value!r}: supported values: {allowed}"))
    if kind == "string" and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append((path, f'Invalid value: "{value}": {path} in body should match \'{schema["pattern"]}\''))
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for req in schema.get("required", []):
            if req not in value:
                errors.append((_join(path, req), "Required value"))
        for key, sub in value.items():
            child = _join(path, key)
            if props and key in props:
                errors += validate(props[key], sub, child)
            elif isinstance(extra, dict):
                errors += validate(extra, sub, child)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                errors.append((child, "field not declared in schema"))
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(schema["items"], item, f"{path}[{i}]")
    return errors


def _join(path, key):
    return f"{path}.{key}" if path else key


def _typename(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
