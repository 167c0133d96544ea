"""The Prefect UI as an operator uses it, in a real browser (Debian's chromium, driven by
playwright; never playwright's own browser download): `nova-dr serve` on this machine's
address beyond loopback and on a port that is not 4200, secured with its auth string; log in
with it, open the paused restore, approve it."""

from __future__ import annotations

import base64
import subprocess
import time
from pathlib import Path

import httpx

from tests.test_deployments import _stop, own_serve
from tests.test_restore import assert_restored, prepare_lab

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def outside_address() -> str:
    """This machine's first address beyond loopback (IPv4), where operators' browsers reach it;
    loopback only when it has none."""
    for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split():
        if ":" not in a and not a.startswith("127."):
            return a
    return "127.0.0.1"


def test_an_operator_logs_in_and_approves_a_restore_in_the_browser(lab3, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "no /usr/bin/chromium: `make deps` installs Debian's chromium"
    host = outside_address()  # not loopback, and not port 4200: where the UI once called the wrong API
    p, port, home, _ = own_serve(tmp_path, "--host", host, PREFECT_RUNNER_POLL_FREQUENCY="2")
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 180
        while not (home / "nova-dr-api-auth").exists():
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        auth = (home / "nova-dr-api-auth").read_text().strip()
        client = httpx.Client(base_url=f"{url}/api", timeout=30,
                              headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
        while True:
            try:
                if client.get("/deployments/name/restore-etcd-cluster/on-demand").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(1)
        # the UI calls this server, not 127.0.0.1:4200
        assert httpx.get(f"{url}/ui-settings").json()["api_url"] == f"{url}/api"

        snap, expected = prepare_lab(lab3, tmp_path)
        lab3.break_member("etcd1", "corrupt")

        def call(method: str, path: str, **kw) -> dict | list:
            """Retried while the server's SQLite answers 5xx under load (seen in CI); the
            idempotency key makes the run's creation safe to repeat."""
            for _ in range(6):
                r = client.request(method, path, **kw)
                if r.status_code < 500:
                    break
                time.sleep(1)
            assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:500]}"
            return r.json()

        dep = call("GET", "/deployments/name/restore-etcd-cluster/on-demand")
        run = call("POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": {
            "inventory": str(lab3.dir / "inventory.yaml"), "snapshot": str(snap)}, "idempotency_key": "ui-test"})

        def state() -> str:
            return call("GET", f"/flow_runs/{run['id']}")["state"]["type"]

        while state() != "PAUSED":
            assert state() in ("SCHEDULED", "PENDING", "RUNNING") and time.monotonic() < deadline + 120, state()
            time.sleep(1)

        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(str(tmp_path / "chromium"), executable_path=CHROMIUM,
                                                            headless=True, args=ARGS)
            try:
                page = browser.new_page()
                # A secured server: the UI asks for the auth string first. (A deep link to the run
                # lands on the dashboard, not the login: 3.9.1's route guard. Its own redirect is used.)
                page.goto(f"{url}/login?redirect=/runs/flow-run/{run['id']}")
                login = page.get_by_placeholder("admin:pass")
                login.wait_for(timeout=60_000)
                login.fill(auth)
                login.press("Enter")
                page.get_by_role("button", name="Resume").click(timeout=60_000)
                page.get_by_role("switch").first.click()
                boxes = page.locator("textarea")
                boxes.nth(0).fill("Dana Operator")
                boxes.nth(1).fill("INC-77 etcd1 corrupt")
                page.get_by_role("button", name="Submit").click()
                page.screenshot(path=str(tmp_path / "after-submit.png"))
            finally:
                browser.close()

        while state() != "COMPLETED":
            assert state() not in ("FAILED", "CRASHED", "CANCELLED") and time.monotonic() < deadline + 420, state()
            time.sleep(1)
        assert_restored(lab3, expected)
        report = call("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]},
                                                                       "key": {"any_": ["restore-report"]}}})
        text = report[0]["data"]
        assert "approved by: Dana Operator (INC-77 etcd1 corrupt), through the Prefect UI or REST API" in text, text
    finally:
        _stop(p)
