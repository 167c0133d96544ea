"""`nova-dr fleet`: a fleet file's deployments, and every cluster's posture against its RPO."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import typer

app = typer.Typer(help="Many clusters from one fleet file.", no_args_is_help=True)

FLEET = typer.Option(..., "--fleet", help="the fleet file (YAML)")


def _fleet(path: str):
    from core.errors import NovaDRError
    from core.fleet import load_fleet

    try:
        return load_fleet(path)
    except NovaDRError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2)


@app.command("plan")
def plan(fleet: str = FLEET) -> None:
    """The deployments `nova-dr serve --fleet` makes, with their schedules. Changes nothing."""
    from deployments.catalog import planned_fleet
    from flows.machinery import render_table

    rows = [[f"{p.flow}/{p.name}", p.cron or "on demand", " ".join(f"{k}={v}" for k, v in p.parameters.items())]
            for p in planned_fleet(_fleet(fleet), fleet)]
    typer.echo(render_table(["deployment", "schedule (UTC)", "parameters"], rows, markdown=False))


@app.command("status")
def status(fleet: str = FLEET,
           textfile: str = typer.Option(None, "--textfile", help="also write Prometheus metrics for node_exporter"),
           as_json: bool = typer.Option(False, "--json", help="one JSON object per cluster")) -> None:
    """Each cluster: its newest backup against the RPO target, the last verification and drill
    time, encryption and signing, the last failure. Exit 1 when a cluster is red."""
    from flows.fleet import fleet_posture, write_metrics
    from flows.machinery import render_table

    rows = fleet_posture(_fleet(fleet))
    now = datetime.now(timezone.utc)
    if textfile:
        write_metrics(rows, textfile)
    if as_json:
        for p in rows:
            typer.echo(json.dumps(p.__dict__))
    else:
        table = [p.row(now) for p in rows]
        typer.echo(render_table(list(table[0]), [list(r.values()) for r in table], markdown=False))
    if any(p.state == "red" for p in rows):
        raise typer.Exit(1)
