"""`nova-dr fleet`: a fleet file's deployments, and every cluster's posture against its RPO."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import typer

app = typer.Typer(help="Many clusters from one fleet file.", no_args_is_help=True)

FLEET = typer.Option(..., "--fleet", help="the fleet file (YAML)")


def load_fleet_or_exit(path: str):
    """The fleet file, checked whole (its crons, and each parameter against its flow) before
    anything is made or read; a mistake is one line and exit 2."""
    from core.errors import NovaDRError
    from core.fleet import load_fleet
    from deployments.catalog import planned_fleet

    try:
        fleet = load_fleet(path)
        planned_fleet(fleet)
        return fleet
    except NovaDRError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2)


@app.command("plan")
def plan(fleet: str = FLEET) -> None:
    """The deployments `nova-dr serve --fleet` makes, with their schedules. Changes nothing."""
    from deployments.catalog import planned_fleet
    from flows.machinery import render_table

    rows = [[f"{p.flow}/{p.name}", p.cron or "on demand", " ".join(f"{k}={v}" for k, v in p.parameters.items())]
            for p in planned_fleet(load_fleet_or_exit(fleet), fleet)]
    typer.echo(render_table(["deployment", "schedule (UTC)", "parameters"], rows, markdown=False))


@app.command("status")
def status(fleet: str = FLEET,
           textfile: str = typer.Option(None, "--textfile", help="also write Prometheus metrics for node_exporter"),
           as_json: bool = typer.Option(False, "--json", help="one JSON object per cluster")) -> None:
    """Each cluster: its newest backup against the RPO target, the last verification and drill
    time, encryption and signing, the last failure. Exit 1 when a cluster is red."""
    from flows.fleet import fleet_posture, write_metrics
    from flows.machinery import render_table

    rows = fleet_posture(load_fleet_or_exit(fleet))
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


@app.command("state")
def state(name: str = typer.Option(..., "--name", help="block name: use as NOVA_DR_STATE=block:NAME"),
          url: str = typer.Option(..., "--url", help="s3://bucket/prefix, or a directory every worker mounts"),
          s3_block: str = typer.Option(None, "--s3-block", help="a Nova Backup S3 Credentials block")) -> None:
    """Save the state store every worker shares (checkpoints, finished recoveries), with a new
    signing key. Refuses to replace an existing one: its records would no longer be trusted."""
    from blocks.state import StateStore
    from core.errors import NovaDRError

    try:
        StateStore.load(name)
    except ValueError:
        pass
    else:
        typer.secho(f"error: state store block {name!r} exists; its key signs the records already written. Pick "
                    "another name, or delete it first (prefect block delete) if nothing uses it", fg="red", err=True)
        raise typer.Exit(2)
    block = StateStore(url=url, s3_block=s3_block)
    try:
        block.write("nova-dr-state-check", b"ok")  # reachable and writable, before anyone relies on it
        if block.read("nova-dr-state-check") != b"ok":
            raise NovaDRError(f"state {url}: what was written does not read back")
    except NovaDRError as err:
        typer.secho(f"error: {err}; nothing was saved", fg="red", err=True)
        raise typer.Exit(1)
    block.save(name)
    typer.echo(f"saved: set NOVA_DR_STATE=block:{name} on every worker")
