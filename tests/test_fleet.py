"""The fleet file, its per-cluster deployments and the posture rules (pure parts)."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from core.errors import NovaDRError
from core.fleet import AMBER, GREEN, RED, parse_fleet, rpo_state, shift_cron, stagger_offset
from deployments.catalog import FLEET_TAG, SPECS, planned_fleet
from tests.test_deployments import API, CLI, _stop, api
from tests.test_restore import _wait_for

FLEET = """
stagger_minutes: 60
clusters:
  - {name: prod-a, inventory: block:prod-a, store: "s3://backups/prod-a", rpo_hours: 6,
     backup_cron: "0 */4 * * *", kube: block:prod-a-kube,
     parameters: {backup-master-nodes: {s3_block: prod-a-s3}}}
  - {name: prod-b, inventory: /etc/nova-dr/prod-b.yaml, store: /mnt/nfs/prod-b}
"""


def test_every_flow_gets_a_deployment_per_cluster_with_that_clusters_parameters():
    got = {(p.flow, p.name): p for p in planned_fleet(parse_fleet(FLEET, "fleet.yaml"))}
    a, b = got[("backup-master-nodes", "prod-a")], got[("backup-master-nodes", "prod-b")]
    assert a.parameters == {"inventory": "block:prod-a", "store": "s3://backups/prod-a", "s3_block": "prod-a-s3"}
    assert a.cron == "0 */4 * * *"  # given: as written
    assert b.parameters == {"inventory": "/etc/nova-dr/prod-b.yaml", "store": "/mnt/nfs/prod-b"}
    assert b.cron == f"{stagger_offset('prod-b', 60)} 4 * * *" and "cluster:prod-b" in b.tags
    assert got[("restore-etcd-cluster", "prod-b")].parameters == {"inventory": "/etc/nova-dr/prod-b.yaml"}
    assert got[("velero-backup", "prod-a")].parameters == {"kube": "block:prod-a-kube"}
    assert ("velero-backup", "prod-b") not in got  # no kube block: no Kubernetes-side deployments
    assert {p.concurrency_limit for p in got.values()} == {1}
    assert len(got) == len(SPECS) + sum(s.needs_inventory for s in SPECS)


def test_the_history_is_scheduled_only_where_a_cluster_asks_for_it():
    from deployments.catalog import planned

    fleet = parse_fleet(FLEET + "  - {name: prod-c, inventory: c.yaml, store: /c, continuous: true}\n", "f")
    crons = {(p.flow, p.name): p.cron for p in planned_fleet(fleet)}
    assert crons[("continuous-backup", "prod-c")] == "0 * * * *"  # not staggered: it runs all the time
    assert crons[("compact-history", "prod-c")] == "20 */6 * * *"
    assert crons[("continuous-backup", "prod-a")] is None and crons[("compact-history", "prod-b")] is None
    one = {p.flow: p.cron for p in planned({"NOVA_DR_CONTINUOUS": "true"})}
    assert one["continuous-backup"] == "0 * * * *" and one["compact-history"] == "20 */6 * * *"
    assert {p.flow: p.cron for p in planned({})}["continuous-backup"] is None


def test_staggering_keeps_each_clusters_order_and_moves_nobody_else():
    fleet = parse_fleet(FLEET, "f")
    crons = {(p.flow, p.name): p.cron for p in planned_fleet(fleet)}
    off = stagger_offset("prod-b", 60)
    assert crons[("verify-backups", "prod-b")] == shift_cron("30 5 * * *", off)  # still after its backup
    # Adding a cluster never moves another one's schedule.
    more = parse_fleet(FLEET + "  - {name: prod-c, inventory: c.yaml, store: /c}\n", "f")
    assert {k: v for k, v in {(p.flow, p.name): p.cron for p in planned_fleet(more)}.items()
            if k[1] != "prod-c"} == crons
    offsets = {stagger_offset(f"c{i}", 60) for i in range(50)}
    assert len(offsets) > 20 and all(0 <= o < 60 for o in offsets)  # fifty clusters, not all at 04:00


@pytest.mark.parametrize("cron,minutes,want", [
    ("0 4 * * *", 0, "0 4 * * *"),
    ("0 4 * * *", 59, "59 4 * * *"),
    ("30 5 * * *", 45, "15 6 * * *"),
    ("50 23 * * *", 20, "10 0 * * *"),
    ("0 3 * * 0", 30, "30 3 * * 0"),
    ("50 23 * * 6", 20, "10 0 * * 0"),  # Saturday 23:50 + 20 min is Sunday
])
def test_shift_cron(cron, minutes, want):
    assert shift_cron(cron, minutes) == want


@pytest.mark.parametrize("cron,minutes,said", [
    ("*/15 * * * *", 5, "only a fixed minute and hour can be staggered"),
    ("50 23 1 * *", 20, "passes midnight"),
    ("0 4 * *", 5, "five fields"),
])
def test_shift_cron_refuses_what_it_cannot_shift_exactly(cron, minutes, said):
    with pytest.raises(NovaDRError, match=said):
        shift_cron(cron, minutes)


@pytest.mark.parametrize("text,said", [
    ("clusters: []", "clusters: List should have at least 1 item"),
    ("clusters:\n  - {name: a, inventory: a.yaml}", "clusters[a].store: Field required"),
    ("clusters:\n  - {name: A_1, inventory: a.yaml, store: /s}", "clusters[A_1].name: Value error, use lower-case"),
    ("clusters:\n  - {name: a, inventory: i, store: /s}\n  - {name: a, inventory: j, store: /t}",
     "names must be unique; twice: a"),
    ("clusters:\n  - {name: a, inventory: i, store: /s, rpo: 4}", "clusters[a].rpo: Extra inputs are not permitted"),
    ("clusters: [", "not YAML"),
    ("- a", "expected a mapping"),
])
def test_a_bad_fleet_file_is_named_in_one_line(text, said):
    with pytest.raises(NovaDRError) as err:
        parse_fleet(text, "fleet.yaml")
    assert str(err.value).startswith("fleet file fleet.yaml: ") and said in str(err.value), str(err.value)


@pytest.mark.parametrize("cluster,said", [
    ("parameters: {backup-master-node: {s3_block: x}}",
     "clusters[a].parameters: no flow 'backup-master-node' per cluster; did you mean 'backup-master-nodes'?"),
    ("parameters: {fleet-status: {textfile: /x}}", "clusters[a].parameters: no flow 'fleet-status' per cluster"),
    ("parameters: {backup-master-nodes: {s3_blok: x}}",
     "clusters[a].parameters.backup-master-nodes: 's3_blok' is not a parameter; did you mean 's3_block'?"),
    ("parameters: {verify-backups: {store: /elsewhere}}",
     "clusters[a].parameters.verify-backups: 'store' is set by the cluster's own field"),
    ("backup_cron: '0 4 * *'", "cluster a: cron '0 4 * *': write five fields"),
])
def test_a_fleet_mistake_is_refused_before_any_deployment_is_made(cluster, said):
    """(A recovery's deployment may preset its store: the cluster's own field does not set it.)"""
    fleet = parse_fleet(f"clusters:\n  - {{name: a, inventory: i.yaml, store: /s, {cluster}}}\n", "f")
    with pytest.raises(NovaDRError) as err:
        planned_fleet(fleet)
    assert said in str(err.value), str(err.value)


def test_a_recovery_may_preset_its_store():
    fleet = parse_fleet("clusters:\n  - {name: a, inventory: i.yaml, store: /s, parameters: "
                        "{restore-etcd-cluster: {store: /s, backup: latest}}}\n", "f")
    got = {(p.flow, p.name): p for p in planned_fleet(fleet)}
    assert got[("restore-etcd-cluster", "a")].parameters == {"inventory": "i.yaml", "store": "/s", "backup": "latest"}


def test_rpo_state():
    now = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
    assert rpo_state(None, 26, True, now)[0] == RED
    assert rpo_state(now - timedelta(hours=27), 26, True, now) == (RED, "newest backup 27.0 h old, over the 26 h target")
    assert rpo_state(now - timedelta(hours=2), 26, None, now)[0] == AMBER
    assert rpo_state(now - timedelta(hours=2), 26, False, now)[0] == AMBER
    assert rpo_state(now - timedelta(hours=2), 26, True, now)[0] == GREEN


SERVING = "Your deployments are being served"  # Prefect's line once every deployment is registered


def _serve_fleet(fleet: Path, log: Path) -> subprocess.Popen:
    """`nova-dr serve --fleet` on the session's Prefect server, once it serves all it registered."""
    before = log.read_text().count(SERVING) if log.exists() else 0
    env = dict(os.environ, PREFECT_RUNNER_POLL_FREQUENCY="2")
    p = subprocess.Popen([CLI, "serve", "--fleet", str(fleet)], cwd="/", env=env, stdout=open(log, "ab"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for(lambda: log.read_text().count(SERVING) > before or p.poll() is not None, 120, "nova-dr serve --fleet")
    assert p.poll() is None, log.read_text()[-2000:]
    return p


def test_serve_fleet_makes_each_clusters_deployments_and_prunes_a_removed_one(tmp_path):
    """On the session's Prefect server; runs, posture and metrics are test_engine's."""
    fleet = tmp_path / "fleet.yaml"
    no_sv = {"INCLUDE_STARVAULT_DB_BACKUP": False}

    def write(names: str) -> None:
        fleet.write_text(yaml.safe_dump({"stagger_minutes": 30, "clusters": [
            {"name": f"fleet-{n}", "inventory": f"/etc/nova-dr/{n}.yaml", "store": f"/mnt/nfs/{n}",
             "parameters": {"backup-master-nodes": no_sv}} for n in names]}))

    write("abc")
    p = _serve_fleet(fleet, tmp_path / "serve.log")
    try:
        a = api("GET", "/deployments/name/backup-master-nodes/fleet-a")
        assert [s["schedule"]["cron"] for s in a["schedules"]] == [shift_cron("0 4 * * *", stagger_offset("fleet-a", 30))]
        assert a["parameters"] == {"inventory": "/etc/nova-dr/a.yaml", "store": "/mnt/nfs/a", **no_sv}
        assert "cluster:fleet-a" in a["tags"] and FLEET_TAG in a["tags"] and a["global_concurrency_limit"]["limit"] == 1, a
        status = api("GET", "/deployments/name/fleet-status/fleet")
        assert status["parameters"] == {"fleet": str(fleet)} and status["schedules"][0]["schedule"]["cron"] == "*/15 * * * *"
        # fleet-c leaves the fleet: serve again, and its deployments are gone; the others stay.
        _stop(p)
        write("ab")
        p = _serve_fleet(fleet, tmp_path / "serve.log")
        assert httpx.get(f"{API}/deployments/name/verify-backups/fleet-c").status_code == 404
        assert httpx.get(f"{API}/deployments/name/restore-etcd-cluster/fleet-c").status_code == 404
        assert api("GET", "/deployments/name/backup-master-nodes/fleet-a")["id"] == a["id"]
        gone = re.findall(r"deleted deployment (\S+): its cluster", (tmp_path / "serve.log").read_text())
        assert sorted(gone) == sorted(f"{s.flow}/fleet-c" for s in SPECS if s.needs_inventory), gone
    finally:
        _stop(p)
        for d in api("POST", "/deployments/filter", json={"deployments": {"tags": {"all_": [FLEET_TAG]}}}):
            api("DELETE", f"/deployments/{d['id']}")  # the session's server serves later tests too


def test_fleet_status_names_what_it_cannot_read_and_goes_on(tmp_path):
    """A cluster whose inventory is gone, one whose store is empty: each red with its reason in
    one line, the others still read, no traceback (against the session's Prefect server)."""
    from tests.test_inventory import _write_yaml

    (tmp_path / "empty").mkdir()
    inventory = _write_yaml(tmp_path)  # a valid inventory; no master is contacted
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"clusters": [
        {"name": "gone", "inventory": str(tmp_path / "no-such.yaml"), "store": str(tmp_path / "empty")},
        {"name": "empty", "inventory": inventory, "store": str(tmp_path / "empty")}]}))
    out = subprocess.run([CLI, "fleet", "status", "--fleet", str(fleet)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert "RED" in rows["gone"] and "no-such.yaml" in rows["gone"], out.stdout
    assert "RED" in rows["empty"] and "no complete" in rows["empty"], out.stdout
    bad = subprocess.run([CLI, "fleet", "status", "--fleet", str(tmp_path / "nope.yaml")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: fleet file {tmp_path / 'nope.yaml'}: no such file"


def test_fleet_plan_lists_the_deployments_and_touches_nothing(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    out = subprocess.run([CLI, "fleet", "plan", "--fleet", str(fleet)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert f"{stagger_offset('prod-b', 60)} 4 * * *" in rows["backup-master-nodes/prod-b"]
    assert "0 */4 * * *" in rows["backup-master-nodes/prod-a"] and "s3_block=prod-a-s3" in rows["backup-master-nodes/prod-a"]
    assert "on demand" in rows["restore-etcd-cluster/prod-b"] and "velero-backup/prod-b" not in rows
    assert rows["fleet-status/fleet"].split()[1:6] == ["*/15", "*", "*", "*", "*"]
    assert httpx.get(f"{API}/deployments/name/backup-master-nodes/prod-a").status_code == 404  # nothing made
    fleet.write_text(FLEET.replace("s3_block: prod-a-s3", "s3_blok: prod-a-s3"))
    bad = subprocess.run([CLI, "fleet", "plan", "--fleet", str(fleet)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'s3_blok' is not a parameter" in bad.stderr, bad
