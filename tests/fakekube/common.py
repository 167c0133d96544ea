"""What the fake's modules share: Kubernetes Status errors, exec results, API versions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

V5, V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def body(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


@dataclass
class ExecResult:
    stdout: bytes | Iterable[bytes] = b""  # an iterable streams (a few hundred MB need not be held)
    stderr: bytes = b""
    exit_code: int = 0
    internal_error: str | None = None  # the command never ran: the kubelet's InternalError status


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_version(group: str, version: str) -> str:
    return f"{group}/{version}" if group else version


def _split_api_version(api_version: str) -> tuple[str, str]:
    return tuple(api_version.split("/")) if "/" in api_version else ("", api_version)
