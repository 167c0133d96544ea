"""Every flow as a deployment: the one source of truth for `nova-dr serve`.

Schedules: the backup nightly at 04:00 (off-peak, as the seed advises), the verification at
05:30, after it; defragmentation weekly, Sunday 03:00. Recovery flows have no schedule: people and incident tooling start them.
Parameters that name a cluster or a store default to NOVA_DR_INVENTORY / NOVA_DR_STORE (a
`block:NAME` and a store URL); secrets are only ever referenced by block name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    flow: str
    name: str
    cron: str | None = None
    needs_store: bool = False
    needs_inventory: bool = True
    tags: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)
    stagger: bool = True  # a fleet moves its start by the cluster's offset (core/fleet.py)
    # Scheduled only where asked (NOVA_DR_CONTINUOUS=true; a fleet cluster's `continuous: true`),
    # else on demand: a capture holds a worker's slot all the time, one per cluster.
    opt_in: bool = False


SPECS = [
    Spec("backup-master-nodes", "nightly", "0 4 * * *", needs_store=True, tags=("backup",)),
    # Hourly runs of 61 minutes: one that dies is replaced within the hour, and the hand-off
    # overlaps (segments are resolved by revision) instead of leaving a minute unrecorded.
    # Not staggered in a fleet: each cluster's capture runs all the time, whatever minute it starts.
    Spec("continuous-backup", "continuous", "0 * * * *", needs_store=True, tags=("backup", "history"), stagger=False,
         opt_in=True),
    # Every 6 hours, off the hour: a restore to a point replays at most that much history.
    Spec("compact-history", "every-6h", "20 */6 * * *", needs_store=True, tags=("backup", "history"), stagger=False,
         opt_in=True),
    Spec("verify-backups", "daily-verify", "30 5 * * *", needs_store=True, tags=("backup", "verify")),
    Spec("restore-etcd-cluster", "on-demand", tags=("recovery",)),
    Spec("replace-etcd-member", "on-demand", tags=("recovery",)),
    Spec("restart-etcd-member", "on-demand", tags=("recovery",)),
    Spec("recover-etcd-space", "on-demand", tags=("recovery",)),
    # Sunday 03:00: before the nightly backup, so that the backup takes the smaller file.
    Spec("defragment-etcd", "weekly", "0 3 * * 0", tags=("maintenance",)),
    # The Kubernetes side: reached through the API (kube=block:NAME), not over SSH.
    Spec("install-cronjob-backup", "on-demand", needs_inventory=False, tags=("kubernetes", "backup")),
    Spec("setup-data-protection", "on-demand", needs_inventory=False, tags=("kubernetes", "velero")),
    Spec("velero-backup", "on-demand", needs_inventory=False, tags=("kubernetes", "velero", "backup")),
    Spec("restore-files-velero", "on-demand", needs_inventory=False, tags=("kubernetes", "velero", "recovery")),
    Spec("restore-files-kopia", "on-demand", needs_inventory=False, tags=("kopia", "recovery")),
]


def default_parameters(spec: Spec, env: dict | None = None) -> dict:
    env = os.environ if env is None else env
    params = dict(spec.extra)
    if spec.needs_inventory and env.get("NOVA_DR_INVENTORY"):
        params["inventory"] = env["NOVA_DR_INVENTORY"]
    if spec.needs_store and env.get("NOVA_DR_STORE"):
        params["store"] = env["NOVA_DR_STORE"]
    if not spec.needs_inventory and env.get("NOVA_DR_KUBE"):
        params["kube"] = env["NOVA_DR_KUBE"]
    return params


FLEET_TAG = "nova-dr-fleet"  # marks the deployments a fleet file made: a re-run prunes those of removed clusters


@dataclass(frozen=True)
class Planned:
    """One deployment to create: what build_deployments turns into Prefect's objects."""
    flow: str
    name: str
    cron: str | None
    parameters: dict
    tags: tuple[str, ...]
    concurrency_limit: int | None = None


def planned(env: dict | None = None) -> list[Planned]:
    """This machine's one cluster (NOVA_DR_INVENTORY, NOVA_DR_STORE)."""
    env = os.environ if env is None else env
    continuous = env.get("NOVA_DR_CONTINUOUS", "").lower() in ("1", "true", "yes")
    return [Planned(s.flow, s.name, s.cron if continuous or not s.opt_in else None, default_parameters(s, env),
                    ("nova-dr", *s.tags)) for s in SPECS]


def planned_fleet(fleet, path: str | None = None) -> list[Planned]:
    """Each cluster of a fleet file: every flow as `<flow>/<cluster>`, with that cluster's
    parameters, staggered schedules and concurrency limit. The Kubernetes-side flows only for
    a cluster that names its kube block. With the file's path, fleet-status/fleet too."""
    from core.fleet import cluster_cron

    check_fleet_parameters(fleet)
    out = []
    if path:
        params = {"fleet": os.path.abspath(path), **({"textfile": fleet.metrics_textfile} if fleet.metrics_textfile else {})}
        out.append(Planned("fleet-status", "fleet", fleet.status_cron, params, ("nova-dr", "fleet", FLEET_TAG), 1))
    for c in fleet.clusters:
        for s in SPECS:
            if not s.needs_inventory and not c.kube:
                continue
            params = {**s.extra, **({"inventory": c.inventory} if s.needs_inventory else {"kube": c.kube}),
                      **({"store": c.store} if s.needs_store else {}), **c.parameters.get(s.flow, {})}
            cron = cluster_cron(fleet, c, s.flow, s.cron) if s.cron and s.stagger else s.cron
            if s.opt_in and not c.continuous:
                cron = None
            out.append(Planned(s.flow, c.name, cron, params, ("nova-dr", *s.tags, FLEET_TAG, f"cluster:{c.name}"),
                               c.concurrency_limit))
    return out


def check_fleet_parameters(fleet) -> None:
    """Each cluster's `parameters`: flows that have a deployment per cluster, parameters they
    take and the cluster's own fields do not set. Refused here, in one line, rather than as a
    ParameterBindError in every scheduled run."""
    import difflib
    import inspect

    from core.errors import NovaDRError
    from flows.registry import FLOWS

    specs = {s.flow: s for s in SPECS}
    for c in fleet.clusters:
        for flow, params in c.parameters.items():
            if flow not in specs:
                near = difflib.get_close_matches(flow, list(specs), n=1)
                raise NovaDRError(f"fleet file: clusters[{c.name}].parameters: no flow {flow!r} per cluster"
                                  + (f"; did you mean {near[0]!r}?" if near else ""))
            s = specs[flow]
            own = {"inventory"} if s.needs_inventory else {"kube"}
            own |= {"store"} if s.needs_store else set()
            known = inspect.signature(FLOWS[flow].fn).parameters
            for key in params:
                if key in own:
                    raise NovaDRError(f"fleet file: clusters[{c.name}].parameters.{flow}: {key!r} is set by the "
                                      "cluster's own field")
                if key not in known:
                    near = difflib.get_close_matches(key, list(known), n=1)
                    raise NovaDRError(f"fleet file: clusters[{c.name}].parameters.{flow}: {key!r} is not a parameter"
                                      + (f"; did you mean {near[0]!r}?" if near else ""))


def build_deployments(env: dict | None = None, fleet=None, fleet_path: str | None = None) -> list:
    """RunnerDeployments for prefect.serve(): this machine's cluster, or a fleet's."""
    from prefect.deployments.runner import EntrypointType

    from flows.registry import FLOWS

    out = []
    for p in (planned(env) if fleet is None else planned_fleet(fleet, fleet_path)):
        flow = FLOWS[p.flow]
        out.append(flow.to_deployment(name=p.name, cron=p.cron, parameters=p.parameters, tags=list(p.tags),
                                      concurrency_limit=p.concurrency_limit,
                                      description=(flow.description or "").split("\n")[0],
                                      # by module, so that a worker or runner needs the package, not this folder
                                      entrypoint_type=EntrypointType.MODULE_PATH))
    return out


def prune_fleet(keep: list[Planned]) -> list[str]:
    """Delete the deployments an earlier fleet file made for clusters (or flows) no longer in it.
    Only those tagged FLEET_TAG: deployments made by hand or by plain `serve` stay."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    wanted = {(p.flow, p.name) for p in keep}
    gone = []
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        for d in client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[FLEET_TAG]))):
            if (flows.get(d.flow_id), d.name) not in wanted:
                client.delete_deployment(d.id)
                gone.append(f"{flows.get(d.flow_id)}/{d.name}")
    return sorted(gone)
