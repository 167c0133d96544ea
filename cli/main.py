"""The `nova-dr` command line: run, plan and approve flows; the lab; backups."""

from __future__ import annotations

import os

# Before Prefect is imported: no telemetry from a closed network, and room for the embedded
# server's first start (its migrations take ~20 s on 2 cores).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from cli.server_secrets import client_auth_from_file  # noqa: E402

client_auth_from_file()

import typer  # noqa: E402

from cli import backups_cmd, fleet_cmd, lab_cmd, lock_cmd, run_cmd, serve_cmd  # noqa: E402

app = typer.Typer(help="Back up and recover a Nova Container Platform control plane.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(lab_cmd.app, name="lab")
app.command("run")(run_cmd.run)
app.command("plan")(run_cmd.plan)
app.command("approve")(run_cmd.approve)
app.command("serve")(serve_cmd.serve)
app.command("deploy")(serve_cmd.deploy)
app.add_typer(run_cmd.inventory_app, name="inventory")
app.add_typer(backups_cmd.app, name="backups")
app.add_typer(lock_cmd.app, name="lock")
app.add_typer(fleet_cmd.app, name="fleet")
