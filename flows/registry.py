"""Every flow by its public name (SPEC "Interfaces"), with its plan-only function if it has one."""

from __future__ import annotations

from flows.backup import backup_master_nodes
from flows.member import plan_replace, plan_restart, replace_etcd_member, restart_etcd_member
from flows.restore import plan_restore, restore_etcd_cluster
from flows.verify import verify_backups

FLOWS = {
    "backup-master-nodes": backup_master_nodes,
    "restore-etcd-cluster": restore_etcd_cluster,
    "replace-etcd-member": replace_etcd_member,
    "restart-etcd-member": restart_etcd_member,
    "verify-backups": verify_backups,
}

PLANNERS = {
    "restore-etcd-cluster": plan_restore,
    "replace-etcd-member": plan_replace,
    "restart-etcd-member": plan_restart,
}
