"""The fleet on the distributed engine: a Prefect server on a real PostgreSQL, a process work
pool `nova-dr` made by `nova-dr deploy --fleet`, and two workers, each with a disk of its own
(their NOVA_DR_HOME and working directory); checkpoints in the shared state store (the
session's S3 server). Proven here: scheduled backups of three clusters; two recoveries of two
clusters at once, one on each worker; a worker killed with SIGKILL in the middle of a restore,
the run then Crashed (the automation deploy made), its failure notified to a webhook, and the
same recovery re-run on the other worker resuming from the dead one's checkpoints; the fleet's
posture and metrics. The workers run on this machine's network, not in lab hosts: the server
listens on loopback, which a host's namespace does not reach."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.engine import Postgres, Server, descendants, runs_on, start_worker, stop_group
from tests.helpers import ROOT, SIGNING_BLOCK, keys_on, make_bucket, make_lab, put_keys, s3_env, signer
from tests.test_lock_resume import hold, reached
from tests.test_restore import _wait_for, assert_restored


class Hook(BaseHTTPRequestHandler):
    got: list[dict] = []

    def do_POST(self):
        Hook.got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def engine(tmp_path_factory, s3_endpoint):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blocks.state import StateStore
    from blocks.storage import BackupSigningKey, S3Credentials

    root = tmp_path_factory.mktemp("engine")
    pg = Postgres()
    server = None
    try:
        server = Server(root, pg.url)
        hook = HTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=hook.serve_forever, daemon=True).start()
        bucket = f"fleet-state-{uuid.uuid4().hex[:8]}"
        make_bucket(s3_endpoint, bucket)
        env = s3_env(s3_endpoint)
        signer()  # the session's key (saved on the session's server, made on first use)
        with temporary_settings({PREFECT_API_URL: server.api}):  # this server's own blocks
            BackupSigningKey(private_key=(ROOT / "signing" / "id_ed25519").read_text()).save(SIGNING_BLOCK)
            S3Credentials(endpoint_url=s3_endpoint, access_key_id=env["AWS_ACCESS_KEY_ID"],
                          secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).save("fleet-s3")
            StateStore(url=f"s3://{bucket}/state", s3_block="fleet-s3").save("fleet-state")
            CustomWebhookNotificationBlock(name="ops", url=f"http://127.0.0.1:{hook.server_port}/hook",
                                           json_data={"text": "{{subject}}: {{body}}"}).save("ops")
        yield server, root
    finally:
        if server:
            server.stop()
        pg.stop()


def cli(server: Server, *args: str) -> subprocess.CompletedProcess:
    from tests.test_deployments import CLI as NOVA

    return subprocess.run([NOVA, *args], env=server.env, capture_output=True, text=True, timeout=300, cwd="/")


def api(server: Server, method: str, path: str, **kw):
    r = httpx.request(method, f"{server.api}{path}", timeout=30, **kw)
    r.raise_for_status()
    return r.json() if r.content else None


def wait_state(server: Server, run_id: str, want: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (run := api(server, "GET", f"/flow_runs/{run_id}"))["state"]["type"] not in want:
        assert run["state"]["type"] not in {"FAILED", "CRASHED", "CANCELLED"} - want, run["state"]
        assert time.monotonic() < deadline, f"run {run_id} is still {run['state']['type']}"
        time.sleep(1)
    return run


def run_deployment(server: Server, name: str, params: dict) -> str:
    dep = api(server, "GET", f"/deployments/name/{name}")
    if params.get("auto_approve"):  # as a drill deployment allows it
        api(server, "PATCH", f"/deployments/{dep['id']}", json={"tags": [*dep["tags"], "nova-dr-allow-auto-approve"]})
    return api(server, "POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": params})["id"]


def logs_of(server: Server, run_id: str) -> str:
    rows = api(server, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(r["message"] for r in rows)


def test_a_fleet_on_postgres_with_two_workers(engine, tmp_path):
    server, root = engine
    lab_a, lab_b = make_lab(3), make_lab(1)
    workers: dict[str, subprocess.Popen] = {}
    try:
        put_keys(lab_a, "/registry/pods/p", 60)
        expected = keys_on(lab_a, "etcd1")
        stores = {c: tmp_path / c for c in ("a", "b", "c")}
        for s in stores.values():
            s.mkdir()
        no_sv = {"INCLUDE_STARVAULT_DB_BACKUP": False}
        inv = {"a": lab_a, "b": lab_a, "c": lab_b}
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"metrics_textfile": str(tmp_path / "nova_dr.prom"), "clusters": [
            {"name": f"fleet-{c}", "inventory": str(inv[c].dir / "inventory.yaml"), "store": str(stores[c]),
             "backup_cron": "* * * * *", **({"rpo_hours": 0.0005} if c == "b" else {}),
             "parameters": {"backup-master-nodes": no_sv, "verify-backups": no_sv}} for c in "abc"]}))
        bad = cli(server, "deploy", "--fleet", str(fleet), "--notify", "custom-webhook/nope")
        assert bad.returncode == 2 and "notification block 'custom-webhook/nope'" in bad.stderr, bad
        assert api(server, "POST", "/deployments/filter", json={}) == []  # refused before anything was made
        out = cli(server, "deploy", "--fleet", str(fleet), "--notify", "custom-webhook/ops")
        assert out.returncode == 0 and "created work pool nova-dr (process)" in out.stdout, out
        for name in ("w1", "w2"):
            workers[name] = start_worker(server, "nova-dr", name, root / name, root / f"{name}.log",
                                         NOVA_DR_STATE="block:fleet-state", PREFECT_WORKER_QUERY_SECONDS="2")

        # Scheduled backups of three clusters: the server's scheduler makes the runs, the workers run them.
        _wait_for(lambda: all(list(s.glob("nova-dr-manifest_*")) for s in stores.values()), 420,
                  "a scheduled backup of each cluster")
        for c in "abc":  # no more: the test goes on without a backup every minute
            dep = api(server, "GET", f"/deployments/name/backup-master-nodes/fleet-{c}")
            api(server, "PATCH", f"/deployments/{dep['id']}", json={"paused": True})
            for r in api(server, "POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [dep["id"]]}},
                                                                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}):
                api(server, "DELETE", f"/flow_runs/{r['id']}")
        _wait_for(lambda: not api(server, "POST", "/flow_runs/filter", json={"flow_runs": {"state": {"type": {
            "any_": ["PENDING", "RUNNING"]}}}}), 300, "the backups under way to end")

        # Two recoveries of two clusters at the same time, one on each worker.
        holds = [hold(lab_a, "etcd2", "systemctl-stop"), hold(lab_b, "etcd1", "systemctl-stop")]
        runs = [run_deployment(server, "restart-etcd-member/fleet-a", {"member": "etcd2", "force": True,
                                                                        "auto_approve": True}),
                run_deployment(server, "restart-etcd-member/fleet-c", {"member": "etcd1", "force": True,
                                                                        "auto_approve": True})]
        _wait_for(lambda: reached(holds), 240, "both restarts at once")
        took = {w: runs_on(p) for w, p in workers.items()}
        assert sorted(took.values(), key=sorted) == sorted(({r} for r in runs), key=sorted), (took, runs)
        for h in holds:
            h.unlink()
        for r in runs:
            wait_state(server, r, {"COMPLETED"}, 240)

        # A restore of fleet-a; its worker dies (SIGKILL, its runs with it) with every member stopped.
        newest = sorted(stores["a"].glob("nova-dr-manifest_*"))[-1].name.split("_", 1)[1].removesuffix(".json")
        params = {"store": str(stores["a"]), "backup": newest, "auto_approve": True}
        put_keys(lab_a, "/later/k", 20)  # written after the backup: the restore removes them
        members = ["etcd1", "etcd2", "etcd3"]
        holds = [hold(lab_a, m, "systemctl-stop") for m in members]
        first = run_deployment(server, "restore-etcd-cluster/fleet-a", params)
        # The stops come one wave after another (the leader last): hold the first, then the env
        # file's reads that follow every stop (set-state-new), and let the stops go on.
        _wait_for(lambda: any(Path(f"{h}.reached").exists() for h in holds), 300, "the restore's first stop")
        later = [hold(lab_a, m, "cat-/etc/etcd.env-") for m in members]
        for h in holds:
            h.unlink()
        _wait_for(lambda: reached(later), 100, "the stops to finish")
        assert [lab_a.etcd_pid(m) for m in members] == [0, 0, 0]
        dying = next(w for w, p in workers.items() if first in runs_on(p))
        victims = [workers[dying].pid, *descendants(workers[dying].pid)]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        workers[dying].wait()
        for h in later:
            Path(f"{h}.abort").touch()
        _wait_for(lambda: not any(Path(f"{h}.reached").exists() for h in later), 30, "the held commands to end")
        for h in later:
            h.unlink()
            Path(f"{h}.abort").unlink()
        crashed = wait_state(server, first, {"CRASHED"}, 300)  # no heartbeat: the automation
        assert "no heartbeat" in crashed["state"]["message"], crashed["state"]
        _wait_for(lambda: any("restore-etcd-cluster" in h["text"] and "Crashed" in h["text"] for h in Hook.got), 120,
                  "the failure's notification")
        # The same recovery again: only the other worker is left, and it resumes.
        second = run_deployment(server, "restore-etcd-cluster/fleet-a", params)
        wait_state(server, second, {"COMPLETED"}, 400)
        name = api(server, "GET", f"/flow_runs/{second}")["name"]  # the other worker ran it
        assert f"Beginning flow run '{name}'" in (root / f"{next(w for w in workers if w != dying)}.log").read_text()
        text = logs_of(server, second)
        skipped = re.search(r"Resuming recovery (\S+): (\d+) step", text)
        assert skipped and int(skipped.group(2)) >= len(members), text[-3000:]
        assert_restored(lab_a, expected)
        assert not list((root / dying / "nova-dr").glob("checkpoints/*"))  # shared, not on the dead one's disk

        # Posture: a verified (green), b older than its target (red), c never verified (amber).
        wait_state(server, run_deployment(server, "verify-backups/fleet-a", {}), {"COMPLETED"}, 300)
        st = cli(server, "fleet", "status", "--fleet", str(fleet), "--json")
        rows = {r["cluster"]: r for r in map(json.loads, st.stdout.splitlines())}
        assert st.returncode == 1 and {c: r["state"] for c, r in rows.items()} == {
            "fleet-a": "green", "fleet-b": "red", "fleet-c": "amber"}, st
        assert rows["fleet-a"]["signed"] and rows["fleet-a"]["drill_seconds"] > 0
        assert "restore-etcd-cluster CRASHED" in rows["fleet-a"]["last_failure"], rows["fleet-a"]
        wait_state(server, run_deployment(server, "fleet-status/fleet", {}), {"COMPLETED"}, 300)  # writes the textfile
        from prometheus_client.parser import text_string_to_metric_families

        metrics = {(s.name, s.labels.get("cluster"), s.labels.get("flow")): s.value
                   for fam in text_string_to_metric_families((tmp_path / "nova_dr.prom").read_text())
                   for s in fam.samples}
        assert metrics[("nova_dr_rpo_ok", "fleet-a", None)] == 1 and metrics[("nova_dr_rpo_ok", "fleet-b", None)] == 0
        assert metrics[("nova_dr_last_verification_ok", "fleet-a", None)] == 1
        assert ("nova_dr_last_verification_ok", "fleet-c", None) not in metrics
        assert metrics[("nova_dr_failed_flow_runs", "fleet-a", "restore-etcd-cluster")] == 1
    finally:
        for p in workers.values():
            stop_group(p)
        lab_a.destroy()
        lab_b.destroy()
