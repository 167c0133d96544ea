"""`nova-dr serve`: every deployment, served from this machine against the configured Prefect
API; with none configured, against a local `prefect server` (SQLite) started here, on
loopback unless told otherwise."""

from __future__ import annotations

import os
import signal
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
          limit: int = typer.Option(4, "--limit", help="flow runs at once on this machine")) -> None:
    """Serve every nova-dr deployment (schedules, UI- and API-started runs)."""
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        url = f"http://{host}:{port}/api"
        typer.echo(f"PREFECT_API_URL is not set: starting a local Prefect server on {host}:{port} (SQLite in "
                   f"{os.environ.get('PREFECT_HOME', '~/.prefect')}). UI: http://{host}:{port}")
        if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
            typer.secho("warning: the server's API has no auth and returns block secrets; set "
                        "PREFECT_SERVER_API_AUTH_STRING before binding beyond loopback", fg="yellow", err=True)
        server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", host,
                                   "--port", str(port)], start_new_session=True)
        os.environ["PREFECT_API_URL"] = url
        _wait_healthy(url, server)
    from prefect import serve as prefect_serve

    from deployments.catalog import build_deployments

    try:
        prefect_serve(*build_deployments(), limit=limit)
    finally:
        if server is not None:  # served runs stop first, then the server (it hangs otherwise)
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
