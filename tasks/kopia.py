"""The `kopia` CLI, with a private config file per run so that runs never share a connection.
The repository password goes through KOPIA_PASSWORD and the S3 keys through AWS_* variables,
never on a command line (where `ps` would show them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from core.errors import NovaDRError


class Kopia:
    def __init__(self, workdir: Path, password: str, access_key: str, secret_key: str, binary: str | None = None):
        found = binary or shutil.which("kopia")
        if not found:
            raise NovaDRError("no kopia binary on PATH: install kopia (https://kopia.io) on the worker, or pass "
                              "kopia_bin; nothing was done")
        self.bin, self.dir = found, workdir
        # A new dir, never an existing one: the flow removes it (private config, restored copies) at the end.
        self.dir.mkdir(parents=True, exist_ok=False, mode=0o700)
        self._secrets = [password, secret_key]
        self.env = {**os.environ, "KOPIA_PASSWORD": password, "AWS_ACCESS_KEY_ID": access_key,
                    "AWS_SECRET_ACCESS_KEY": secret_key, "KOPIA_CHECK_FOR_UPDATES": "false",
                    "KOPIA_LOG_DIR": str(self.dir / "logs"),
                    # A private cache (kopia's default is the user's ~/.cache/kopia). Not the
                    # --cache-directory flag: kopia defines it only on `repository connect`, and an
                    # unknown flag before the command word is a hard error (kingpin).
                    "KOPIA_CACHE_DIRECTORY": str(self.dir / "cache")}

    def run(self, *args: str, timeout: float = 3600) -> str:
        argv = [self.bin, "--config-file", str(self.dir / "repository.config"), *args]
        try:
            p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NovaDRError(f"kopia {args[0]} {args[1] if len(args) > 1 else ''}: no answer within {timeout:.0f} s")
        if p.returncode != 0:
            raise NovaDRError(f"kopia {' '.join(args[:2])} failed (exit {p.returncode}): {self._scrub(p.stderr)}")
        return p.stdout

    def _scrub(self, text: str) -> str:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        text = " / ".join(lines[-4:]) or "no message"
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return text

    def connect_s3(self, bucket: str, prefix: str, endpoint: str, region: str | None) -> None:
        """kopia wants the endpoint as host[:port], without a scheme; http means --disable-tls."""
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        # --no-persist-credentials: the password stays in KOPIA_PASSWORD, never in a file next to the config
        # --readonly: this connection only lists and restores; it can never change Velero's repository
        args = ["repository", "connect", "s3", "--bucket", bucket, "--prefix", prefix, "--endpoint", parts.netloc,
                "--no-persist-credentials", "--readonly"]
        if region:
            args += ["--region", region]
        if parts.scheme == "http":
            args.append("--disable-tls")
        self.run(*args, timeout=300)

    def snapshots(self) -> str:
        return self.run("snapshot", "list", "--all", "--json", timeout=600)

    def restore(self, snapshot_id: str, target: Path) -> None:
        self.run("snapshot", "restore", snapshot_id, str(target))

    def disconnect(self) -> None:
        self.run("repository", "disconnect", timeout=120)
