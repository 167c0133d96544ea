"""`nova-dr lock show|release`: the cluster lock on the masters, for an operator's hands."""

from __future__ import annotations

import typer

app = typer.Typer(help="The cluster lock (one recovery per cluster) on the masters.", no_args_is_help=True)
InvOpt = typer.Option(..., "--inventory", help="inventory YAML or block:NAME")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def _read_all(inventory: str):
    """(master, lock file, holder or None, why unreadable) for every master that answers."""
    from blocks.inventory import resolve_inventory
    from core.errors import NovaDRError
    from core.lock import LockUnreadable, parse_holder
    from tasks.lock import read_lock
    from tasks.remote import connect

    try:
        cluster = resolve_inventory(inventory)
    except NovaDRError as err:
        _fail(str(err))
    out = []
    for m in cluster.masters:
        try:
            conn = connect(cluster, m)
        except NovaDRError as err:
            out.append((m, None, None, str(err)))
            continue
        try:
            f = read_lock(conn, m, cluster.name)
            try:
                out.append((m, f, parse_holder(f.text), ""))
            except LockUnreadable as err:
                out.append((m, f, None, f"not a nova-dr lock record: {err}"))
        except NovaDRError as err:
            out.append((m, None, None, str(err)))
        finally:
            conn.close()
    return cluster, out


@app.command()
def show(inventory: str = InvOpt) -> None:
    """Who holds the cluster, as each master's lock file says. Changes nothing."""
    from tasks.lock import lock_path

    cluster, rows = _read_all(inventory)
    for m, f, holder, why in rows:
        what = why or (holder.describe(f.now) if holder else "free")
        typer.echo(f"{m.etcd_member:10} {lock_path(m, cluster.name)}: {what}")


@app.command()
def release(inventory: str = InvOpt, yes: bool = typer.Option(False, "--yes", help="do not ask")) -> None:
    """Remove the lock record on every master: for a holder you know is dead. A recovery whose
    process still runs on this machine is refused."""
    from core.errors import NovaDRError
    from flows.lock import holder_alive
    from tasks.lock import remove_lock
    from tasks.remote import connect

    cluster, rows = _read_all(inventory)
    found = [(m, f, h) for m, f, h, why in rows if f is not None and f.sha256 != "none"]
    if not found:
        typer.echo(f"cluster {cluster.name}: no lock on any master that answered; nothing to release")
        return
    for m, f, h in found:
        if h and holder_alive(h):
            _fail(f"{m.etcd_member}: {h.describe(f.now)} still runs here (pid {h.pid}); stop it first. Nothing was "
                  "released")
        typer.echo(f"{m.etcd_member}: {h.describe(f.now) if h else 'an unreadable lock record'}")
    if not yes and not typer.confirm(f"Release the lock of cluster {cluster.name} on these masters?", default=False):
        _fail("not released")
    for m, f, _ in found:
        try:
            conn = connect(cluster, m)
            try:
                r = remove_lock(conn, m, cluster.name, f.sha256)  # only the record shown above
            finally:
                conn.close()
        except NovaDRError as err:
            typer.secho(f"{m.etcd_member}: not released: {err}", fg="red", err=True)
            continue
        typer.echo(f"{m.etcd_member}: " + ("released" if r.result == "done" else
                                            "not released: it changed since it was shown (look again)"))
