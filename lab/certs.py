"""A lab CA and leaf certificates (EC P-256, ~0.35 s each with openssl)."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(dir: Path, name: str, cn: str) -> None:
    """`name.crt` + `name.key`, a self-signed CA (basicConstraints CA:TRUE)."""
    dir.mkdir(parents=True, exist_ok=True)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=dir)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-days", "3650", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", f"{name}.crt", cwd=dir)
    (dir / f"{name}.key").chmod(0o600)


def make_leaf(dir: Path, name: str, cn: str, ca_dir: Path, ca: str, ips: list[str] = (),
              dns: list[str] = (), days: int = 825, client: bool = True, server: bool = True) -> None:
    dir.mkdir(parents=True, exist_ok=True)
    usages = ",".join(u for u, on in (("serverAuth", server), ("clientAuth", client)) if on)
    san = ",".join([f"IP:{i}" for i in ips] + [f"DNS:{d}" for d in dns])
    ext = dir / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usages}\n" + (f"subjectAltName={san}\n" if san else "")
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=dir)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=dir)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca_dir / f"{ca}.crt"),
             "-CAkey", str(ca_dir / f"{ca}.key"),
             # A random serial: -CAcreateserial races on the .srl file when leaves are made in parallel.
             "-set_serial", str(secrets.randbits(63)), "-days", str(days),
             "-extfile", str(ext), "-out", f"{name}.crt", cwd=dir)
    (dir / f"{name}.key").chmod(0o600)
    (dir / f"{name}.csr").unlink()
    ext.unlink()
