"""`lab up --bastion`: a jump host in front of the masters, an sshd of its own (its own host
key in known_hosts, the `nova` account, TCP forwarding for `ssh -J`), on 127.0.NET.10.

On loopback every connection to a master comes from 127.0.0.1, the bastion's too, so the
masters cannot refuse connections that did not come through it: that needs the masters'
own network namespaces (the real-host lab). The inventory goes through it all the same.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from lab import accounts


def lay_out(node_dir: Path, address: str, public_key: str) -> str:
    """Files of the bastion; returns its known_hosts line."""
    for d in ("etc.up", "etc.work", "varlib.up", "varlib.work", "opt.up", "opt.work", "run", "bin"):
        (node_dir / d).mkdir(parents=True, exist_ok=True)
    key = node_dir / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    accounts.write_account(node_dir / "etc.up", node_dir / "varlib.up", str(node_dir / "bin"), public_key, None)
    (node_dir / "sshd_config").write_text(
        f"ListenAddress {address}:22\nHostKey {key}\nPidFile {node_dir}/run/sshd.pid\nPermitRootLogin no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AllowTcpForwarding yes\nPermitTTY no\nMaxSessions 64\nMaxStartups 64:30:128\nLogLevel ERROR\n")
    return f"{address} " + " ".join(Path(f"{key}.pub").read_text().split()[:2])
