"""`nova-dr backups list|fetch|rekey`: the sets in a backup store."""

from __future__ import annotations

from datetime import datetime, timezone

import typer

app = typer.Typer(help="Backup sets in a store (a directory or s3://bucket/prefix).", no_args_is_help=True)
StoreOpt = typer.Option(..., "--store", help="a directory (NFS mount) or s3://bucket/prefix")
InvOpt = typer.Option(None, "--inventory", help="judge completeness against this inventory's masters, and "
                                                "trust the sets its backup_signers signed")
UnsignedOpt = typer.Option(False, "--allow-unsigned", help="accept a set that no trusted key signed (or one with no "
                                                           "manifest); without it, such a set is refused")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(1)


def _names(inventory: str | None) -> list[str] | None:
    if not inventory:
        return None
    from blocks.inventory import resolve_inventory

    return [m.archive_name for m in resolve_inventory(inventory).masters]


def _signers(inventory: str | None) -> list[str]:
    if not inventory:
        return []
    from blocks.inventory import resolve_inventory

    return resolve_inventory(inventory).backup_signers


def _age(dt: datetime) -> str:
    hours = (datetime.now(timezone.utc) - dt).total_seconds() / 3600
    return f"{hours:.1f}h" if hours < 48 else f"{hours / 24:.1f}d"


@app.command("list")
def list_(store: str = StoreOpt, inventory: str = InvOpt, s3_block: str = typer.Option(None, "--s3-block")) -> None:
    """Every set: time, versions, complete or what is missing, verified or not, size, age."""
    from core.errors import NovaDRError
    from core.sets import read_sets
    from tasks.backups import read_manifest, set_masters
    from tasks.storage import open_store

    try:
        st = open_store(store, s3_block)
        sets, orphans = read_sets(st.list())
        names, signers = _names(inventory), _signers(inventory)
        typer.echo(f"{'set':18} {'nova':7} {'k8s':8} {'complete':34} {'manifest':18} {'encrypted':9} {'size':>10} "
                   f"{'age':>7}")
        for s in sets:
            try:
                opened, bad = read_manifest(st, s, signers), False
            except NovaDRError:  # one planted manifest must not hide the other sets
                opened, bad = None, True
            manifest = opened.doc if opened else None
            starvault = (manifest or {}).get("settings", {}).get("INCLUDE_STARVAULT_DB_BACKUP", True)
            missing = s.missing(set_masters(s, manifest, names), starvault)
            state = "yes" if not missing else "missing " + ", ".join(missing)
            verified = ("INVALID" if bad else "none: origin unknown" if opened is None else "signed, trusted" if opened.signer
                        else "UNSIGNED" if "unsigned" in opened.problem else "NOT TRUSTED")
            secret = [f for f in [*s.nodes.values(), s.starvault] if f]
            sealed = sum(f.endswith(".age") for f in secret)
            enc = "yes" if secret and sealed == len(secret) else ("NO" if not sealed else "partly")
            typer.echo(f"{s.ts:18} {s.nova_version:7} {s.k8s_version:8} {state[:34]:34} {verified:18} {enc:9} "
                       f"{s.size:>10} {_age(s.time):>7}")
        if orphans:
            typer.echo(f"\n{len(orphans)} file(s) of ours in no set (left alone): {', '.join(orphans[:5])}")
        if not sets:
            typer.echo("(no backup sets)")
    except NovaDRError as err:
        _fail(err)


@app.command()
def fetch(store: str = StoreOpt, backup: str = typer.Option("latest", "--backup", help="latest or a set's timestamp"),
          to: str = typer.Option(..., "--to", help="folder to download into"), inventory: str = InvOpt,
          s3_block: str = typer.Option(None, "--s3-block"),
          identity_block: str = typer.Option(None, "--identity-block", help="Age Identity block, for encrypted sets"),
          allow_unsigned: bool = UnsignedOpt) -> None:
    """Download one set and check it (sha256s against its manifest; every archive read to its end)."""
    from core.errors import NovaDRError
    from core.sets import read_sets
    from tasks.backups import fetch_set, newest_trusted, passed_note
    from tasks.storage import open_store

    try:
        st = open_store(store, s3_block)
        sets, _ = read_sets(st.list())
        names = _names(inventory)
        from core.sets import choose_set, dated_ahead

        if backup == "latest" and names is None:
            ahead = dated_ahead(sets, datetime.now(timezone.utc))  # never `latest`: see core.sets
            chosen = next((s for s in sets if s not in ahead), None) or choose_set(sets, backup, [], False)
        else:
            chosen, passed = newest_trusted(st, backup, names or [], _signers(inventory), allow_unsigned)
            if passed:
                typer.echo(f"warning: fetching {chosen.ts}; {passed_note(passed)}", err=True)
        report = fetch_set(st, chosen, to, identity_block=identity_block, trusted=_signers(inventory),
                           allow_unsigned=allow_unsigned)
    except NovaDRError as err:
        _fail(err)
    for name in report["files"]:
        typer.echo(f"  {to}/{name}")
    if report["problems"]:
        _fail(NovaDRError(f"set {report['set']}: " + "; ".join(report["problems"])))
    typer.echo(f"set {report['set']}: {report['origin']}; " + (
        "every file verified against its manifest" if report["verified"] else "archives read to their end, unverified"))


@app.command()
def rekey(store: str = StoreOpt,
          to: list[str] = typer.Option(..., "--to", help="a new recipient (age1...), repeatable"),
          identity_block: str = typer.Option(..., "--identity-block",
                                             help="Age Identity block that opens the sets now"),
          backup: str = typer.Option("all", "--backup", help="all, or one set's timestamp"),
          s3_block: str = typer.Option(None, "--s3-block"), inventory: str = InvOpt,
          signing_block: str = typer.Option(None, "--signing-block",
                                            help="Signing Key block, to sign the rewritten manifests"),
          allow_unsigned: bool = UnsignedOpt) -> None:
    """Re-encrypt stored sets to new recipients. Each set's new files are made and checked
    before any old file is replaced; keep the old identity until this has finished."""
    from core.errors import NovaDRError
    from tasks.crypto import identities_from_block, recipients_from, signing_key_from_block
    from tasks.rekey import rekey_store
    from tasks.storage import open_store

    try:
        recipients = recipients_from(to)
        signer = signing_key_from_block(signing_block) if signing_block else None
        done = rekey_store(open_store(store, s3_block), identities_from_block(identity_block), recipients, backup,
                           signer, _signers(inventory), allow_unsigned)
    except NovaDRError as err:
        _fail(err)
    for ts, files in done.items():
        typer.echo(f"set {ts}: " + (f"{len(files)} file(s) re-keyed to {len(to)} recipient(s)" if files
                                     else "nothing encrypted, left as it is"))
