"""Pod exec over the channel websocket protocol the client speaks: v5.channel.k8s.io, falling
back to v4 (channel 0 stdin, 1 stdout, 2 stderr, 3 the final status). The status is what the
kubelet writes (kubernetes pkg/kubelet/cri/streaming/remotecommand/exec.go ServeExec, 1.30):
Success; NonZeroExitCode with an ExitCode cause; or, when the command never ran (no such
binary, an OCI runtime error), apierrors.NewInternalError: reason InternalError, code 500, the
error text as the cause's message."""

from __future__ import annotations

import copy
import json

from aiohttp import web

from tests.fakekube.common import V4, V5, ApiError, ExecResult


class ExecMixin:
    async def _exec_ws(self, request, rt, version, ns, name, sub):
        with self._lock:
            pod = self.objects.get(("", "pods", ns, name))
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
        containers = [c["name"] for c in pod["spec"].get("containers", [])]
        container = request.query.get("container") or (containers[0] if len(containers) == 1 else None)
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            raise ApiError(400, "BadRequest", f"cannot exec into a container in a completed pod; current phase is {phase}")
        command = request.query.getall("command", [])
        ws = web.WebSocketResponse(protocols=self.exec_protocols, max_msg_size=0)
        if not ws.can_prepare(request).ok:
            raise ApiError(400, "BadRequest", "Upgrade request required")
        await ws.prepare(request)
        if ws.ws_protocol not in (V5, V4):
            await ws.close()
            return ws
        result = None
        for handler in self._exec:
            result = handler(copy.deepcopy(pod), container, command)
            if result is not None:
                break
        if result is None:  # what containerd/runc answer for a binary the image does not have
            result = ExecResult(internal_error=f'failed to exec in container: failed to start exec "{name}": OCI '
                                f'runtime exec failed: exec failed: unable to start container process: exec: '
                                f'"{command[0] if command else ""}": executable file not found in $PATH: unknown')
        out = [result.stdout] if isinstance(result.stdout, bytes) else result.stdout
        for channel, parts in ((1, out), (2, [result.stderr])):
            for data in parts:
                for i in range(0, len(data), 32 << 10):
                    await ws.send_bytes(bytes([channel]) + data[i:i + (32 << 10)])
        if result.internal_error:
            err = f"error executing command in container: {result.internal_error}"
            status = {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {err}",
                      "reason": "InternalError", "details": {"causes": [{"message": err}]}, "code": 500}
        elif result.exit_code == 0:
            status = {"metadata": {}, "status": "Success"}
        else:
            status = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                      "message": f"command terminated with non-zero exit code: error executing command {command}, "
                                 f"exit code {result.exit_code}",
                      "details": {"causes": [{"reason": "ExitCode", "message": str(result.exit_code)}]}}
        await ws.send_bytes(b"\x03" + json.dumps(status).encode())
        await ws.close()
        return ws


