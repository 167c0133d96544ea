"""The fleet file, its per-cluster deployments and the posture rules (pure parts)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from core.errors import NovaDRError
from core.fleet import AMBER, GREEN, RED, parse_fleet, rpo_state, shift_cron, stagger_offset
from deployments.catalog import FLEET_TAG, SPECS, planned_fleet
from tests.test_deployments import API, CLI, _stop, api, wait_state

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


def test_rpo_state():
    now = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
    assert rpo_state(None, 26, True, now)[0] == RED
    assert rpo_state(now - timedelta(hours=27), 26, True, now) == (RED, "newest backup 27.0 h old, over the 26 h target")
    assert rpo_state(now - timedelta(hours=2), 26, None, now)[0] == AMBER
    assert rpo_state(now - timedelta(hours=2), 26, False, now)[0] == AMBER
    assert rpo_state(now - timedelta(hours=2), 26, True, now)[0] == GREEN


def _serve_fleet(fleet: Path, log: Path, want: str) -> subprocess.Popen:
    """`nova-dr serve --fleet` on the session's Prefect server (its blocks: the signing key)."""
    env = dict(os.environ, PREFECT_RUNNER_POLL_FREQUENCY="2")
    p = subprocess.Popen([CLI, "serve", "--fleet", str(fleet)], cwd="/", env=env, stdout=open(log, "ab"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while httpx.get(f"{API}/deployments/name/{want}").status_code != 200:
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    return p


def _run(dep: dict) -> str:
    return api("POST", f"/deployments/{dep['id']}/create_flow_run", json={})["id"]


def test_a_fleet_served_backed_up_verified_and_seen_against_its_rpo(lab3, tmp_path):
    """Three clusters from one fleet file (all on this lab's masters, each with its own store):
    one backed up and verified (green), one backed up but older than its target (red), one never
    backed up whose verification failed (red, with the reason). Then one leaves the fleet."""
    from prometheus_client.parser import text_string_to_metric_families

    inv, fleet, prom = str(lab3.dir / "inventory.yaml"), tmp_path / "fleet.yaml", tmp_path / "nova_dr.prom"
    no_sv = {"INCLUDE_STARVAULT_DB_BACKUP": False}  # no StarVault runs in the lab
    stores = {n: tmp_path / n for n in ("a", "b", "c")}
    for s in stores.values():
        s.mkdir()

    def write(names: str) -> None:
        fleet.write_text(yaml.safe_dump({"stagger_minutes": 30, "metrics_textfile": str(prom), "clusters": [
            {"name": f"fleet-{n}", "inventory": inv, "store": str(stores[n]), **({"rpo_hours": 0.0005} if n == "b" else {}),
             "parameters": {"backup-master-nodes": no_sv, "verify-backups": no_sv}} for n in names]}))

    write("abc")
    p = _serve_fleet(fleet, tmp_path / "serve.log", "verify-backups/fleet-c")
    try:
        dep = {(f, c): api("GET", f"/deployments/name/{f}/fleet-{c}")
               for f in ("backup-master-nodes", "verify-backups") for c in "abc"}
        a = dep[("backup-master-nodes", "a")]
        assert [s["schedule"]["cron"] for s in a["schedules"]] == [shift_cron("0 4 * * *", stagger_offset("fleet-a", 30))]
        assert a["parameters"] == {"inventory": inv, "store": str(stores["a"]), **no_sv} and "cluster:fleet-a" in a["tags"]
        assert a["concurrency_limit"] == 1, a
        backups = [_run(dep[("backup-master-nodes", c)]) for c in "ab"]
        for r in backups:
            wait_state(r, {"COMPLETED"}, 300)
        verifies = {c: _run(dep[("verify-backups", c)]) for c in "ac"}
        wait_state(verifies["a"], {"COMPLETED"}, 300)
        wait_state(verifies["c"], {"FAILED"}, 300)

        out = subprocess.run([CLI, "fleet", "status", "--fleet", str(fleet), "--json", "--textfile", str(prom)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out  # two clusters are red
        rows = {r["cluster"]: r for r in map(json.loads, out.stdout.splitlines())}
        newest = sorted(x.name for x in stores["a"].glob("nova-dr-manifest_*"))[-1]
        ra, rb, rc = rows["fleet-a"], rows["fleet-b"], rows["fleet-c"]
        assert ra["state"] == "green" and ra["signed"] and ra["verified"] == "pass", ra
        assert newest == f"nova-dr-manifest_{ra['backup']}.json" and ra["backup_bytes"] > 0 and ra["drill_seconds"] > 0
        assert rb["state"] == "red" and "over the 0.0005 h target" in rb["why"] and rb["verified"] == "never", rb
        assert rc["state"] == "red" and rc["backup_at"] is None, rc
        assert rc["last_failure"].startswith("verify-backups FAILED") and "no backup set at all" in rc["last_failure"]
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
        assert metrics[("nova_dr_last_backup_timestamp_seconds", (("cluster", "fleet-a"),))] == ra["backup_at"]
        assert metrics[("nova_dr_rpo_ok", (("cluster", "fleet-a"),))] == 1
        assert metrics[("nova_dr_rpo_ok", (("cluster", "fleet-b"),))] == 0
        assert metrics[("nova_dr_last_verified_backup_timestamp_seconds", (("cluster", "fleet-a"),))] == ra["backup_at"]
        assert metrics[("nova_dr_restore_drill_duration_seconds", (("cluster", "fleet-a"),))] == ra["drill_seconds"]
        assert metrics[("nova_dr_failed_flow_runs", (("cluster", "fleet-c"), ("flow", "verify-backups")))] == 1
        assert ("nova_dr_last_backup_timestamp_seconds", (("cluster", "fleet-c"),)) not in metrics

        # fleet-c leaves the fleet: serve again, and its deployments are gone; the others stay.
        _stop(p)
        write("ab")
        p = _serve_fleet(fleet, tmp_path / "serve.log", "verify-backups/fleet-b")
        assert httpx.get(f"{API}/deployments/name/verify-backups/fleet-c").status_code == 404
        assert httpx.get(f"{API}/deployments/name/restore-etcd-cluster/fleet-c").status_code == 404
        assert api("GET", "/deployments/name/backup-master-nodes/fleet-a")["id"] == a["id"]
    finally:
        _stop(p)
        for d in api("POST", "/deployments/filter", json={"deployments": {"tags": {"all_": [FLEET_TAG]}}}):
            api("DELETE", f"/deployments/{d['id']}")  # the session's server serves later tests too
