"""`nova-dr serve`: every deployment, served from this machine against the configured Prefect
API; with none configured, against a local `prefect server` (SQLite) started here, on
loopback unless told otherwise."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise typer.Exit(f"the Prefect server at {url} did not answer /health")
        time.sleep(0.5)


def serve(host: str = typer.Option("127.0.0.1", "--host", help="where a local server listens (loopback by default)"),
          port: int = typer.Option(4200, "--port"),
          limit: int = typer.Option(4, "--limit", help="flow runs at once on this machine"),
          no_auth: bool = typer.Option(False, "--no-auth", help="a local server without an API auth string "
                                                                  "(loopback only)")) -> None:
    """Serve every nova-dr deployment (schedules, UI- and API-started runs)."""
    from cli.server_secrets import server_env

    server = None
    if not os.environ.get("PREFECT_API_URL"):
        loopback = host in ("127.0.0.1", "localhost", "::1")
        if no_auth and not loopback:
            typer.secho(f"error: --no-auth with --host {host}: the API returns every block's secrets (the SSH key, "
                        "S3 keys, the StarVault token) to whoever reaches it; drop --no-auth, or bind to 127.0.0.1",
                        fg="red", err=True)
            raise typer.Exit(1)
        url = f"http://{host}:{port}/api"
        typer.echo(f"PREFECT_API_URL is not set: starting a local Prefect server on {host}:{port} (SQLite in "
                   f"{os.environ.get('PREFECT_HOME', '~/.prefect')}). UI: http://{host}:{port}")
        env, said = server_env()
        if no_auth:
            env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
            said = [s for s in said if not s.startswith("API auth")]
        for line in said:
            typer.echo(line)
        # The UI asks the API at PREFECT_UI_API_URL, else at host:4200 whatever --port says
        # (measured, 3.9.1: its run pages then said "Can't connect to Server API").
        ui_host = socket.getfqdn() if host in ("0.0.0.0", "::") else host
        env.setdefault("PREFECT_UI_API_URL", os.environ.get("PREFECT_UI_API_URL") or f"http://{ui_host}:{port}/api")
        # Until Prefect's runner installs its own SIGTERM handler, a stop (systemd, a test) would
        # end this process at once and orphan the server, which keeps the port (seen in CI).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", host,
                                   "--port", str(port)], start_new_session=True, env={**os.environ, **env})
        os.environ["PREFECT_API_URL"] = url
        if env.get("PREFECT_SERVER_API_AUTH_STRING"):  # this process's client and the runs it starts
            os.environ["PREFECT_API_AUTH_STRING"] = env["PREFECT_SERVER_API_AUTH_STRING"]
    try:
        if server is not None:
            _wait_healthy(url, server)
        _serve(limit)
    finally:
        if server is not None:  # served runs stop first, then the server (it hangs otherwise)
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _serve(limit: int) -> None:
    from prefect import serve as prefect_serve

    from deployments.catalog import build_deployments

    prefect_serve(*build_deployments(), limit=limit)
