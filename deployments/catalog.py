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


SPECS = [
    Spec("backup-master-nodes", "nightly", "0 4 * * *", needs_store=True, tags=("backup",)),
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


def build_deployments(env: dict | None = None) -> list:
    """RunnerDeployments for prefect.serve()."""
    from prefect.deployments.runner import EntrypointType

    from flows.registry import FLOWS

    out = []
    for spec in SPECS:
        flow = FLOWS[spec.flow]
        out.append(flow.to_deployment(name=spec.name, cron=spec.cron, parameters=default_parameters(spec, env),
                                      tags=["nova-dr", *spec.tags], description=(flow.description or "").split("\n")[0],
                                      # by module, so that a worker or runner needs the package, not this folder
                                      entrypoint_type=EntrypointType.MODULE_PATH))
    return out
