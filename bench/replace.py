"""Member replacement: replace-etcd-member against etcd's own rejoin, in one run on a lab.

Each round wipes the same member (`lab break --how wipe`), then a floor does by hand what
SPEC P7 says (member list, member remove, member add, clear the data dir,
ETCD_INITIAL_CLUSTER_STATE=existing, start, wait until healthy), as a bash script with
OpenSSH (bench/floors/replace.sh) or over our own SSH connections, or the flow does it with
its checks, quarantine and verification. Each runs over every link profile asked for
(lab/links.py). Prints medians and the ratios.

    .venv/bin/python bench/replace.py [--masters 3] [--mb 10] [--runs 3] [--links loopback,dr-site]
"""

from __future__ import annotations

import json
import time

from pathlib import Path

from common import BenchLab, FlowTimes, Link, Timed, fill, parse, report  # noqa: E402  (sets up sys.path and the environment first)
from lab.lab import Lab  # noqa: E402

VICTIM = "etcd2"


def own_floor(lab: Lab, inventory: Path) -> None:
    from core.etcd import etcdctl_env, parse_env_file
    from core.inventory import load_inventory_file
    from tasks.remote import connect

    cluster = load_inventory_file(inventory)
    healthy, victim = cluster.master("etcd1"), cluster.master(VICTIM)
    h, v = connect(cluster, healthy), connect(cluster, victim)
    try:
        env = parse_env_file(h.run(["cat", healthy.paths.etcd_env]).stdout)

        def ctl(*args):
            return h.run([*etcdctl_env(env, [healthy.client_url]), healthy.paths.etcdctl, *args], timeout=60)

        members = json.loads(ctl("member", "list", "-w", "json").stdout)["members"]
        old = next(m for m in members if m.get("name") == victim.etcd_member)
        ctl("member", "remove", format(old["ID"], "x"))
        for attempt in range(20):  # right after a remove, an add can time out while a leader is elected
            r = h.run([*etcdctl_env(env, [healthy.client_url]), healthy.paths.etcdctl, "member", "add",
                       victim.etcd_member, f"--peer-urls={victim.peer_url}"], check=False, timeout=60)
            if r.code == 0:
                break
            time.sleep(0.5)
        d = victim.paths.data_dir
        v.run(["sh", "-c", f"rm -rf {d}/member && sed -i 's/^ETCD_INITIAL_CLUSTER_STATE=.*/"
                           f"ETCD_INITIAL_CLUSTER_STATE=existing/' {victim.paths.etcd_env}"])
        v.run(["sh", "-c", f"install -d -o etcd -g etcd -m 700 {d} && systemctl reset-failed etcd; "
                           "systemctl start etcd"])
        lab.wait_healthy(120)
    finally:
        h.close()
        v.close()


def flow_run(inventory: Path) -> None:
    from flows.member import replace_etcd_member

    replace_etcd_member(inventory=str(inventory), member=VICTIM, auto_approve=True)


def main() -> None:
    a = parse(net=92, links="loopback")
    with BenchLab(a.masters, a.net) as lab:
        fill(lab, a.mb)
        for profile in a.links.split(","):
            with Link(lab, profile) as link:
                floors = {"OpenSSH floor (bash, ssh)": Timed(link), "own-connector floor": Timed(link)}
                flows = FlowTimes(link)
                for _ in range(a.runs):
                    for run in (lambda: floors["OpenSSH floor (bash, ssh)"].run(link.floor, "replace.sh", "etcd1", VICTIM),
                                lambda: floors["own-connector floor"].run(own_floor, lab, link.inventory),
                                lambda: flows.run(flow_run, link.inventory)):
                        time.sleep(6)  # peers connected for a while: etcd refuses reconfiguration right after restarts
                        lab.break_member(VICTIM, "wipe")
                        run()
                report(f"member replacement, {a.masters} masters, {profile}, ~{a.mb} MB database", floors,
                       "replace-etcd-member", flows, "at most 2.0x the OpenSSH floor")


if __name__ == "__main__":
    main()
