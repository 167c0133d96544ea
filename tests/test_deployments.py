"""Deployments served by `nova-dr serve` against a real `prefect server`; runs created over the
REST API with the README's curl commands, approved over the API and with `nova-dr approve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO
from tests.test_restore import assert_restored, prepare_lab

API = os.environ["PREFECT_API_URL"]
CLI = str(Path(sys.executable).parent / "nova-dr")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "wb")
    env = dict(os.environ, PREFECT_RUNNER_POLL_FREQUENCY="2")
    env.pop("NOVA_DR_INVENTORY", None)
    p = subprocess.Popen([CLI, "serve", "--limit", "4"], cwd="/", env=env, stdout=log, stderr=log,
                         start_new_session=True)
    deadline = time.monotonic() + 90
    while httpx.get(f"{API}/deployments/name/restart-etcd-member/on-demand").status_code != 200:
        assert p.poll() is None and time.monotonic() < deadline, "nova-dr serve did not register the deployments"
        time.sleep(0.5)
    yield p
    _stop(p)  # by PID, before the server


def _stop(p: subprocess.Popen, grace: float = 40) -> None:
    """A `nova-dr serve` this module started, with its process group: TERM, then KILL."""
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def own_serve(tmp_path: Path, *args: str, sigint_ignored: bool = False,
              **extra_env: str) -> tuple[subprocess.Popen, int, Path, dict]:
    """`nova-dr serve` with no PREFECT_API_URL: it starts a server of its own, on a free port,
    with its own PREFECT_HOME. Returns the process, the port, that home and the env used.
    sigint_ignored: started as a shell script's background job is (`nova-dr serve &`)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_SERVER_API",
                                                                      "PREFECT_UI"))}
    env.update(PREFECT_HOME=str(tmp_path / "home"), NOVA_DR_HOME=str(tmp_path / "nova"), **extra_env)
    env.pop("NOVA_DR_INVENTORY", None)
    log = open(tmp_path / "serve.log", "wb")
    p = subprocess.Popen([CLI, "serve", "--port", str(port), *args], cwd="/", env=env, stdout=log, stderr=log,
                         start_new_session=True,
                         preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
    return p, port, tmp_path / "home", env


def curl(*args: str) -> dict:
    """As incident tooling should call it: retrying a transient error (the test server's SQLite
    can answer 5xx under load), which the idempotency key makes safe. The body goes to a file
    with -o: curl truncates a file before each retry, but on stdout a failed attempt's body
    stays in front of the answer (seen in CI: a 503 body, then the run)."""
    with tempfile.NamedTemporaryFile("r") as out:
        p = subprocess.run(["curl", "-sS", "--fail-with-body", "--retry", "3", "--retry-all-errors", "--retry-delay",
                            "1", "-o", out.name, *args], capture_output=True, text=True)
        body = out.read()
    assert p.returncode == 0, f"curl {args[-1][:80]}: exit {p.returncode}: {body[:500]} {p.stderr[:300]}"
    return json.loads(body)


def api(method: str, path: str, base: str = API, **kw):
    """One REST call, retried while the test server's SQLite answers 5xx under load."""
    for _ in range(5):
        r = httpx.request(method, f"{base}{path}", **kw)
        if r.status_code < 500:
            break
        time.sleep(1)
    r.raise_for_status()
    return r.json() if r.content else None  # PATCH answers 204, no body


def state_of(run_id: str, base: str = API) -> str:
    return api("GET", f"/flow_runs/{run_id}", base)["state"]["type"]


def wait_state(run_id: str, want: set[str], timeout: float, base: str = API) -> str:
    deadline = time.monotonic() + timeout
    while (s := state_of(run_id, base)) not in want:
        assert s not in {"FAILED", "CRASHED", "CANCELLED"} - want, f"run {run_id} ended {s}"
        assert time.monotonic() < deadline, f"run {run_id} is still {s}"
        time.sleep(1)
    return s


def test_scheduled_deployments_exist(served):
    nightly = api("GET", "/deployments/name/backup-master-nodes/nightly")
    verify = api("GET", "/deployments/name/verify-backups/daily-verify")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 4 * * *"]
    assert [s["schedule"]["cron"] for s in verify["schedules"]] == ["30 5 * * *"]
    restore = api("GET", "/deployments/name/restore-etcd-cluster/on-demand")
    assert restore["schedules"] == []
    props = restore["parameter_openapi_schema"]["properties"]
    assert "block:NAME" in props["inventory"]["description"] and props["auto_approve"]["default"] is False
    # A run whose machine dies is marked Crashed (test_engine sees it happen), not left Running.
    from deployments.automations import ZOMBIE

    assert ZOMBIE in [a["name"] for a in api("POST", "/automations/filter", json={})]


def test_incident_tooling_restores_over_the_rest_api(served, lab3, tmp_path):
    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd3", "wipe")
    # The README's two curl calls: the deployment's id, then a run with parameters.
    dep = curl(f"{API}/deployments/name/restore-etcd-cluster/on-demand")
    body = {"parameters": {"inventory": str(lab3.dir / "inventory.yaml"), "snapshot": str(snap)},
            "idempotency_key": "INC-4242"}
    run = curl("-X", "POST", f"{API}/deployments/{dep['id']}/create_flow_run", "-H", "Content-Type: application/json",
               "-d", json.dumps(body))
    again = curl("-X", "POST", f"{API}/deployments/{dep['id']}/create_flow_run", "-H",
                 "Content-Type: application/json", "-d", json.dumps(body))
    assert again["id"] == run["id"]  # the same idempotency key: the same run, not a second recovery
    wait_state(run["id"], {"PAUSED"}, 180)
    answer = curl("-X", "POST", f"{API}/flow_runs/{run['id']}/resume", "-H", "Content-Type: application/json",
                  "-d", json.dumps({"run_input": {"approve": True, "name": "incident-bot", "reason": "INC-4242"}}))
    assert answer["status"] == "ACCEPT"
    wait_state(run["id"], {"COMPLETED"}, 240)
    assert_restored(lab3, expected)


def _task_window(run_id: str) -> tuple[float, float]:
    from datetime import datetime

    runs = api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
    starts = [datetime.fromisoformat(r["start_time"]).timestamp() for r in runs if r["start_time"]]
    ends = [datetime.fromisoformat(r["end_time"]).timestamp() for r in runs if r["end_time"]]
    return min(starts), max(ends)


def test_two_recoveries_of_one_cluster_never_overlap(served, lab3, tmp_path):
    from prefect.deployments import run_deployment

    snap, expected = prepare_lab(lab3, tmp_path)
    lab3.break_member("etcd2", "wipe")
    params = {"inventory": str(lab3.dir / "inventory.yaml"), "snapshot": str(snap), "wait_for_cluster_seconds": 300}
    # The README's Python equivalent: run_deployment(..., timeout=0) returns at once.
    first = run_deployment("restore-etcd-cluster/on-demand", parameters=params, timeout=0)
    wait_state(str(first.id), {"PAUSED"}, 180)
    second = run_deployment("restore-etcd-cluster/on-demand", parameters=params, timeout=0)
    wait_state(str(second.id), {"RUNNING"}, 120)
    time.sleep(6)
    assert state_of(str(second.id)) == "RUNNING"  # waiting for the cluster, not at a gate of its own
    ok = subprocess.run([CLI, "approve", str(first.id), "--reason", "drill"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    wait_state(str(first.id), {"COMPLETED"}, 240)
    wait_state(str(second.id), {"PAUSED"}, 180)
    rejected = subprocess.run([CLI, "approve", str(first.id)], capture_output=True, text=True, cwd=REPO)
    assert rejected.returncode == 1 and f"error: flow run {first.id}" in rejected.stderr
    assert subprocess.run([CLI, "approve", str(second.id)], cwd=REPO).returncode == 0
    wait_state(str(second.id), {"COMPLETED"}, 240)
    a, b = _task_window(str(first.id)), _task_window(str(second.id))
    assert a[1] <= b[0] or b[1] <= a[0], f"task windows overlap: {a} {b}"
    assert_restored(lab3, expected)


def test_an_api_caller_cannot_start_an_unattended_recovery(served, lab3):
    """auto_approve=true through a deployment is refused at the gate, nothing changed; a
    deployment tagged for drills allows it."""
    dep = curl(f"{API}/deployments/name/restart-etcd-member/on-demand")
    body = {"parameters": {"inventory": str(lab3.dir / "inventory.yaml"), "member": "etcd2", "force": True,
                           "auto_approve": True}}
    pid = lab3.etcd_pid("etcd2")
    run = curl("-X", "POST", f"{API}/deployments/{dep['id']}/create_flow_run", "-H", "Content-Type: application/json",
               "-d", json.dumps(body))
    wait_state(run["id"], {"FAILED"}, 180)
    message = api("GET", f"/flow_runs/{run['id']}")["state"]["message"]
    assert "auto_approve=true is refused for a run of deployment 'on-demand'" in message, message
    assert lab3.etcd_pid("etcd2") == pid
    api("PATCH", f"/deployments/{dep['id']}", json={"tags": [*dep["tags"], "nova-dr-allow-auto-approve"]})
    try:
        run = curl("-X", "POST", f"{API}/deployments/{dep['id']}/create_flow_run", "-H",
                   "Content-Type: application/json", "-d", json.dumps(body))
        wait_state(run["id"], {"COMPLETED"}, 240)
        assert lab3.etcd_pid("etcd2") not in (0, pid)  # restarted, unattended, as the drill deployment allows
    finally:
        api("PATCH", f"/deployments/{dep['id']}", json={"tags": dep["tags"]})


def test_serve_secures_the_server_it_starts(tmp_path):
    """With no PREFECT_API_URL, `nova-dr serve` starts its own server: with an API auth string
    and a block encryption key it makes once (0600 files under PREFECT_HOME), not in the
    database. A caller without the auth string reads no block."""
    import sqlite3

    p, port, home, env = own_serve(tmp_path)
    url = f"http://127.0.0.1:{port}/api"
    try:
        refused = subprocess.run([CLI, "serve", "--no-auth", "--host", "0.0.0.0", "--port", str(port)], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "--no-auth with --host 0.0.0.0" in refused.stderr
        deadline = time.monotonic() + 150

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                return False

        while not up():
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        auth = (home / "nova-dr-api-auth").read_text().strip()
        for name in ("nova-dr-api-auth", "nova-dr-encryption-key"):
            assert ((home / name).stat().st_mode & 0o777) == 0o600
        assert httpx.post(f"{url}/block_documents/filter", json={}).status_code == 401
        secret = "sv-token-" + os.urandom(6).hex()
        save = subprocess.run([sys.executable, "-c", "import sys; from prefect.blocks.system import Secret; "
                               "Secret(value=sys.argv[1]).save('t')", secret], capture_output=True, text=True,
                              env={**env, "PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth}, timeout=120)
        assert save.returncode == 0, save.stderr[-1500:]
        db = sqlite3.connect(home / "prefect.db")
        assert db.execute("select count(*) from configuration where key = 'ENCRYPTION_KEY'").fetchone() == (0,)
        assert secret not in str(db.execute("select data from block_document").fetchall())
        db.close()
        # a `nova-dr` client on this machine finds the auth string by itself
        out = subprocess.run([CLI, "approve", "00000000-0000-0000-0000-000000000000"], capture_output=True,
                             text=True, env={**env, "PREFECT_API_URL": url}, timeout=120)
        assert "401" not in out.stdout + out.stderr and "Unauthorized" not in out.stdout + out.stderr, out.stderr
    finally:
        _stop(p)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_serve_stopped_while_its_server_starts_leaves_no_server_behind(tmp_path):
    """A stop (systemd, a test's cleanup) before Prefect's runner has its own SIGTERM handler
    once ended `serve` at once, and the server it had started kept running, and its port."""
    p, _, _, _ = own_serve(tmp_path)
    server = None
    try:
        deadline = time.monotonic() + 60
        while not (kids := _children(p.pid)):
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.1)
        server = kids[0]
        time.sleep(1)  # the server is starting; serve waits for its /health
        os.kill(p.pid, signal.SIGTERM)
        p.wait(60)
        deadline = time.monotonic() + 30
        while _alive(server):
            assert time.monotonic() < deadline, f"serve's server (pid {server}) still runs after serve stopped"
            time.sleep(0.2)
    finally:
        if p.poll() is None:
            _stop(p)
        if server and _alive(server):
            os.killpg(server, signal.SIGKILL)


def test_ctrl_c_stops_serve_while_a_run_waits_for_approval(lab3, tmp_path):
    """SIGINT (to serve's process group, as Ctrl-C sends it) with a run paused at its gate: serve
    and the server it started stop. A process started as a shell script's background job
    inherits SIGINT ignored, and Python keeps it so: serve then ignored it (issue 22's 18 s;
    here the whole minute) until it installed a handler of its own."""
    p, port, _, _ = own_serve(tmp_path, "--no-auth", sigint_ignored=True)
    base, server = f"http://127.0.0.1:{port}/api", None
    pid = lab3.etcd_pid("etcd2")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(f"{base}/deployments/name/restart-etcd-member/on-demand", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        run = api("POST", f"/deployments/{r.json()['id']}/create_flow_run", base, json={"parameters": {
            "inventory": str(lab3.dir / "inventory.yaml"), "member": "etcd2", "force": True}})
        wait_state(run["id"], {"PAUSED"}, 180, base)
        server = next(k for k in _children(p.pid) if b"\0server\0start" in Path(f"/proc/{k}/cmdline").read_bytes())
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("nova-dr serve still runs 60 s after Ctrl-C") from None
        deadline = time.monotonic() + 30
        while _alive(server):
            assert time.monotonic() < deadline, f"serve's server (pid {server}) still runs after serve stopped"
            time.sleep(0.2)
        assert lab3.etcd_pid("etcd2") == pid  # the paused restart never went past its gate
    finally:
        if p.poll() is None:
            _stop(p)
        if server and _alive(server):
            os.killpg(server, signal.SIGKILL)
