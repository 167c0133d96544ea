"""`nova-dr run|plan|approve`: flows from a terminal, answering the approval gate like
`terraform apply` does."""

from __future__ import annotations

import getpass
import json
import socket
import sys
import threading
import time
from uuid import UUID

import typer

inventory_app = typer.Typer(help="Save an inventory as a Prefect Block (secrets as SecretStr).", no_args_is_help=True)


def parse_params(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--param {p!r}: write key=value")
        try:  # numbers, booleans, null and JSON lists read as such; anything else is a string
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _flow(name: str):
    from flows.registry import FLOWS

    if name not in FLOWS:
        _fail(f"no flow {name!r}; the flows are: {', '.join(sorted(FLOWS))}")
    return FLOWS[name]


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def check_params(name: str, f, params: dict) -> None:
    """A parameter the flow does not take, or an inventory file that is not there: one line,
    before anything starts (Prefect would answer with a ParameterBindError traceback, or the
    missing file would surface later as something else)."""
    import difflib
    import inspect
    from pathlib import Path

    known = list(inspect.signature(f.fn).parameters)
    for key in params:
        if key not in known:
            ranked = sorted(known, key=lambda k: -difflib.SequenceMatcher(None, key.lower(), k.lower()).ratio())
            _fail(f"{name} has no parameter {key!r}; its parameters, the closest first: {', '.join(ranked)}. "
                  "Nothing was changed")
    inventory = params.get("inventory")
    if isinstance(inventory, str) and not inventory.startswith("block:") and not Path(inventory).is_file():
        _fail(f"inventory {inventory}: no such file. Give an inventory YAML or block:NAME (a saved inventory "
              "block). Nothing was changed")


def _terminal_gate(run_id: str, plan) -> None:
    """Called by the flow just before it pauses: show the plan, ask, answer the gate."""

    def ask() -> None:
        from prefect.client.orchestration import get_client

        typer.echo("\n" + plan.text() + "\n")
        answer = typer.prompt("Do you want to perform these actions? Only 'yes' will be accepted", default="no")
        name = getpass.getuser()
        with get_client(sync_client=True) as client:
            while not client.read_flow_run(UUID(run_id)).state.is_paused():
                time.sleep(0.2)
            client.resume_flow_run(UUID(run_id), run_input={
                "approve": answer.strip() == "yes", "name": f"{name} (terminal)",
                "via": f"the terminal of `nova-dr run` ({name}@{socket.gethostname()})",
                "reason": "answered at the terminal" if answer.strip() == "yes" else f"answered {answer!r}"})

    threading.Thread(target=ask, daemon=True).start()


def run(flow: str, inventory: str = typer.Option(None, "--inventory", help="inventory YAML or block:NAME"),
        param: list[str] = typer.Option([], "--param", help="key=value, repeatable"),
        auto_approve: bool = typer.Option(False, "--auto-approve", help="skip the approval gate")) -> None:
    """Run a flow here. Exit 0 only when the run is Completed."""
    from flows import machinery
    from flows.registry import GATED

    f = _flow(flow)
    params = parse_params(param)
    if inventory:
        params["inventory"] = inventory
    if auto_approve and flow not in GATED:
        typer.echo(f"note: {flow} has no approval gate; --auto-approve changes nothing", err=True)
    elif auto_approve:
        params["auto_approve"] = True
    check_params(flow, f, params)

    if flow in GATED and not auto_approve and not params.get("auto_approve"):
        if sys.stdin.isatty():
            machinery.GATE_LISTENERS.append(_terminal_gate)
        elif not machinery.api_is_shared():
            # Said before anything starts: the embedded server would take 20 s only to refuse.
            typer.secho(f"error: {flow} needs an approval and nobody can give it: no terminal and no shared Prefect "
                        "server (PREFECT_API_URL). Run it in a terminal, set PREFECT_API_URL, or pass --auto-approve. "
                        "Nothing was changed", fg="red", err=True)
            raise typer.Exit(1)
    state = f(**params, return_state=True)
    if state.is_completed():
        typer.secho(f"{flow}: Completed", fg="green")
        return
    try:
        state.result()
        message = state.message
    except Exception as err:  # the flow's own error: one line for the operator
        message = str(err)
    typer.secho(f"{flow}: {state.name}: {message}", fg="red", err=True)
    raise typer.Exit(1)


def plan(flow: str, inventory: str = typer.Option(None, "--inventory"),
         param: list[str] = typer.Option([], "--param", help="key=value, repeatable")) -> None:
    """Show what FLOW would do. Reads the cluster; changes nothing."""
    from core.errors import NovaDRError
    from flows.registry import PLANNERS

    f = _flow(flow)
    if flow not in PLANNERS:
        from flows.registry import GATED

        typer.echo(f"{flow}: `nova-dr run {flow}` shows its plan before its approval gate" if flow in GATED
                   else f"{flow} changes nothing on the cluster: there is no plan to show")
        return
    params = parse_params(param)
    if inventory:
        params["inventory"] = inventory
    check_params(flow, f, params)
    try:
        typer.echo(PLANNERS[flow](**params).text())
    except NovaDRError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1)


def approve(run_id: str, reject: bool = typer.Option(False, "--reject"),
            reason: str = typer.Option("", "--reason")) -> None:
    """Answer a paused run's approval gate (needs PREFECT_API_URL: the server the run uses)."""
    from prefect.client.orchestration import get_client

    try:
        rid = UUID(run_id)
    except ValueError:
        typer.secho(f"error: {run_id!r} is not a flow run id (a UUID, shown in the UI and the log)", fg="red", err=True)
        raise typer.Exit(2)
    with get_client(sync_client=True) as client:
        result = client.resume_flow_run(rid, run_input={
            "approve": not reject, "name": getpass.getuser(), "reason": reason,
            "via": f"`nova-dr approve` ({getpass.getuser()}@{socket.gethostname()})"})
    status = str(getattr(result.status, "value", result.status))
    if status.upper() != "ACCEPT":
        why = getattr(result.details, "reason", "") or "the run is not paused at a gate"
        typer.secho(f"error: flow run {run_id}: {status}: {why}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"flow run {run_id}: {'rejected' if reject else 'approved'}")


@inventory_app.command("save")
def inventory_save(file: str, name: str = typer.Option(..., "--name", help="block name: use as block:NAME")) -> None:
    """Save an inventory YAML (with its key and known_hosts) as a ClusterInventory block."""
    from blocks.inventory import ClusterInventory
    from core.errors import NovaDRError

    try:
        ClusterInventory.from_file(file).save(name, overwrite=True)
    except NovaDRError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"saved: use --inventory block:{name}")
