#!/bin/bash
# Member replacement, as etcd's runbook does it by hand with OpenSSH (SPEC P7): from a healthy
# member, `member remove` the broken one and `member add` it back; on the broken master,
# clear the data dir (made again, etcd's own, if it is gone), set ETCD_INITIAL_CLUSTER_STATE=existing, start; wait until healthy.
#     replace.sh HEALTHY_MEMBER VICTIM_MEMBER
. "$(dirname "$0")/lib.sh"
H=$1 V=$2
id=$(on "$H" "$CTL member list -w simple" | awk -F', ' -v v="$V" '$3 == v {print $1}')
on "$H" "$CTL member remove $id" >/dev/null
# Right after a remove, an add can time out while a leader is elected: retry, as etcd's docs say.
for _ in $(seq 1 20); do
    on "$H" "$CTL member add $V --peer-urls=$(field "$V" 4)" >/dev/null 2>&1 && break
    sleep 0.5
done
on "$V" "rm -rf /var/lib/etcd/member && install -d -o etcd -g etcd -m 700 /var/lib/etcd && sed -i 's/^ETCD_INITIAL_CLUSTER_STATE=.*/ETCD_INITIAL_CLUSTER_STATE=existing/' /etc/etcd.env && systemctl reset-failed etcd; systemctl start etcd"
wait_healthy
