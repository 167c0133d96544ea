"""How the Kubernetes-side flows reach the cluster's API: a kubeconfig kept in a Block (a
secret), a kubeconfig file on the worker, or the pod's own service account."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from core.errors import NovaDRError


class KubernetesCredentials(Block):
    """A kubeconfig (with its token or client key), or in-cluster credentials."""

    _block_type_name = "Nova Kubernetes Credentials"
    _block_type_slug = "nova-kubernetes-credentials"

    kubeconfig: SecretStr | None = Field(None, description="the kubeconfig's YAML, as `kubectl config view --raw` "
                                                           "prints it; empty for in-cluster credentials")
    context: str | None = Field(None, description="the context to use; empty for the kubeconfig's current one")

    def api_client(self):
        if self.kubeconfig is None:
            return _in_cluster()
        return _from_dict(yaml.safe_load(self.kubeconfig.get_secret_value()), self.context, "the block's kubeconfig")


def _from_dict(cfg, context, what):
    from kubernetes import config

    if not isinstance(cfg, dict) or not cfg.get("clusters"):
        raise NovaDRError(f"{what} is not a kubeconfig (no clusters); paste `kubectl config view --raw`")
    try:
        return config.new_client_from_config_dict(cfg, context=context)
    except config.ConfigException as err:
        raise NovaDRError(f"{what}: {err}") from None


def _in_cluster():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException as err:
        raise NovaDRError(f"in-cluster credentials: {err}; pass kube=block:NAME or a kubeconfig path") from None
    return client.ApiClient()


def resolve_kube(ref: str | None):
    """`block:NAME`, `in-cluster`, or a kubeconfig path; default $NOVA_DR_KUBE, then ~/.kube/config."""
    ref = ref or os.environ.get("NOVA_DR_KUBE") or "~/.kube/config"
    if ref.startswith("block:"):
        try:
            creds = KubernetesCredentials.load(ref[len("block:"):])
        except ValueError:
            raise NovaDRError(f"kube={ref}: no such Kubernetes credentials block; save one in the UI or with "
                              "KubernetesCredentials(...).save(NAME)") from None
        return creds.api_client()
    if ref == "in-cluster":
        return _in_cluster()
    path = Path(ref).expanduser()
    if not path.is_file():
        raise NovaDRError(f"kube={ref}: no kubeconfig there; pass kube=block:NAME, kube=in-cluster or a kubeconfig "
                          "path (or set NOVA_DR_KUBE)")
    return _from_dict(yaml.safe_load(path.read_text()), None, f"kubeconfig {path}")
