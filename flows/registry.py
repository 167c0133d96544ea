"""Every flow by its public name (SPEC "Interfaces"), with its plan-only function if it has one."""

from __future__ import annotations

from flows.restore import plan_restore, restore_etcd_cluster

FLOWS = {
    "restore-etcd-cluster": restore_etcd_cluster,
}

PLANNERS = {
    "restore-etcd-cluster": plan_restore,
}
