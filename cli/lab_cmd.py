"""`nova-dr lab ...`: the local lab of real masters."""

from __future__ import annotations

import typer

from lab.lab import Lab, LabError

app = typer.Typer(help="A local lab of real masters: hosts with systemd, sshd and etcd 3.5 with TLS.",
                  no_args_is_help=True)
DirOpt = typer.Option(".lab", "--dir", help="the lab's folder")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(1)


@app.command()
def up(dir: str = DirOpt, masters: int = typer.Option(3, "--masters", help="1, 3, 5 or 7"),
       net: int = typer.Option(0, "--net", help="third octet of the masters' addresses (198.18.NET.x)"),
       sudo_password: bool = typer.Option(False, "--sudo-password",
                                          help="the operator's sudo asks for a password (kept in DIR/sudo-password)"),
       bastion: bool = typer.Option(False, "--bastion", help="the inventory reaches the masters through a jump "
                                    "host (198.18.NET.10; 127.0.NET.10 with --loopback)"),
       hosts: bool = typer.Option(True, "--hosts/--loopback", help="each master a host of its own (a network "
                                  "namespace on 198.18.NET.0/24, systemd as PID 1, a real etcd.service with "
                                  "User=etcd), or the older lab of sshds on 127.0.NET.x")) -> None:
    """Build and start the lab (idempotent: a running lab is left as it is). The masters answer
    SSH as `nova`, with root through sudo; root cannot log in."""
    try:
        typer.echo(Lab(dir).up(masters, net, sudo_password, bastion, real_hosts=hosts))
    except LabError as err:
        _fail(err)


@app.command()
def status(dir: str = DirOpt) -> None:
    """Each master: sshd, etcd process, endpoint health."""
    lab = Lab(dir)
    if not lab.state():
        _fail(LabError(f"no lab at {lab.dir}; `nova-dr lab up` first"))
    typer.echo(f"{'member':8} {'address':14} {'sshd':5} {'etcd':5} {'healthy':8} mount-point")
    for r in lab.status():
        typer.echo(f"{r['member']:8} {r['address']:14} {str(r['sshd']):5} {str(r['etcd_process']):5} "
                   f"{str(r['healthy']):8} {r['data_dir_mount_point']}")


@app.command()
def down(dir: str = DirOpt) -> None:
    """Stop every process the lab started, by PID."""
    typer.echo(Lab(dir).down())


@app.command("break")
def break_(member: str, how: str = typer.Option(..., "--how", help="stop | corrupt | wipe"), dir: str = DirOpt) -> None:
    """Inject a failure: stop (the process dies), corrupt (bolt db truncated), wipe (data dir gone)."""
    try:
        typer.echo(Lab(dir).break_member(member, how))
    except LabError as err:
        _fail(err)


@app.command("net")
def net_(member: str, how: str = typer.Argument(..., help="cut | heal | loss | rate"),
         value: float = typer.Argument(None, help="loss: percent of packets dropped; rate: Mbit/s"),
         dir: str = DirOpt) -> None:
    """Inject a network fault between a master and every other host (a `--hosts` lab):
    cut (a partition), loss PCT (random drops both ways), rate MBIT (a slow link), heal."""
    try:
        typer.echo(Lab(dir).net_fault(member, how, value))
    except LabError as err:
        _fail(err)
