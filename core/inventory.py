"""The cluster inventory: which masters exist, how to reach them, where things live on them.

Paths, unit names and commands are defaults here, not constants in code: real clusters
differ. A master may override any of them under its own `paths:`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from core.errors import InventoryError

VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MasterPaths(_Strict):
    """Where things live on a master, and the commands that drive its etcd unit."""

    etcd_env: str = Field("/etc/etcd.env", description="etcd's env file (ETCD_* and ETCDCTL_*)")
    data_dir: str = Field("/var/lib/etcd", description="etcd's data dir (often a mount point)")
    etcdctl: str = Field("/opt/etcd/etcdctl", description="etcdctl binary on the master")
    etcdutl: str | None = Field(
        "/opt/etcd/etcdutl", description="etcdutl binary; used for restores when present"
    )
    service_start: list[str] = Field(["systemctl", "start", "etcd"], description="start etcd")
    service_stop: list[str] = Field(["systemctl", "stop", "etcd"], description="stop etcd")
    service_reset_failed: list[str] = Field(
        ["systemctl", "reset-failed", "etcd"],
        description="clears a failed unit and its start limit (StartLimitBurst), run before a start",
    )
    service_user: list[str] = Field(
        ["systemctl", "show", "-p", "User", "--value", "etcd"],
        description="prints the unit's User= (empty: root): the owner of a data dir nova-dr has to create",
    )
    service_is_active: list[str] = Field(
        ["systemctl", "is-active", "etcd"], description="prints active/inactive/failed/activating"
    )
    service_logs: list[str] = Field(
        ["journalctl", "-u", "etcd", "-n", "40", "--no-pager"], description="etcd's last log lines"
    )
    kube_apiserver_manifest: str | None = Field(
        "/etc/kubernetes/manifests/kube-apiserver.yaml",
        description="static pod manifest parked during a full restore; null to skip",
    )
    manifest_park_dir: str = Field(
        "/etc/kubernetes/nova-dr-parked",
        description="where the manifest is parked: outside the manifests folder, "
        "because the kubelet runs every file it finds there",
    )
    pki_dir: str = Field("/etc/kubernetes/pki", description="TLS certificates and keys")
    encryption_config: str = Field(
        "/etc/kubernetes/encryption-config.yaml", description="kube-apiserver encryption config"
    )
    unseal_tokens: str = Field(
        "/etc/starvault/unseal-tokens", description="StarVault unseal tokens, one per line"
    )
    backup_dir: str = Field("/opt/backup", description="where the backup daemon writes")
    lock_dir: str = Field("/var/lib/nova-dr", description="where the cluster lock lives (one recovery per cluster)")


class Master(_Strict):
    node: str = Field(description="Kubernetes node name, e.g. nova-master-1.mycompany.local")
    archive_name: str = Field("", description="name in this master's backup archive; default: node")
    address: str = Field(description="IP address or DNS name reached over SSH")
    ssh_port: int = Field(22, ge=1, le=65535)
    ssh_user: str = "root"
    etcd_member: str = Field(description="etcd member name, e.g. etcd1")
    peer_url: str = Field("", description="default https://<address>:2380")
    client_url: str = Field("", description="default https://<address>:2379")
    paths: MasterPaths = Field(default_factory=MasterPaths)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if data.get("node") and not data.get("archive_name"):
                data["archive_name"] = data["node"]
            if data.get("address"):
                data.setdefault("peer_url", f"https://{data['address']}:2380")
                data.setdefault("client_url", f"https://{data['address']}:2379")
        return data

    @field_validator("node", "etcd_member", "archive_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a plain name; write letters, digits, '.', '_' or '-'")
        return v

    @field_validator("peer_url", "client_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or not port or parts.path not in ("", "/"):
            raise ValueError(f"{v!r} is not a URL like https://10.0.0.1:2380 (scheme, host and port)")
        return v.rstrip("/")


class JumpHost(_Strict):
    """A bastion the masters are reached through, checked as strictly as they are."""

    address: str = Field(description="the bastion's address; its host key must be in known_hosts")
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("", description="default: each master's ssh_user")


class SSHSettings(_Strict):
    private_key: SecretStr | None = Field(None, description="the SSH private key (OpenSSH or PEM text); "
                                          "none: only the ssh-agent's keys (use_agent)")
    key_passphrase: SecretStr | None = Field(None, description="the private key's passphrase, if it has one")
    use_agent: bool = Field(False, description="offer the keys of the ssh-agent at $SSH_AUTH_SOCK too")
    jump_host: JumpHost | None = Field(None, description="reach the masters through this bastion (ssh -J)")
    known_hosts: SecretStr = Field(description="known_hosts lines for every master")
    strict_host_keys: bool = Field(True, description="refuse unknown or changed host keys")
    connect_timeout: float = Field(10.0, gt=0)
    connect_attempts: int = Field(3, ge=1, le=10)
    # A partition drops packets without closing anything: with no output for
    # `probe_after_seconds`, nova-dr asks sshd for an answer (a global request it must reply
    # to), and a master silent for `dead_after_seconds` is a lost connection, retried.
    probe_after_seconds: float = Field(5.0, gt=0)
    dead_after_seconds: float = Field(15.0, gt=0)
    become: Literal["none", "sudo"] = Field(
        "none", description="how commands get root: none (the user is root) or sudo (NOPASSWD, or sudo_password)")
    sudo_password: SecretStr | None = Field(None, description="the user's sudo password, sent to sudo on stdin only")

    @model_validator(mode="after")
    def _a_key(self) -> "SSHSettings":
        if self.private_key is None and not self.use_agent:
            raise ValueError("no SSH key: give ssh.private_key_file, or use_agent: true for the ssh-agent's keys")
        return self


class Cluster(_Strict):
    name: str = Field(description="cluster name; recoveries are one at a time per name")
    nova_version: str = Field(description="Nova patch version x.y.Z, with or without a 'v'")
    k8s_version: str = Field(description="Kubernetes version x.y.Z, with or without a 'v'")
    etcd_token: str = Field("k8s_etcd", description="--initial-cluster-token")
    unseal_threshold: int = Field(3, ge=1, description="unseal shares needed (3 of 5 by default)")
    backup_recipients: list[str] = Field(default_factory=list, description="age X25519 public keys (age1...) the "
                                         "backups are encrypted to; empty: stored unencrypted (warned every time)")
    backup_signers: list[str] = Field(default_factory=list, description="Ed25519 public keys (ssh-ed25519 AAAA..., "
                                      "one `.pub` line each) whose signed sets readers trust; any other set is "
                                      "refused unless allow_unsigned=true")
    backup_signing_block: str | None = Field(None, description="the Nova Backup Signing Key block the backup flow "
                                             "signs each set with; none: sets are unsigned (warned every time)")
    ssh: SSHSettings
    masters: list[Master]

    @field_validator("name")
    @classmethod
    def _cname(cls, v: str) -> str:
        return Master._name(v)

    @field_validator("nova_version", "k8s_version")
    @classmethod
    def _version(cls, v: str) -> str:
        m = VERSION_RE.match(str(v).strip())
        if not m:
            raise ValueError(f"{v!r} is not a version x.y.Z; write e.g. 6.0.1 or v6.0.1")
        return ".".join(m.groups())

    @field_validator("backup_signers")
    @classmethod
    def _signers(cls, v: list[str]) -> list[str]:
        from core.signing import public_key

        for t in v:
            try:
                public_key(t)
            except Exception as err:  # NovaDRError: shown as the field's message
                raise ValueError(str(err)) from None
        return v

    @field_validator("masters")
    @classmethod
    def _masters(cls, v: list[Master]) -> list[Master]:
        if not v:
            raise ValueError("the cluster has no masters; list at least one under masters:")
        for attr in ("node", "etcd_member", "archive_name", "peer_url", "client_url"):
            seen: set[str] = set()
            for m in v:
                val = getattr(m, attr)
                if val in seen:
                    raise ValueError(f"two masters share {attr} {val!r}; every master needs its own")
                seen.add(val)
        return v

    @property
    def nova_tag(self) -> str:
        return f"v{self.nova_version}"

    @property
    def k8s_tag(self) -> str:
        return f"v{self.k8s_version}"

    def master(self, member_or_node: str) -> Master:
        for m in self.masters:
            if member_or_node in (m.etcd_member, m.node):
                return m
        names = ", ".join(m.etcd_member for m in self.masters)
        raise InventoryError(
            f"no master named {member_or_node!r} in cluster {self.name!r}; the members are: {names}"
        )

    def initial_cluster(self) -> str:
        """`--initial-cluster` for a full restore: every member with its own peer URL."""
        return ",".join(f"{m.etcd_member}={m.peer_url}" for m in self.masters)


def _merge_paths(data: Any) -> Any:
    """Cluster-level `paths:` are the defaults of every master's own `paths:`."""
    if not isinstance(data, dict) or "paths" not in data:
        return data
    data = dict(data)
    common = data.pop("paths") or {}
    if not isinstance(common, dict):
        raise InventoryError("inventory: paths: must be a mapping of path names to values")
    masters = []
    for m in data.get("masters") or []:
        if isinstance(m, dict):
            m = {**m, "paths": {**common, **(m.get("paths") or {})}}
        masters.append(m)
    data["masters"] = masters
    return data


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling (see README, 'Inventory')"
        elif e["type"] == "missing":
            msg = "required; add it"
        lines.append(f"{loc or '(top)'}: {msg}")
    return f"inventory {source}: " + "; ".join(lines)


def parse_inventory(data: Any, source: str) -> Cluster:
    try:
        return Cluster.model_validate(_merge_paths(data))
    except ValidationError as err:
        raise InventoryError(format_validation_error(source, err)) from None


def load_inventory_file(path: str | Path) -> Cluster:
    """Load an inventory YAML. `ssh.private_key_file`, `ssh.known_hosts_file` and
    `ssh.sudo_password_file` are read here (relative to the YAML's folder), so the model holds
    them as secrets."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"inventory {path}: no such file; pass --inventory PATH or block:NAME") from None
    except yaml.YAMLError as err:
        raise InventoryError(f"inventory {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise InventoryError(f"inventory {path}: expected a mapping with name, nova_version, masters")
    ssh = dict(data.get("ssh") or {})
    for key, target in (("private_key_file", "private_key"), ("known_hosts_file", "known_hosts"),
                        ("sudo_password_file", "sudo_password"), ("key_passphrase_file", "key_passphrase")):
        if key in ssh:
            file = Path(ssh.pop(key)).expanduser()
            file = file if file.is_absolute() else path.parent / file
            try:
                ssh[target] = file.read_text()
                if target in ("sudo_password", "key_passphrase"):
                    ssh[target] = ssh[target].rstrip("\n")  # the file's one line, not its newline
            except OSError as err:
                raise InventoryError(f"inventory {path}: ssh.{key}: cannot read {file}: {err.strerror}") from None
    data["ssh"] = ssh
    return parse_inventory(data, str(path))
