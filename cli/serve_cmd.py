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
                                                                  "(loopback only)"),
          fleet: str = typer.Option(None, "--fleet", help="a fleet file: every flow as <flow>/<cluster> for each "
                                                          "of its clusters"),
          notify: str = typer.Option(None, "--notify", help="a notification block, TYPE/NAME (e.g. "
                                                            "custom-webhook/ops), told of every failed run")) -> None:
    """Serve every nova-dr deployment (schedules, UI- and API-started runs). Also makes the
    automations: runs whose machine died are marked Crashed; with --notify, failures are sent."""
    from cli.server_secrets import server_env

    from cli.fleet_cmd import load_fleet_or_exit

    the_fleet = load_fleet_or_exit(fleet) if fleet else None  # a bad file is said before anything starts
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
        _serve(limit, the_fleet, fleet, notify)
    finally:
        if server is not None:  # served runs stop first, then the server (it hangs otherwise)
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _serve(limit: int, fleet=None, fleet_path: str | None = None, notify: str | None = None) -> None:
    from prefect import serve as prefect_serve

    from deployments.catalog import build_deployments, planned_fleet, prune_fleet

    _automations(notify)

    if fleet is not None:
        for name in prune_fleet(planned_fleet(fleet, fleet_path)):
            typer.echo(f"deleted deployment {name}: its cluster or flow is no longer in the fleet file")
    # SIGINT takes the runner's own graceful stop (SIGTERM's: the served runs are cancelled). A
    # handler of our own because serve may inherit SIGINT ignored (a script's `nova-dr serve &`,
    # some supervisors), which Python keeps: Ctrl-C and `kill -INT` then did nothing at all.
    signal.signal(signal.SIGINT, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))

    prefect_serve(*build_deployments(fleet=fleet, fleet_path=fleet_path), limit=limit)


def _automations(notify: str | None) -> None:
    """The served runs emit heartbeats (they inherit this environment), and the automations
    that act on them and on failures exist (made again each time: this definition counts)."""
    from core.errors import NovaDRError
    from deployments import automations

    try:
        notify_id = automations.notification_block(notify) if notify else None
    except NovaDRError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2)
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(automations.HEARTBEAT_SECONDS))
    automations.ensure_zombie_automation()
    if notify_id:
        automations.ensure_failure_notification(notify_id)


def deploy(fleet: str = typer.Option(..., "--fleet", help="the fleet file (YAML)"),
           pool: str = typer.Option("nova-dr", "--pool", help="a process work pool (made if missing)"),
           notify: str = typer.Option(None, "--notify", help="a notification block, TYPE/NAME (e.g. "
                                                             "custom-webhook/ops), told of every failed run")) -> None:
    """Create or update a fleet's deployments on a work pool, for `prefect worker start --pool POOL`
    on each worker host (this package installed there). Deletes those of clusters no longer in it,
    and makes the automations: runs whose worker died are marked Crashed; failures are notified."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from cli.fleet_cmd import load_fleet_or_exit
    from deployments import automations
    from deployments.catalog import build_deployments, planned_fleet, prune_fleet

    the_fleet = load_fleet_or_exit(fleet)
    if not os.environ.get("PREFECT_API_URL"):
        typer.secho("error: deploy needs PREFECT_API_URL, the shared server that the workers poll; nothing was "
                    "changed", fg="red", err=True)
        raise typer.Exit(2)
    _automations(notify)  # a bad --notify ends here, before anything is made
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            typer.echo(f"created work pool {pool} (process)")
    for name in prune_fleet(planned_fleet(the_fleet, fleet)):
        typer.echo(f"deleted deployment {name}: its cluster or flow is no longer in the fleet file")
    made = build_deployments(fleet=the_fleet, fleet_path=fleet)
    for d in made:
        # Heartbeats, whatever the worker's own settings: the zombie automation needs them.
        d.job_variables = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(automations.HEARTBEAT_SECONDS)}}
        d.apply(work_pool_name=pool)
    typer.echo(f"{len(made)} deployments on work pool {pool}, automations made; start a worker: "
               f"prefect worker start --pool {pool}")
