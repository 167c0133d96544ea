"""Every flow by its public name (SPEC "Interfaces"), with its plan-only function if it has one."""

from __future__ import annotations

from flows.backup import backup_master_nodes
from flows.compact import compact_history
from flows.continuous import continuous_backup
from flows.cronjob import install_cronjob_backup
from flows.files import restore_files_kopia, restore_files_velero
from flows.fleet import fleet_status
from flows.member import plan_replace, plan_restart, replace_etcd_member, restart_etcd_member
from flows.restore import plan_restore, restore_etcd_cluster
from flows.space import defragment_etcd, plan_defrag, plan_space, recover_etcd_space
from flows.velero import setup_data_protection, velero_backup
from flows.verify import verify_backups

FLOWS = {
    "backup-master-nodes": backup_master_nodes,
    "continuous-backup": continuous_backup,
    "compact-history": compact_history,
    "restore-etcd-cluster": restore_etcd_cluster,
    "replace-etcd-member": replace_etcd_member,
    "restart-etcd-member": restart_etcd_member,
    "recover-etcd-space": recover_etcd_space,
    "defragment-etcd": defragment_etcd,
    "verify-backups": verify_backups,
    "install-cronjob-backup": install_cronjob_backup,
    "setup-data-protection": setup_data_protection,
    "velero-backup": velero_backup,
    "restore-files-velero": restore_files_velero,
    "restore-files-kopia": restore_files_kopia,
    "fleet-status": fleet_status,
}

PLANNERS = {
    "restore-etcd-cluster": plan_restore,
    "replace-etcd-member": plan_replace,
    "restart-etcd-member": plan_restart,
    "recover-etcd-space": plan_space,
    "defragment-etcd": plan_defrag,
}

# Flows with an approval gate: `nova-dr run` answers it at the terminal.
GATED = set(PLANNERS) - {"defragment-etcd"} | {"install-cronjob-backup", "setup-data-protection"}
