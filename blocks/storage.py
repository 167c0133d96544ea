"""Credentials for where backups go and where StarVault lives. Nothing else reads secrets."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class S3Credentials(Block):
    """An S3-compatible bucket's endpoint and keys, for backup stores s3://bucket/prefix."""

    _block_type_name = "Nova Backup S3 Credentials"
    _block_type_slug = "nova-backup-s3-credentials"

    endpoint_url: str | None = Field(None, description="e.g. https://s3.mycompany.local; empty for AWS")
    region_name: str = Field("us-east-1", description="the bucket's region")
    access_key_id: str = Field(description="access key id")
    secret_access_key: SecretStr = Field(description="secret access key")
    server_side_encryption: str | None = Field(None, description="AES256 or aws:kms to ask the server to encrypt")

    def session(self):
        """A boto3 session; the secret is unwrapped only here."""
        import boto3

        return _EndpointSession(boto3.session.Session(
            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key.get_secret_value(),
            region_name=self.region_name), self.endpoint_url)


class _EndpointSession:
    def __init__(self, session, endpoint_url):
        self._s, self._endpoint = session, endpoint_url

    def client(self, name, **kw):
        return self._s.client(name, endpoint_url=self._endpoint, **kw)


class StarVaultCredentials(Block):
    """StarVault's API address and a token allowed to read sys/storage/raft/snapshot."""

    _block_type_name = "Nova StarVault Credentials"
    _block_type_slug = "nova-starvault-credentials"

    address: str = Field(description="e.g. https://starvault.nova-system.svc:8200")
    token: SecretStr = Field(description="a token with read on sys/storage/raft/snapshot")
    ca_cert: str | None = Field(None, description="PEM of the CA that signed StarVault's certificate")


class BackupSigningKey(Block):
    """The Ed25519 key the backup flow signs each set's manifest with (`ssh-keygen -t ed25519`).
    Its public key goes into the inventory's backup_signers, for the readers."""

    _block_type_name = "Nova Backup Signing Key"
    _block_type_slug = "nova-backup-signing-key"

    private_key: SecretStr = Field(description="the OpenSSH private key text (-----BEGIN OPENSSH PRIVATE KEY-----)")
    passphrase: SecretStr | None = Field(None, description="its passphrase, if it has one")


class AgeIdentity(Block):
    """The age identities (private keys) that open encrypted backup sets: one per line, as
    `age-keygen` writes them. Several lines while keys are rotated: any of them may open a file."""

    _block_type_name = "Nova Backup Age Identity"
    _block_type_slug = "nova-backup-age-identity"

    identities: SecretStr = Field(description="AGE-SECRET-KEY-1... lines (comments starting with # allowed)")
