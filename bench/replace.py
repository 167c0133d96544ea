"""Member replacement: replace-etcd-member against etcd's own rejoin, in one run on a lab.

Each round wipes the same member (`lab break --how wipe`), then either the floor does by hand
what SPEC P7 says (member list, member remove, member add, clear the data dir,
ETCD_INITIAL_CLUSTER_STATE=existing, start, wait until healthy) over plain SSH, or the flow
does it with its checks, quarantine and verification. Prints medians and the ratio.

    .venv/bin/python bench/replace.py [--masters 3] [--mb 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import fill, timed  # noqa: E402  (sets up sys.path and the environment first)
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--masters", type=int, default=3)
    ap.add_argument("--mb", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--net", type=int, default=92)
    a = ap.parse_args()
    lab = Lab(Path(tempfile.mkdtemp(prefix="nova-dr-bench-lab-")))
    lab.up(masters=a.masters, net=a.net)
    try:
        from prefect import flow

        flow(lambda: None, name="warm-up")()  # the embedded server's start is not the replacement's
        fill(lab, a.mb)
        floors, flows = [], []
        for _ in range(a.runs):
            time.sleep(6)  # peers connected for a while: etcd refuses reconfiguration right after restarts
            lab.break_member(VICTIM, "wipe")
            floors.append(timed(floor, lab))
            time.sleep(6)
            lab.break_member(VICTIM, "wipe")
            flows.append(timed(flow_run, lab))
        f, g = statistics.median(floors), statistics.median(flows)
        print(f"\nmember replacement, {a.masters} masters, ~{a.mb} MB database, median of {a.runs}")
        print(f"{'floor (etcd rejoin by hand)':32} {f:7.2f} s   runs: {', '.join(f'{x:.2f}' for x in floors)}")
        print(f"{'replace-etcd-member':32} {g:7.2f} s   runs: {', '.join(f'{x:.2f}' for x in flows)}")
        print(f"{'ratio flow/floor':32} {g / f:7.2f} x   (goal: within 1.3x)")
    finally:
        lab.destroy()


if __name__ == "__main__":
    main()
