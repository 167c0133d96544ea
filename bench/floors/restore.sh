#!/bin/bash
# Full restore, as an operator would script the runbook with OpenSSH: copy the snapshot to
# every master, stop etcd (the followers, then the leader), move the member dir aside,
# restore, start every member, wait until healthy. Each phase on every master at once.
#     restore.sh SNAPSHOT.db TOKEN
. "$(dirname "$0")/lib.sh"
SNAP=$1 TOKEN=$2
IC=$(initial_cluster)
first=$(members | head -1)
leader_url=$(on "$first" "$CTL endpoint status --cluster -w simple" | awk -F', ' '$5 == "true" {print $1}')
leader=$(awk -v u="$leader_url" '$5 == u {print $1}' <<<"$FLOOR_MASTERS")
followers=$(members | grep -vx "$leader" || true)  # none with one master

copy() { put "$1" "$SNAP" floor.db; }
stop() { on "$1" "systemctl stop etcd"; }
restore() {
    on "$1" "set -e; d=/var/lib/etcd; mkdir -p \$d/floor-old; rm -rf \$d/floor-old/member \$d/floor-new
             mv \$d/member \$d/floor-old/
             /opt/etcd/etcdutl snapshot restore ~$FLOOR_USER/floor.db --data-dir \$d/floor-new --name $1 \
                 --initial-cluster $IC --initial-cluster-token $TOKEN \
                 --initial-advertise-peer-urls $(field "$1" 4) >/dev/null 2>&1
             mv \$d/floor-new/member \$d/ && chown -R etcd: \$d/member && rm -rf \$d/floor-new ~$FLOOR_USER/floor.db"
}
start() { on "$1" "systemctl start etcd"; }

each copy $(members)
each stop $followers
stop "$leader"
each restore $(members)
each start $(members)
wait_healthy
