"""restore-files-velero (SPEC P4) and restore-files-kopia (SPEC P5): the Nova Backup Daemon's
files back out of Velero or straight out of Kopia, flat into one directory, as the seed's
operators do, so that restore-etcd-cluster can take that directory as its `store`."""

from __future__ import annotations

import os
import shutil
import stat
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.inventory import resolve_inventory
from blocks.kube import resolve_kube
from blocks.storage import S3Credentials
from core import files as cf
from core import kube as k
from core.errors import NovaDRError
from core.signing import NO_MANIFEST, open_manifest
from core.snapshot import safe_extract
from flows import machinery as mc
from flows.velero import load_block, wait_velero
from tasks.backups import check_files
from tasks.bucket import VeleroBucket
from tasks.kopia import Kopia
from tasks.kube import Kube, wait_for
from tasks.storage import DirectoryStore

VELERO_FLOW = "restore-files-velero"
KOPIA_FLOW = "restore-files-kopia"
SHARED_KEY_WARNING = ("Velero encrypts every Kopia repository it makes with one shared key: whoever can read the "
                      "bucket and knows that key reads every backup. Restrict access to the bucket.")


def prepare_target(to: str) -> Path:
    """An empty (or new) directory: files that are already there are never overwritten."""
    if not to:
        raise NovaDRError("to: name the directory the files go to (it must be empty or not exist)")
    dest = Path(to).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(p for p in dest.iterdir() if not p.name.startswith(".nova-dr-"))):
        raise NovaDRError(f"to={dest}: not an empty directory; choose an empty one so that nothing is overwritten")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def not_regular(d: Path) -> list[str]:
    """What in a restored folder is neither a regular file nor a directory (symlinks above all),
    without following any link: what a repository or a pod gives back is not trusted."""
    out = []
    for root, dirs, files in os.walk(d):  # followlinks=False: a link to a dir is listed, not entered
        for n in dirs + files:
            p = Path(root) / n
            st = p.lstat()
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                out.append(f"{p.relative_to(d)}" + (f" -> {os.readlink(p)}" if p.is_symlink() else ""))
    return out


def gather(dest: Path, parts: dict[str, Path]) -> dict[str, str]:
    """Move the top-level files of each part into dest, after checking that no two parts hold
    the same name, and that no part holds a link or a device: `chmod` (below) and the readers
    after us would follow a link out of the folder (a symlink to /etc/passwd made 0600).
    Returns file -> where it came from."""
    odd = [f"{o}: {x}" for o, d in parts.items() for x in not_regular(d)]
    if odd:
        raise NovaDRError("a source gave back links or special files, which no backup holds; nothing was merged: "
                          + "; ".join(odd[:5]))
    names = {origin: sorted(p.name for p in d.iterdir() if p.is_file()) for origin, d in parts.items()}
    clash = cf.flat_collisions(names)
    if clash:
        raise NovaDRError("two sources hold files of the same name; nothing was merged: " + "; ".join(clash[:5]))
    origin = {}
    for o, d in parts.items():
        for n in names[o]:
            (d / n).replace(dest / n)
            (dest / n).chmod(0o600)
            origin[n] = o
    return origin


def check_set(dest: Path, origin: dict[str, str], inventory: str | None) -> tuple[list[list[str]], list[str], str]:
    """(report rows, problems, who made the set): completeness, one master with both snapshots,
    sha256s when a manifest came along, every archive readable. Files are only brought back
    here, so a set no trusted key signed is said, not refused: restore-etcd-cluster refuses it."""
    files = DirectoryStore(dest).list()
    cluster = resolve_inventory(inventory) if inventory else None
    expected = [m.archive_name for m in cluster.masters] if cluster else cf.masters_in([f.name for f in files])
    s, problems = cf.check_gathered(files, origin, expected)
    for o in sorted(set(origin.values())):
        if not cf.masters_in([n for n, src in origin.items() if src == o]):
            problems.append(f"{o} returned no node archive")
    opened = open_manifest((dest / s.manifest).read_bytes(), s.manifest, cluster.backup_signers if cluster else []) \
        if s.manifest else None
    manifest = opened.doc if opened else None
    problems += check_files([f for f in s.files if f != s.manifest], dest, manifest)
    rows = [[n, origin.get(n, "?"), f"{(dest / n).stat().st_size} B"] for n in s.files]
    made_by = NO_MANIFEST if opened is None else (opened.problem or f"its manifest is signed by {opened.signer}")
    return rows, problems, f"Backup set {s.ts}: {made_by}."


def finish(flow_name: str, dest: Path, rows, problems, notes: list[str]) -> dict:
    report = (f"# {flow_name}\n\nFiles in `{dest}`:\n\n" + mc.render_table(["file", "from", "size"], rows)
              + "".join(f"\n\n> {n}" for n in notes))
    mc.publish(f"{mc.slug(flow_name)}-report", report, "The backup files that came back")
    if problems:
        raise NovaDRError(f"the files in {dest} are not a usable set: " + "; ".join(problems[:8]))
    return {"to": str(dest), "files": [r[0] for r in rows], "notes": notes}


# --- Velero ------------------------------------------------------------------------------------

def resolve_backup(api: Kube, backup: str) -> str:
    if backup == "latest":
        done = [b for b in api.list_cr(k.VELERO, "backups", k.BACKUP_NS, f"velero.io/schedule-name={k.SCHEDULE}")
                if (b.get("status") or {}).get("phase") == "Completed"]
        if not done:
            raise NovaDRError(f"no Completed backup of the {k.SCHEDULE} schedule in {k.BACKUP_NS}; name one with "
                              "backup=NAME")
        return max(done, key=lambda b: b["metadata"]["creationTimestamp"])["metadata"]["name"]
    if api.get_cr(k.VELERO, "backups", k.BACKUP_NS, backup) is None:
        known = sorted(b["metadata"]["name"] for b in api.list_cr(k.VELERO, "backups", k.BACKUP_NS))
        raise NovaDRError(f"no Velero backup named {backup!r} in {k.BACKUP_NS}; known: {', '.join(known[-8:]) or 'none'}")
    return backup


@task(name="copy-pod-files", retries=1, retry_delay_seconds=3, cache_policy=NO_CACHE)
def copy_pod_files(api: Kube, pod: dict, scratch: Path) -> Path:
    """`kubectl cp` the way it works: `tar cf -` in the container, read as binary, extracted safely."""
    name = pod["metadata"]["name"]
    out = scratch / f"{name}.tar"
    with open(out, "wb") as sink:
        code, err = api.exec_to(k.RESTORE_NS, name, k.DAEMON_CONTAINER, ["tar", "cf", "-", "-C", k.DAEMON_DIR, "."],
                                sink)
    if code != 0:
        raise NovaDRError(f"pod {k.RESTORE_NS}/{name}: tar of {k.DAEMON_DIR} exited {code}: {err.strip()[:300]}")
    files = scratch / name
    safe_extract(out, files)
    out.unlink()
    return files


def clean_up(api: Kube, restore: str | None) -> list[str]:
    """Delete the Restore and the restored DaemonSet (its pods go with it). What was left."""
    left = []
    for what, fn in ((f"Restore {k.BACKUP_NS}/{restore}", lambda: restore and api.delete_cr(
                         k.VELERO, "restores", k.BACKUP_NS, restore)),
                     (f"DaemonSet {k.RESTORE_NS}/{k.DAEMONSET}", lambda: api.delete("DaemonSet", k.RESTORE_NS,
                                                                                     k.DAEMONSET))):
        try:
            fn()
        except NovaDRError as err:
            left.append(f"{what} ({err})")
    return left


@flow(name=VELERO_FLOW)
def restore_files_velero(
    backup: str = "latest",
    to: str = "",
    kube: str | None = None,
    s3_block: str | None = None,
    inventory: str | None = None,
    timeout_minutes: float = 30,
    poll_seconds: float = 5.0,
) -> dict:
    """Restore a Velero backup into nova-cluster-restore (the live daemon keeps running), copy
    /opt/backup out of each restored daemon pod into `to`, check the set, clean up."""
    log = get_run_logger()
    dest = prepare_target(to)
    api = Kube(resolve_kube(kube))
    name = resolve_backup(api, backup)
    if api.read("DaemonSet", k.RESTORE_NS, k.DAEMONSET) is not None:
        raise NovaDRError(f"DaemonSet {k.RESTORE_NS}/{k.DAEMONSET} already exists (left by an earlier restore?): "
                          f"its files could mix with this backup's; delete it (`kubectl -n {k.RESTORE_NS} delete ds "
                          f"{k.DAEMONSET}`) and run again. Nothing was changed")
    restore = f"nova-dr-files-{name}"[:50] + datetime.now(timezone.utc).strftime("-%H%M%S")
    scratch = dest / f".nova-dr-{restore}"
    created, made_scratch = None, False
    try:
        api.create_cr(k.VELERO, "restores", {
            "apiVersion": "/".join(k.VELERO), "kind": "Restore", "metadata": {"name": restore, "namespace": k.BACKUP_NS},
            "spec": {"backupName": name, "includedNamespaces": [k.BACKUP_NS],
                     "namespaceMapping": {k.BACKUP_NS: k.RESTORE_NS}}})
        created = restore
        log.info("Restore %s/%s of backup %s created", k.BACKUP_NS, restore, name)
        ok, why = wait_velero(api, "restores", restore, k.RESTORE_FAILED, timeout_minutes, poll_seconds)
        notes = [f"Velero restore {restore} of backup {name}: {why}"]
        if s3_block:
            bsl = api.get_cr(k.VELERO, "backupstoragelocations", k.BACKUP_NS, "default") or {"spec": {}}
            storage = (bsl["spec"].get("objectStorage") or {})
            if storage.get("bucket"):
                bucket = VeleroBucket(load_block(S3Credentials, s3_block, "s3_block").session(), storage["bucket"],
                                      storage.get("prefix", ""))
                notes += k.results_messages(bucket.read_json(f"restores/{restore}/restore-{restore}-results.gz",
                                                             gz=True) or {})
        if not ok:
            raise NovaDRError(f"Restore {k.BACKUP_NS}/{restore}: {why}" + "".join(f"; {n}" for n in notes[1:6]))

        def pods_running():
            pods = api.pods(k.RESTORE_NS, k.DAEMON_LABEL)
            running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
            if pods and len(running) == len(pods):
                return True, running
            return False, f"{len(running)} of {len(pods)} Running: " + ", ".join(
                f"{p['metadata']['name']} {(p.get('status') or {}).get('phase', '?')}" for p in pods)

        pods = wait_for(f"restored {k.DAEMONSET} pods in {k.RESTORE_NS} Running", pods_running,
                        timeout_minutes * 60, poll_seconds)
        scratch.mkdir(mode=0o700)  # never an existing dir: only what this run made is removed below
        made_scratch = True
        futures = {f"pod {p['metadata']['name']} on {p['spec'].get('nodeName', '?')}": copy_pod_files.submit(
            api, p, scratch) for p in pods}
        for f in futures.values():  # every copy ends (retries included) before the scratch dir may go
            f.wait()
        parts = {o: f.result() for o, f in futures.items()}
        origin = gather(dest, parts)
        rows, problems, made_by = check_set(dest, origin, inventory)
        notes.append(made_by)
    finally:
        if made_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        left = clean_up(api, created) if created else []
        if left:
            log.error("clean-up left behind: %s", "; ".join(left))
    if left:
        problems = problems + [f"clean-up left behind: {'; '.join(left)}"]
    return finish(VELERO_FLOW, dest, rows, problems, notes)


# --- Kopia ---------------------------------------------------------------------------------------

def daemon_nodes(kube: str | None) -> tuple[dict[str, str], str]:
    """pod UID and pod name -> node of the nova-backup-daemon pods, when the API answers (it will not in a
    full etcd restore). Returns the map and how the sources were named."""
    try:
        api = Kube(resolve_kube(kube))
        pods = api.call(f"list pods in {k.BACKUP_NS}", api.core.list_namespaced_pod, k.BACKUP_NS,
                        label_selector=k.DAEMON_LABEL, _request_timeout=10)["items"]
    except NovaDRError as err:
        return {}, f"the Kubernetes API did not answer ({err}); sources named by the archives inside them"
    # by UID (Velero's pod-uid tag, or a 1.16 source path) and by name (a 1.17+ source path)
    return ({key: p["spec"].get("nodeName", "?") for p in pods for key in (p["metadata"]["uid"], p["metadata"]["name"])},
            f"sources named by the {len(pods)} {k.DAEMONSET} pods")


@flow(name=KOPIA_FLOW)
def restore_files_kopia(
    to: str = "",
    s3_block: str | None = None,
    bucket: str | None = None,
    prefix: str = k.KOPIA_PREFIX,
    password_block: str | None = None,
    point: str = "latest",
    kube: str | None = None,
    inventory: str | None = None,
    kopia_bin: str | None = None,
) -> dict:
    """Straight from Kopia, no Velero: per source the snapshot at or before `point`, restored,
    named by its master, moved into `to`, checked. The repository is always disconnected."""
    from prefect.blocks.system import Secret

    log = get_run_logger()
    when = cf.parse_point(point)
    if not bucket:
        raise NovaDRError("bucket: name the bucket that holds the Kopia repository")
    creds = load_block(S3Credentials, s3_block, "s3_block")
    if not creds.endpoint_url:
        raise NovaDRError(f"s3_block {s3_block}: set endpoint_url (kopia needs the S3 endpoint)")
    password = load_block(Secret, password_block, "password_block").get()
    dest = prepare_target(to)
    work = dest / f".nova-dr-kopia-{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    kopia = Kopia(work, str(password), creds.access_key_id, creds.secret_access_key.get_secret_value(), kopia_bin)
    try:
        try:  # a connect that fails half way is disconnected too
            kopia.connect_s3(bucket, prefix, creds.endpoint_url, creds.region_name)
            chosen, notes = cf.choose_snapshots(cf.parse_kopia_snapshots(kopia.snapshots()), when)
            pods, naming = daemon_nodes(kube)
            parts = {}
            for i, (path, snap) in enumerate(sorted(chosen.items())):
                target = work / f"source-{i}"
                kopia.restore(snap.id, target)
                master = cf.name_source(snap, pods, [p.name for p in target.iterdir() if p.is_file()])
                parts[f"{master} (snapshot {snap.id} {snap.start:%Y-%m-%d %H:%M}Z)"] = target
                log.info("source %s -> master %s, snapshot %s", path, master, snap.id)
        finally:
            try:
                kopia.disconnect()
            except NovaDRError as err:  # the private config goes with `work` below either way
                log.warning("%s", err)
        origin = gather(dest, parts)
        rows, problems, made_by = check_set(dest, origin, inventory)
        notes.append(made_by)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return finish(KOPIA_FLOW, dest, rows, problems, [naming, *notes, SHARED_KEY_WARNING])
