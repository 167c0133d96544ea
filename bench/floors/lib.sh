# What every OpenSSH floor shares: how to reach a master, and etcdctl there.
# The caller (bench/common.py) exports:
#   FLOOR_KEY, FLOOR_KNOWN_HOSTS, FLOOR_USER   the operator's key, known_hosts and login
#   FLOOR_MASTERS   one line per master: MEMBER SSH_HOST SSH_PORT PEER_URL CLIENT_URL
# Plain OpenSSH as an operator would run it: strict host keys, one connection per command
# (no ControlMaster), sudo on the master.
set -euo pipefail

SSH_OPTS=(-o BatchMode=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$FLOOR_KNOWN_HOSTS"
          -o IdentitiesOnly=yes -i "$FLOOR_KEY" -o LogLevel=ERROR)

members() { awk '{print $1}' <<<"$FLOOR_MASTERS"; }
field() { awk -v m="$1" -v f="$2" '$1 == m {print $f}' <<<"$FLOOR_MASTERS"; }

# on MEMBER 'shell command run as root there'
on() {
    local m=$1; shift
    local cmd="$*"
    # single quotes for the master's /bin/sh (bash's printf %q may write $'...', which dash reads wrongly)
    ssh "${SSH_OPTS[@]}" -p "$(field "$m" 3)" "$FLOOR_USER@$(field "$m" 2)" "sudo -n sh -c '${cmd//\'/\'\\\'\'}'"
}

# put MEMBER LOCAL REMOTE (into the login's home; scp, as the runbook says)
put() { scp -q "${SSH_OPTS[@]}" -P "$(field "$1" 3)" "$2" "$FLOOR_USER@$(field "$1" 2):$3"; }
# get MEMBER REMOTE LOCAL
get() { scp -q "${SSH_OPTS[@]}" -P "$(field "$1" 3)" "$FLOOR_USER@$(field "$1" 2):$2" "$3"; }

# etcdctl as configured in the master's /etc/etcd.env
CTL='set -a; . /etc/etcd.env; set +a; /opt/etcd/etcdctl'

# every MEMBER at once: each_master FUNCTION [MEMBERS...]
each() {
    local fn=$1 pids=() m; shift
    for m in "$@"; do "$fn" "$m" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p"; done
}

wait_healthy() {
    local first; first=$(members | head -1)
    for _ in $(seq 1 600); do
        on "$first" "$CTL endpoint health --cluster --command-timeout=2s" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "not healthy after 120 s" >&2; return 1
}

initial_cluster() { awk '{printf "%s%s=%s", (NR>1 ? "," : ""), $1, $4}' <<<"$FLOOR_MASTERS"; }
