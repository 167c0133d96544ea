"""The Kubernetes API through the official client: a few verbs the flows need, each turning the
server's `Status` into one error that names the object."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import BinaryIO, Callable

from core.errors import NovaDRError
from core.kube import FIELD_MANAGER, exec_exit_code


class KubeError(NovaDRError):
    def __init__(self, message: str, status: int = 0, reason: str = ""):
        super().__init__(message)
        self.status, self.reason = status, reason


APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


class Kube:
    def __init__(self, api_client):
        from kubernetes import client

        self.c = api_client
        self.core, self.apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
        self.batch, self.co = client.BatchV1Api(api_client), client.CustomObjectsApi(api_client)

    @property
    def host(self) -> str:
        return self.c.configuration.host

    def call(self, what: str, fn: Callable, *args, missing_ok: bool = False, raw: bool = False, **kw):
        """fn(*args, **kw) as plain JSON-like data (raw: as returned); None for a 404 when
        missing_ok; KubeError otherwise."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            out = fn(*args, **kw)
        except ApiException as err:
            if err.status == 404 and missing_ok:
                return None
            try:
                body = json.loads(err.body or "{}")
            except ValueError:
                body = {}
            if err.status == 0:
                raise KubeError(f"{what}: the Kubernetes API at {self.host} did not answer ({err.reason})") from None
            msg = body.get("message") or err.reason
            raise KubeError(f"{what}: {msg} (HTTP {err.status})", err.status, body.get("reason", "")) from None
        except HTTPError as err:
            raise KubeError(f"{what}: the Kubernetes API at {self.host} is unreachable ({type(err).__name__})") from None
        if raw or out is None or isinstance(out, dict):
            return out
        return self.c.sanitize_for_serialization(out)

    # --- custom resources (group, version) ------------------------------------------------------

    def get_cr(self, gv, plural, ns, name) -> dict | None:
        return self.call(f"read {plural}.{gv[0]} {ns}/{name}", self.co.get_namespaced_custom_object,
                         *gv, ns, plural, name, missing_ok=True)

    def list_cr(self, gv, plural, ns, label_selector: str | None = None) -> list[dict]:
        return self.call(f"list {plural}.{gv[0]} in {ns}", self.co.list_namespaced_custom_object, *gv, ns, plural,
                         label_selector=label_selector)["items"]

    def create_cr(self, gv, plural, obj) -> dict:
        ns, name = obj["metadata"]["namespace"], obj["metadata"].get("name") or obj["metadata"].get("generateName")
        return self.call(f"create {plural}.{gv[0]} {ns}/{name}", self.co.create_namespaced_custom_object,
                         *gv, ns, plural, obj)

    def apply_cr(self, gv, plural, obj, force: bool = False) -> dict:
        """Server-side apply as field manager nova-dr. A create answers 201, which the client
        maps to nothing: the object is read back."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        what = f"apply {obj['kind']} {ns}/{name}"
        try:
            self.call(what, self.co.patch_namespaced_custom_object, *gv, ns, plural, name, obj,
                      field_manager=FIELD_MANAGER, force=force or None, _content_type=APPLY)
        except KubeError as err:
            if err.status == 409:
                raise KubeError(f"{err} — another field manager owns these fields; re-run with force=true to take "
                                "them over, or change them where they are managed", 409, err.reason) from None
            raise
        return self.get_cr(gv, plural, ns, name)

    def merge_cr(self, gv, plural, ns, name, patch: dict) -> dict:
        return self.call(f"patch {plural}.{gv[0]} {ns}/{name}", self.co.patch_namespaced_custom_object,
                         *gv, ns, plural, name, patch, _content_type=MERGE)

    def delete_cr(self, gv, plural, ns, name) -> bool:
        return self.call(f"delete {plural}.{gv[0]} {ns}/{name}", self.co.delete_namespaced_custom_object,
                         *gv, ns, plural, name, missing_ok=True) is not None

    # --- built-in objects -----------------------------------------------------------------------

    def namespace_exists(self, ns: str) -> bool:
        return self.call(f"read namespace {ns}", self.core.read_namespace, ns, missing_ok=True) is not None

    def apply_secret(self, ns: str, name: str, string_data: dict[str, str], labels: dict | None = None) -> dict:
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": ns, **({"labels": labels} if labels else {})},
                "stringData": string_data}
        self.call(f"apply secret {ns}/{name}", self.core.patch_namespaced_secret, name, ns, body,
                  field_manager=FIELD_MANAGER, force=True, _content_type=APPLY)
        return self.call(f"read secret {ns}/{name}", self.core.read_namespaced_secret, name, ns)

    def read(self, kind: str, ns: str, name: str) -> dict | None:
        fn = {"Deployment": self.apps.read_namespaced_deployment, "DaemonSet": self.apps.read_namespaced_daemon_set,
              "CronJob": self.batch.read_namespaced_cron_job, "Secret": self.core.read_namespaced_secret}[kind]
        return self.call(f"read {kind} {ns}/{name}", fn, name, ns, missing_ok=True)

    def pods(self, ns: str, label_selector: str | None = None) -> list[dict]:
        return self.call(f"list pods in {ns}", self.core.list_namespaced_pod, ns,
                         label_selector=label_selector)["items"]

    def jobs(self, ns: str) -> list[dict]:
        return self.call(f"list jobs in {ns}", self.batch.list_namespaced_job, ns)["items"]

    def restart_deployment(self, ns: str, name: str) -> dict:
        """What `kubectl rollout restart` does: a new restartedAt annotation on the pod template."""
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}}}}
        return self.call(f"restart deployment {ns}/{name}", self.apps.patch_namespaced_deployment, name, ns, patch,
                         field_manager=FIELD_MANAGER, _content_type="application/strategic-merge-patch+json")

    def delete(self, kind: str, ns: str, name: str) -> bool:
        fn = {"DaemonSet": self.apps.delete_namespaced_daemon_set}[kind]
        return self.call(f"delete {kind} {ns}/{name}", fn, name, ns, propagation_policy="Background",
                         missing_ok=True) is not None

    # --- exec -----------------------------------------------------------------------------------

    def exec_to(self, ns: str, pod: str, container: str, command: list[str], sink: BinaryIO,
                timeout: float = 3600) -> tuple[int, str]:
        """Run command in the container; its stdout goes to sink byte for byte (binary mode:
        in text mode the client decodes and corrupts binary data). Returns (exit code, stderr).

        The frames are read here, not with the client's update()/read_stdout(): update() takes
        every frame already waiting, appending each to one bytes object (and, with
        capture_all, to a second copy), so while the pod sends faster than we write, all of
        it piles up in memory, copied again per frame (kubernetes ws_client.py, 37.0)."""
        from kubernetes import client
        from kubernetes.stream import stream
        from websocket import ABNF, WebSocketTimeoutException

        what = f"exec in pod {ns}/{pod} container {container}"
        # stream() swaps the ApiClient's call_api while it connects: with a shared client, exec in
        # parallel threads would leave it swapped for good. One client per exec.
        core = client.CoreV1Api(client.ApiClient(self.c.configuration))
        ws = self.call(what, stream, core.connect_get_namespaced_pod_exec, pod, ns, command=command,
                       container=container, stderr=True, stdin=False, stdout=True, tty=False, binary=True,
                       _preload_content=False, raw=True)
        err, status = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            ws.sock.settimeout(5)
            while True:
                if time.monotonic() > deadline:
                    raise KubeError(f"{what}: {' '.join(command)} did not finish within {timeout:.0f} s")
                try:
                    op, frame = ws.sock.recv_data_frame(True)
                except WebSocketTimeoutException:
                    continue
                if op == ABNF.OPCODE_CLOSE:
                    break
                data = frame.data if op in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT) else b""
                if not data:
                    continue
                channel, data = data[0], data[1:]
                if channel == 1:
                    sink.write(data)
                elif channel == 2:
                    err += data[: max(0, 65536 - len(err))]  # enough to explain a failure
                elif channel == 3:
                    status += data  # 255 (v5: a channel closed) needs nothing here
            try:  # not ws.returncode: it int()s whatever the status's first cause says
                code = exec_exit_code(bytes(status))
            except ValueError as why:
                raise KubeError(f"{what}: {' '.join(command)} could not run: {why}") from None
            return code, err.decode(errors="replace")
        finally:
            ws.close()


def wait_for(what: str, probe: Callable[[], tuple[bool, object]], timeout_s: float, poll_s: float):
    """Call probe until it says done; KubeError naming `what` and the last state on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, state = probe()
        if done:
            return state
        if time.monotonic() >= deadline:
            raise KubeError(f"{what}: not done after {timeout_s:.0f} s; last state: {state}")
        time.sleep(poll_s)
