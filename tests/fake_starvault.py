"""A fake StarVault KV v2 endpoint (StarVault is Vault-like and cannot run here): the
repository password's secret, with versions and check-and-set, over real HTTP. A soft-deleted
newest version reads as Vault's kv plugin answers it (vault-plugin-secrets-kv path_data.go,
handleDataRead): 404, and the body still carries data.metadata with its version and
deletion_time, data.data null."""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from blocks.storage import StarVaultCredentials

PATH = "/v1/nova-secrets/data/credentials/nova-velero"


class KV:
    def __init__(self):
        self.token = "s." + secrets.token_hex(8)
        self.versions: list[dict] = []  # what was written, oldest first
        self.initial = {"repository_password": "static-passw0rd", "other": "kept"}
        self.deleted = False  # the newest version soft-deleted (`vault kv delete`)

    def start(self) -> "KV":
        kv = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _allowed(self):
                if self.path != PATH:
                    self._reply(404, {"errors": []})
                elif self.headers.get("X-Vault-Token") != kv.token:
                    self._reply(403, {"errors": ["permission denied"]})
                else:
                    return True
                return False

            def do_GET(self):
                if self._allowed():
                    data = kv.versions[-1] if kv.versions else kv.initial
                    meta = {"version": len(kv.versions) + 1, "destroyed": False,
                            "deletion_time": "2026-11-30T10:00:00.0Z" if kv.deleted else ""}
                    if kv.deleted:
                        self._reply(404, {"data": {"data": None, "metadata": meta}})
                    else:
                        self._reply(200, {"data": {"data": data, "metadata": meta}})

            def do_POST(self):
                if not self._allowed():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if body.get("options", {}).get("cas") != len(kv.versions) + 1:
                    self._reply(400, {"errors": ["check-and-set parameter did not match the current version"]})
                    return
                kv.versions.append(body["data"])
                self._reply(200, {"data": {"version": len(kv.versions) + 1}})

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.block = "sv-kv-test"
        StarVaultCredentials(address=f"http://127.0.0.1:{self.srv.server_address[1]}", token=self.token).save(
            self.block, overwrite=True)
        return self

    def stop(self):
        self.srv.shutdown()
