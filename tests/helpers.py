"""Test helpers and the test environment, imported once (as tests.helpers) by conftest and tests.

The environment is set before Prefect is imported anywhere: Prefect reads its settings once.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="nova-dr-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFECT_PORT = _free_port()
os.environ.update(
    PREFECT_HOME=str(ROOT / "prefect"),
    PREFECT_API_URL=f"http://127.0.0.1:{PREFECT_PORT}/api",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    NOVA_DR_HOME=str(ROOT / "nova-dr"),
)

from lab.lab import Lab, etcd_bin_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_nets = itertools.count(int(os.environ.get("NOVA_DR_TEST_NET", "100")))  # 127.0.NET.x per lab


# The lab is real hosts (lab/hosts.py). NOVA_DR_TEST_LAB=loopback runs the suite on the older
# lab of sshds on loopback addresses (no systemd, no networks of their own).
REAL_HOSTS = os.environ.get("NOVA_DR_TEST_LAB", "hosts") != "loopback"


def make_lab(masters: int, sudo_password: bool = False, bastion: bool = False, real_hosts: bool | None = None) -> Lab:
    """A fresh lab on its own addresses (198.18.NET.x hosts, or 127.0.NET.x on loopback)."""
    net = next(_nets)
    lab = Lab(ROOT / f"lab-{net}")
    lab.up(masters=masters, net=net, sudo_password=sudo_password, jump_host=bastion,
           real_hosts=REAL_HOSTS if real_hosts is None else real_hosts, s3_endpoint=shared_s3(), signer=signer())
    return lab


SIGNING_BLOCK = "nova-dr-test-signing"
_signer: list[tuple[str, str]] = []


def signer() -> tuple[str, str]:
    """The session's backup signing key: saved once as a block; every lab's inventory trusts it."""
    if not _signer:
        from blocks.storage import BackupSigningKey

        key = ROOT / "signing" / "id_ed25519"
        key.parent.mkdir(mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nova-dr-tests", "-f", str(key)], check=True)
        BackupSigningKey(private_key=key.read_text()).save(SIGNING_BLOCK, overwrite=True)
        _signer.append((SIGNING_BLOCK, Path(f"{key}.pub").read_text().strip()))
    return _signer[0]


def put_keys(lab: Lab, prefix: str, n: int) -> None:
    """Write n keys with etcdctl `txn` from the host, 100 puts per transaction."""
    lines = []
    for i in range(n):
        lines.append(f'put {prefix}{i:05d} "value-{i}"')
    for start in range(0, n, 100):
        body = "\n".join(lines[start:start + 100])
        p = subprocess.run([str(_etcdctl()), "txn"], input=f"\n{body}\n\n\n", env=lab.etcdctl_env(),
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr


def _etcdctl() -> Path:
    return etcd_bin_dir() / "etcdctl"


def keys_on(lab: Lab, member: str, prefix: str = "/") -> list[str]:
    """Keys as one member alone serves them (serializable read aimed at that member)."""
    m = lab.master(member)
    p = lab.etcdctl("get", prefix, "--prefix", "--keys-only", "--consistency=s",
                    endpoints=[f"https://{m.address}:2379"])
    return [k for k in p.stdout.splitlines() if k]


def snapshot(lab: Lab, path: Path, member: str = "etcd1") -> Path:
    m = lab.master(member)
    lab.etcdctl("snapshot", "save", str(path), endpoints=[f"https://{m.address}:2379"])
    return path


def run_record(run_id: str) -> str:
    """What Prefect's server keeps of a flow run: its parameters, every log line, every artifact."""
    import httpx
    from prefect.logging.handlers import APILogHandler

    api = os.environ["PREFECT_API_URL"]
    APILogHandler().flush()
    run = httpx.get(f"{api}/flow_runs/{run_id}").text
    logs = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}).text
    arts = httpx.post(f"{api}/artifacts/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).text
    assert '"message"' in logs and '"data"' in arts  # the reads found something to look in
    return run + logs + arts


def start_s3(name: str) -> tuple[subprocess.Popen, str]:
    """A real S3 server process (SeaweedFS, lab/s3.py) of a test's own, on free loopback ports."""
    from lab import s3

    return s3.start(ROOT / name, ROOT / f"{name}.log")


_shared_s3: list = []


def shared_s3() -> str:
    """The session's S3 server, started on first use (a start costs seconds); the labs and the
    tests use it, each in buckets of its own. conftest stops it at the end."""
    if not _shared_s3:
        _shared_s3.extend(start_s3("s3-session"))
    return _shared_s3[1]


def stop_shared_s3() -> None:
    from lab import s3

    if _shared_s3:
        p = _shared_s3[0]
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(15)
        s3.remove_sockets(p.ports)
        _shared_s3.clear()


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "nova-test", "AWS_SECRET_ACCESS_KEY": "nova-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    env = s3_env(endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)


# ../shared/schemas holds the real Velero and Flux CRDs; a plain clone of the project has no ../shared.
SCHEMAS = Path(os.environ.get("NOVA_DR_SCHEMAS", REPO.parent / "shared" / "schemas"))
NO_SCHEMAS = f"the real CRDs are read from {SCHEMAS}, which is absent (a clone without ../shared)"


def needs_schemas():
    import pytest

    return pytest.mark.skipif(not SCHEMAS.is_dir(), reason=NO_SCHEMAS)


def register_crds(fake) -> None:
    """The real CRDs of the custom resources the flows talk to."""
    for path in sorted(SCHEMAS.glob("*/*.yaml")):
        fake.register_crd(path)


def kube_client(fake):
    """The official client, configured from the fake's kubeconfig as a user's would be."""
    from kubernetes import config

    return config.new_client_from_config_dict(fake.kubeconfig())


def raft_snapshot_bytes(state: bytes, damage: str | None = None) -> bytes:
    """A StarVault/Vault raft snapshot as /v1/sys/storage/raft/snapshot sends it: a gzip tar of
    meta.json, state.bin and SHA256SUMS (hashicorp/raft-snapshot archive.go). damage:
    "sums" (a wrong digest), "no-sums" (SHA256SUMS left out)."""
    import gzip
    import hashlib
    import io
    import tarfile

    meta = b'{"Version":1,"ID":"2-4201-1764129600000","Index":4201,"Term":2,"Size":%d}' % len(state)
    parts = {"meta.json": meta, "state.bin": state}
    sums = "".join(f"{hashlib.sha256(b'x' if damage == 'sums' and n == 'state.bin' else d).hexdigest()}  {n}\n"
                   for n, d in parts.items()).encode()
    if damage != "no-sums":
        parts["SHA256SUMS"] = sums
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for n, d in parts.items():
            info = tarfile.TarInfo(n)
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    return gzip.compress(buf.getvalue())
