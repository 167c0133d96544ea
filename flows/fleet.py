"""`fleet-status`: every cluster of a fleet file against its RPO target, as a table artifact,
a node_exporter textfile (Prometheus) and `nova-dr fleet status`.

What each row rests on: the newest complete signed set, read from the cluster's own store
(never from a record a flow wrote about it); the last verification and its drill time, from
the artifact verify-backups publishes per cluster and store; the last failure, from the Prefect
API (runs of that cluster's deployments carry the tag cluster:NAME).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from blocks.inventory import resolve_inventory
from core.errors import NovaDRError
from core.fleet import Fleet, FleetCluster, load_fleet, rpo_state, verify_key
from core.plan import size_text
from tasks.backups import newest_trusted, read_manifest
from tasks.storage import open_store

FLOW_NAME = "fleet-status"
FAILED_SINCE = timedelta(days=7)


@dataclass
class Posture:
    cluster: str
    state: str = "red"
    why: str = ""
    rpo_hours: float = 0
    backup: str = ""  # the set's timestamp
    backup_at: float | None = None  # unix seconds
    backup_bytes: int = 0
    encrypted: bool = False
    signed: bool = False
    verified: str = ""  # pass / fail / never
    verified_at: float | None = None
    verified_set_at: float | None = None
    drill_seconds: float | None = None
    last_failure: str = ""
    last_failure_at: float | None = None
    failures: dict | None = None  # flow -> failed runs in FAILED_SINCE

    def row(self, now: datetime) -> dict:
        def age(ts):
            return "" if ts is None else f"{(now.timestamp() - ts) / 3600:.1f} h"
        return {"cluster": self.cluster, "RPO": self.state.upper(), "why": self.why, "newest backup": self.backup or "none",
                "age": age(self.backup_at), "target": f"{self.rpo_hours:g} h",
                "size": size_text(self.backup_bytes) if self.backup_bytes else "",
                "encrypted": "yes" if self.encrypted else "NO", "signed": "yes" if self.signed else "NO",
                "verified": f"{self.verified} {age(self.verified_at)} ago".strip() if self.verified_at else self.verified,
                "drill (RTO)": "" if self.drill_seconds is None else f"{self.drill_seconds:.1f} s",
                "last failure": self.last_failure}


def _param(c: FleetCluster, name: str) -> str | None:
    for f in ("verify-backups", "backup-master-nodes"):
        if c.parameters.get(f, {}).get(name):
            return c.parameters[f][name]
    return None


def backup_facts(p: Posture, c: FleetCluster) -> tuple[str, str]:
    """The newest complete signed set in the cluster's store, into `p`. Returns the inventory's
    cluster name and the store's URL: what verify-backups keys its outcome by."""
    cluster = resolve_inventory(c.inventory)
    st = open_store(c.store, _param(c, "s3_block"))
    try:
        s, _ = newest_trusted(st, "latest", [m.archive_name for m in cluster.masters], cluster.backup_signers, False)
    except NovaDRError as err:
        p.why = str(err).split(". If you know")[0][:300]
        return cluster.name, st.url
    opened = read_manifest(st, s, cluster.backup_signers) if cluster.backup_signers else None
    p.signed = opened is not None and opened.problem is None
    if cluster.backup_signers and not p.signed:  # newest_trusted only passes such a set with no signers
        p.why = f"{s.ts}: {opened.problem if opened else 'no manifest'}"
        return cluster.name, st.url
    p.backup, p.backup_at, p.backup_bytes, p.encrypted = s.ts, s.time.timestamp(), s.size, bool(s.encrypted)
    return cluster.name, st.url


def verification_facts(p: Posture, client, key: str) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                  sort=ArtifactSort.CREATED_DESC, limit=1)
    if not found:
        p.verified = "never"
        return
    data = found[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    row = rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}
    p.verified = str(row.get("result", "unknown"))
    p.verified_at = found[0].created.timestamp() if found[0].created else None
    p.verified_set_at = _float(row.get("set_at"))
    p.drill_seconds = _float(row.get("drill_seconds"))


def _float(v) -> float | None:
    try:
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return None


def failure_facts(p: Posture, client, flow_names: dict, now: datetime) -> None:
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterStartTime, FlowRunFilterState,
                                                FlowRunFilterStateType, FlowRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=[f"cluster:{p.cluster}"]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED])),
        start_time=FlowRunFilterStartTime(after_=now - FAILED_SINCE)), sort=FlowRunSort.START_TIME_DESC, limit=200)
    p.failures = {}
    for r in runs:
        name = flow_names.get(r.flow_id, "?")
        p.failures[name] = p.failures.get(name, 0) + 1
    if runs:
        r = runs[0]
        when = r.end_time or r.start_time
        p.last_failure_at = when.timestamp() if when else None
        at = f"{when:%Y-%m-%d %H:%M} UTC" if when else "(never started)"
        p.last_failure = (f"{flow_names.get(r.flow_id, '?')} {r.state.type.value if r.state else ''} {at}: "
                          f"{(r.state.message if r.state else '') or ''}")[:300]


def fleet_posture(fleet: Fleet, now: datetime | None = None) -> list[Posture]:
    """One Posture per cluster. A cluster whose inventory or store cannot be read is red and
    says why; the others are still read."""
    from prefect.client.orchestration import get_client

    now = now or datetime.now(timezone.utc)
    out = []
    with get_client(sync_client=True) as client:
        flow_names = {f.id: f.name for f in client.read_flows()}
        for c in fleet.clusters:
            p = Posture(cluster=c.name, rpo_hours=fleet.rpo_of(c))
            try:
                name, url = backup_facts(p, c)
                verification_facts(p, client, verify_key(name, url))
            except NovaDRError as err:
                p.why = str(err)[:300]
            failure_facts(p, client, flow_names, now)
            ok = None if p.verified in ("never", "") else p.verified != "fail"
            state, why = rpo_state(None if p.backup_at is None else datetime.fromtimestamp(p.backup_at, timezone.utc),
                                   p.rpo_hours, ok, now)
            p.state, p.why = state, p.why or why
            out.append(p)
    return out


def write_metrics(rows: list[Posture], path: str) -> None:
    """A node_exporter textfile (written whole, then renamed: a scrape never sees half)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    reg = CollectorRegistry()

    def gauge(name: str, doc: str, labels=("cluster",)) -> Gauge:
        return Gauge(name, doc, labels, registry=reg)

    g = {n: gauge(n, d) for n, d in [
        ("nova_dr_last_backup_timestamp_seconds", "the newest complete signed backup set, unix time"),
        ("nova_dr_backup_size_bytes", "the newest complete signed backup set's size"),
        ("nova_dr_rpo_target_seconds", "the cluster's RPO target"),
        ("nova_dr_rpo_ok", "1 when the newest backup is within the RPO target"),
        ("nova_dr_last_verification_timestamp_seconds", "when verify-backups last ran to an outcome"),
        ("nova_dr_last_verified_backup_timestamp_seconds", "the newest set a verification passed, unix time"),
        ("nova_dr_last_verification_ok", "1 when the last verification (with its restore drill) passed"),
        ("nova_dr_restore_drill_duration_seconds", "the last drill's restore into a scratch etcd (RTO)"),
        ("nova_dr_backup_encrypted", "1 when the newest set's secrets are encrypted"),
        ("nova_dr_backup_signed", "1 when a trusted key signed the newest set")]}
    failed = gauge("nova_dr_failed_flow_runs", f"failed or crashed runs in the last {FAILED_SINCE.days} days",
                   ("cluster", "flow"))
    for p in rows:
        def put(name, value):
            if value is not None:
                g[name].labels(p.cluster).set(value)
        put("nova_dr_last_backup_timestamp_seconds", p.backup_at)
        put("nova_dr_backup_size_bytes", p.backup_bytes if p.backup_at else None)
        put("nova_dr_rpo_target_seconds", p.rpo_hours * 3600)
        put("nova_dr_rpo_ok", int(p.backup_at is not None and p.state != "red"))
        put("nova_dr_last_verification_timestamp_seconds", p.verified_at)
        put("nova_dr_last_verified_backup_timestamp_seconds", p.verified_set_at if p.verified == "pass" else None)
        put("nova_dr_last_verification_ok", None if p.verified in ("never", "") else int(p.verified == "pass"))
        put("nova_dr_restore_drill_duration_seconds", p.drill_seconds)
        put("nova_dr_backup_encrypted", int(p.encrypted) if p.backup_at else None)
        put("nova_dr_backup_signed", int(p.signed) if p.backup_at else None)
        for name, n in (p.failures or {}).items():
            failed.labels(p.cluster, name).set(n)
    write_to_textfile(path, reg)


@flow(name=FLOW_NAME, log_prints=True)
def fleet_status(fleet: str, textfile: str | None = None) -> list[dict]:
    """Every cluster of the fleet file against its RPO target: the table artifact
    `nova-dr-fleet-status`, and (with textfile) Prometheus metrics for node_exporter.

    Args:
        fleet: the fleet file (YAML)
        textfile: where to write the metrics, e.g. /var/lib/node_exporter/textfile/nova_dr.prom
    """
    log = get_run_logger()
    rows = fleet_posture(load_fleet(fleet))
    now = datetime.now(timezone.utc)
    create_table_artifact(table=[p.row(now) for p in rows], key="nova-dr-fleet-status",
                          description="each cluster's newest backup against its RPO target")
    if textfile:
        write_metrics(rows, textfile)
    for p in rows:
        log.info("%-24s %-5s %s", p.cluster, p.state.upper(), p.why)
    return [asdict(p) for p in rows]
