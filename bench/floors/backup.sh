#!/bin/bash
# Backup, as an operator would script it with OpenSSH: `etcdctl snapshot save` and
# `tar -czf` on the first master, a `tar -czf` of each master's files (PKI, encryption
# config, unseal tokens), every archive fetched with scp into the store directory, the
# masters at once.
#     backup.sh STORE_DIR
. "$(dirname "$0")/lib.sh"
STORE=$1
first=$(members | head -1)
home="~$FLOOR_USER"

snapshot() {
    on "$first" "set -e; ${CTL/\/opt/ETCDCTL_ENDPOINTS=$(field "$first" 5) /opt} snapshot save /var/tmp/floor.db >/dev/null
                 tar -czf $home/floor.db.tar.gz -C /var/tmp floor.db && rm /var/tmp/floor.db
                 chown $FLOOR_USER $home/floor.db.tar.gz"
    get "$first" floor.db.tar.gz "$STORE/etcd_snapshot_floor.db.tar.gz"
    on "$first" "rm -f $home/floor.db.tar.gz"
}
node() {
    on "$1" "set -e; tar -czf $home/floor-node.tar.gz -C / etc/kubernetes/pki etc/kubernetes/encryption-config.yaml \
                 etc/starvault/unseal-tokens; chown $FLOOR_USER $home/floor-node.tar.gz"
    get "$1" floor-node.tar.gz "$STORE/$1-floor.tar.gz"
    on "$1" "rm -f $home/floor-node.tar.gz"
}

snapshot & s=$!
each node $(members)
wait $s
