"""Member replacement: replace-etcd-member against etcd's own rejoin, in one run on a lab.

Each round wipes the same member (`lab break --how wipe`), then either the floor does by hand
what SPEC P7 says (member list, member remove, member add, clear the data dir,
ETCD_INITIAL_CLUSTER_STATE=existing, start, wait until healthy) over plain SSH, or the flow
does it with its checks, quarantine and verification. Prints medians and the ratio.

    .venv/bin/python bench/replace.py [--masters 3] [--mb 10] [--runs 3]
"""

from __future__ import annotations

import json
import time

from common import BenchLab, FlowTimes, fill, parse, report, timed  # noqa: E402  (sets up sys.path and the environment first)
from lab.lab import Lab  # noqa: E402

VICTIM = "etcd2"


def floor(lab: Lab) -> None:
    from core.etcd import etcdctl_env, parse_env_file
    from tasks.remote import connect

    cluster = lab.cluster()
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
        v.run(victim.paths.service_start)
        lab.wait_healthy(120)
    finally:
        h.close()
        v.close()


def flow_run(lab: Lab) -> None:
    from flows.member import replace_etcd_member

    replace_etcd_member(inventory=str(lab.dir / "inventory.yaml"), member=VICTIM, auto_approve=True)


def main() -> None:
    a = parse(net=92)
    with BenchLab(a.masters, a.net) as lab:
        fill(lab, a.mb)
        floors, flows = [], FlowTimes()
        for _ in range(a.runs):
            time.sleep(6)  # peers connected for a while: etcd refuses reconfiguration right after restarts
            lab.break_member(VICTIM, "wipe")
            floors.append(timed(floor, lab))
            time.sleep(6)
            lab.break_member(VICTIM, "wipe")
            flows.run(flow_run, lab)
        report(f"member replacement, {a.masters} masters, ~{a.mb} MB database", "floor (etcd rejoin by hand)",
               "replace-etcd-member", floors, flows, "within 1.3x")


if __name__ == "__main__":
    main()
