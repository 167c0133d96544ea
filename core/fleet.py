"""The fleet file: many clusters in one definition, each with its inventory, its store, its
schedules and its RPO target; and the posture of each cluster against that target.

    stagger_minutes: 60        # the clusters' default start times spread over this window
    rpo_hours: 26              # the default target: a nightly backup plus slack
    metrics_textfile: /var/lib/node_exporter/textfile/nova_dr.prom   # written by fleet-status
    clusters:
      - name: prod-a           # deployments backup-master-nodes/prod-a, restore-etcd-cluster/prod-a, ...
        inventory: block:prod-a
        store: s3://backups/prod-a
        rpo_hours: 6
        backup_cron: "0 */4 * * *"   # given: kept as written, not staggered
        kube: block:prod-a-kube      # the Kubernetes-side flows too (optional)
        continuous: true             # continuous-backup hourly and compact-history every 6 h
        parameters:                  # more parameters, per flow
          backup-master-nodes: {s3_block: prod-a-s3, recipients: ["age1..."]}
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import NovaDRError

NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")
DAY = 24 * 60


class FleetCluster(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    inventory: str
    store: str
    rpo_hours: float | None = Field(default=None, gt=0)
    backup_cron: str | None = None
    verify_cron: str | None = None
    defrag_cron: str | None = None
    kube: str | None = None
    concurrency_limit: int = Field(default=1, ge=1)
    continuous: bool = False  # schedule continuous-backup and compact-history for this cluster
    parameters: dict[str, dict] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.fullmatch(v):
            raise ValueError("use lower-case letters, digits and '-' (at most 40): it names deployments")
        return v


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stagger_minutes: int = Field(default=60, ge=0, le=720)
    rpo_hours: float = Field(default=26, gt=0)
    status_cron: str = "*/15 * * * *"  # fleet-status: the posture artifact and the metrics
    metrics_textfile: str | None = None  # e.g. /var/lib/node_exporter/textfile/nova_dr.prom
    clusters: list[FleetCluster] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Fleet":
        names = [c.name for c in self.clusters]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"cluster names must be unique; twice: {', '.join(twice)}")
        return self

    def rpo_of(self, c: FleetCluster) -> float:
        return c.rpo_hours or self.rpo_hours

    def cluster(self, name: str) -> FleetCluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise NovaDRError(f"no cluster {name!r} in the fleet; its clusters: {', '.join(c.name for c in self.clusters)}")


def parse_fleet(text: str, source: str) -> Fleet:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise NovaDRError(f"fleet file {source}: not YAML ({err})") from None
    if not isinstance(doc, dict):
        raise NovaDRError(f"fleet file {source}: expected a mapping with a 'clusters' list")
    try:
        return Fleet.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        where = _where(first["loc"], doc)
        raise NovaDRError(f"fleet file {source}: {where}: {first['msg']}"
                          + (f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else "")) from None


def _where(loc: tuple, doc: dict) -> str:
    """clusters[1].store, named by the cluster when it has one: clusters[prod-b].store."""
    parts, node = [], doc
    for p in loc:
        if isinstance(p, int):
            name = node[p].get("name") if isinstance(node, list) and p < len(node) and isinstance(node[p], dict) else None
            parts[-1] += f"[{name or p}]"
        else:
            parts.append(str(p))
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "the file"


def load_fleet(path: str) -> Fleet:
    p = Path(path)
    if not p.is_file():
        raise NovaDRError(f"fleet file {path}: no such file")
    return parse_fleet(p.read_text(), path)


# -- schedules ---------------------------------------------------------------------------

def stagger_offset(name: str, window_minutes: int) -> int:
    """A cluster's start delay in minutes: from its name, so adding or removing a cluster never
    moves the others."""
    if window_minutes <= 0:
        return 0
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % window_minutes


def shift_cron(cron: str, minutes: int) -> str:
    """`cron` later by `minutes`. Only a fixed minute and hour can move; past midnight a fixed
    weekday moves on with it. A cron that cannot be shifted exactly is refused, not guessed."""
    fields = cron.split()
    if len(fields) != 5:
        raise NovaDRError(f"cron {cron!r}: write five fields (minute hour day month weekday)")
    if minutes == 0:
        return cron
    minute, hour, dom, month, dow = fields
    if not (minute.isdigit() and hour.isdigit()):
        raise NovaDRError(f"cron {cron!r}: only a fixed minute and hour can be staggered; give this cluster's "
                          "cron explicitly or set stagger_minutes: 0")
    total = int(hour) * 60 + int(minute) + minutes
    if total >= DAY:
        if dow.isdigit() and dom == month == "*":
            dow = str((int(dow) + 1) % 7)
        elif not dom == month == dow == "*":
            raise NovaDRError(f"cron {cron!r} shifted by {minutes} min passes midnight and its day fields cannot "
                              "move with it; give this cluster's cron explicitly")
        total -= DAY
    return f"{total % 60} {total // 60} {dom} {month} {dow}"


def cluster_cron(fleet: Fleet, c: FleetCluster, flow: str, default: str) -> str:
    given = {"backup-master-nodes": c.backup_cron, "verify-backups": c.verify_cron,
             "defragment-etcd": c.defrag_cron}.get(flow)
    if given:
        try:
            return shift_cron(given, 0)  # as written; only its shape is checked here
        except NovaDRError as err:
            raise NovaDRError(f"cluster {c.name}: {err}") from None
    return shift_cron(default, stagger_offset(c.name, fleet.stagger_minutes))


# -- posture -----------------------------------------------------------------------------

def verify_key(cluster_name: str, store_url: str) -> str:
    """The artifact key verify-backups publishes its outcome under (fleet-status reads it): one
    per cluster and store, as Prefect's keys allow (lower-case letters, digits, dashes)."""
    name = re.sub(r"[^a-z0-9-]+", "-", cluster_name.lower()).strip("-")
    return f"verify-backups-outcome-{name}-{hashlib.sha256(store_url.encode()).hexdigest()[:10]}"


GREEN, AMBER, RED = "green", "amber", "red"


def rpo_state(backup_at: datetime | None, rpo_hours: float, verified_ok: bool | None, now: datetime) -> tuple[str, str]:
    """Red: no trusted backup, or the newest is older than the target. Amber: in time, but its
    last verification failed or none ran (a backup never proven to restore). Green: both."""
    if backup_at is None:
        return RED, "no complete signed backup"
    age = (now - backup_at).total_seconds() / 3600
    if age > rpo_hours:
        return RED, f"newest backup {age:.1f} h old, over the {rpo_hours:g} h target"
    if verified_ok is None:
        return AMBER, "in time, never verified"
    if not verified_ok:
        return AMBER, "in time, but its last verification failed"
    return GREEN, f"newest backup {age:.1f} h old, verified"
