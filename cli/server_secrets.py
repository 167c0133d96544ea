"""The local Prefect server that `nova-dr serve` starts, secure by default: an API auth string
and the key that encrypts block secrets, each made once and kept in a 0600 file under
PREFECT_HOME. Without them, whoever reaches the API reads every block's secrets (the SSH key,
S3 keys, the StarVault token), and the key that encrypts them sits in the same database.

Read before Prefect is imported (its settings are read once): `nova-dr` clients on this
machine pick the auth string up from the file when PREFECT_API_AUTH_STRING is not set."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

AUTH_FILE = "nova-dr-api-auth"
KEY_FILE = "nova-dr-encryption-key"


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()


def _kept(name: str, make) -> tuple[str, Path, bool]:
    """The secret in PREFECT_HOME/name, made (0600, never overwritten) when missing."""
    path = prefect_home() / name
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if path.is_symlink() or (path.stat().st_mode & 0o077):
            raise SystemExit(f"error: {path} must be a plain file of mode 0600 (it holds a secret); fix it, then "
                             "run again")
        return path.read_text().strip(), path, False
    value = make()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, path, True


def server_env() -> tuple[dict[str, str], list[str]]:
    """The environment for a local server (auth string, encryption key) and what to tell the
    operator. A value set in the environment wins and nothing is written."""
    env, said = {}, []
    if not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        auth, path, made = _kept(AUTH_FILE, lambda: "nova-dr:" + secrets.token_urlsafe(24))
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
        said.append(f"API auth string {'made and ' if made else ''}kept in {path} (clients: "
                    f"export PREFECT_API_AUTH_STRING=\"$(cat {path})\"; `nova-dr` on this machine reads it)")
    if not os.environ.get("PREFECT_SERVER_ENCRYPTION_KEY"):
        db = prefect_home() / "prefect.db"
        if db.exists() and not (prefect_home() / KEY_FILE).exists():
            # Blocks already saved there are encrypted with the key in that database: a new key
            # would make them unreadable.
            said.append(f"warning: {db} keeps the key that encrypts its block secrets in itself; set "
                        "PREFECT_SERVER_ENCRYPTION_KEY for a new database to keep them apart")
        else:
            key, path, made = _kept(KEY_FILE, lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
            env["PREFECT_SERVER_ENCRYPTION_KEY"] = key
            said.append(f"block secrets encrypted with the key {'made and ' if made else ''}kept in {path}, not in "
                        "the database")
    return env, said


def client_auth_from_file() -> None:
    """PREFECT_API_AUTH_STRING from the file `serve` keeps, for a client on this machine."""
    path = prefect_home() / AUTH_FILE
    if os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_API_AUTH_STRING") and path.is_file() \
            and not path.is_symlink():
        try:
            os.environ["PREFECT_API_AUTH_STRING"] = path.read_text().strip()
        except OSError:
            pass
