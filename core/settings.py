"""The backup daemon's documented settings: a flow parameter wins over the environment
variable of the same name, which wins over the default (SPEC)."""

from __future__ import annotations

import os

from core.errors import NovaDRError

DEFAULTS: dict[str, bool | int] = {
    "INCLUDE_STARVAULT_UNSEAL_TOKENS": True,
    "INCLUDE_PKI_DATA": True,
    "INCLUDE_DATA_ENCRYPTION_CONFIG": True,
    "INCLUDE_STARVAULT_DB_BACKUP": True,
    "RETENTION_PERIOD_DAYS": 7,
}

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def resolve_settings(params: dict, env: dict | None = None) -> dict[str, bool | int]:
    env = os.environ if env is None else env
    out = {}
    for name, default in DEFAULTS.items():
        value = params.get(name)
        source = "parameter"
        if value is None and name in env:
            value, source = env[name], "environment"
        if value is None:
            out[name] = default
            continue
        if isinstance(default, bool):
            text = str(value).strip().lower()
            if text not in _TRUE | _FALSE:
                raise NovaDRError(f"{name}={value!r} ({source}): write true or false")
            out[name] = text in _TRUE
        else:
            try:
                out[name] = int(value)
            except (TypeError, ValueError):
                raise NovaDRError(f"{name}={value!r} ({source}): write a whole number of days") from None
            if out[name] < 1:
                raise NovaDRError(f"{name}={value!r} ({source}): keep backups at least 1 day")
    return out
