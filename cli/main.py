"""The `nova-dr` command line."""

from __future__ import annotations

import typer

from cli import lab_cmd

app = typer.Typer(help="Back up and recover a Nova Container Platform control plane.", no_args_is_help=True)
app.add_typer(lab_cmd.app, name="lab")
