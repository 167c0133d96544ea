"""The cluster inventory as a Prefect Block: the YAML plus the SSH secrets, stored on the server.

A flow's `inventory` parameter is a YAML path or `block:NAME`; both give the same model.
"""

from __future__ import annotations

import yaml
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from core.errors import InventoryError
from core.inventory import Cluster, load_inventory_file, parse_inventory


class ClusterInventory(Block):
    """A Nova cluster's masters, with the SSH key and known_hosts used to reach them."""

    _block_type_name = "Nova Cluster Inventory"
    _block_type_slug = "nova-cluster-inventory"

    inventory_yaml: str = Field(
        description="The inventory YAML without ssh.private_key_file/known_hosts_file "
        "(they are the two secret fields below)."
    )
    ssh_private_key: SecretStr | None = Field(None, description="SSH private key for the masters (OpenSSH text); "
                                              "empty with ssh.use_agent: true, for the ssh-agent's keys only.")
    key_passphrase: SecretStr | None = Field(None, description="The private key's passphrase, if it has one.")
    known_hosts: SecretStr = Field(description="known_hosts lines, one or more per master.")
    sudo_password: SecretStr | None = Field(None, description="The SSH user's sudo password, for ssh.become: "
                                            "sudo without NOPASSWD (sent to sudo on stdin only).")

    def to_cluster(self, name: str = "") -> Cluster:
        data = yaml.safe_load(self.inventory_yaml) or {}
        if not isinstance(data, dict):
            raise InventoryError(f"inventory block:{name}: inventory_yaml must be a mapping")
        ssh = dict(data.get("ssh") or {})
        for key in ("private_key_file", "known_hosts_file", "private_key", "known_hosts", "sudo_password_file",
                    "sudo_password", "key_passphrase_file", "key_passphrase"):
            if key in ssh:
                raise InventoryError(
                    f"inventory block:{name}: ssh.{key} in inventory_yaml; put the key and "
                    "known_hosts in the block's secret fields instead"
                )
        ssh["known_hosts"] = self.known_hosts.get_secret_value()
        for key, value in (("private_key", self.ssh_private_key), ("sudo_password", self.sudo_password),
                           ("key_passphrase", self.key_passphrase)):
            if value is not None:
                ssh[key] = value.get_secret_value()
        data["ssh"] = ssh
        return parse_inventory(data, f"block:{name}")

    @classmethod
    def from_file(cls, path: str) -> "ClusterInventory":
        """Build the block from an inventory YAML (for `nova-dr inventory save`)."""
        cluster = load_inventory_file(path)
        data = yaml.safe_load(open(path))
        ssh = {k: v for k, v in (data.get("ssh") or {}).items() if not k.endswith("_file")}
        data["ssh"] = ssh
        return cls(
            inventory_yaml=yaml.safe_dump(data, sort_keys=False),
            ssh_private_key=cluster.ssh.private_key,
            known_hosts=cluster.ssh.known_hosts,
            sudo_password=cluster.ssh.sudo_password,
            key_passphrase=cluster.ssh.key_passphrase,
        )


def resolve_inventory(ref: str) -> Cluster:
    """`block:NAME` loads a saved ClusterInventory block; anything else is a YAML path."""
    if not ref:
        raise InventoryError("no inventory given; pass --inventory PATH (or block:NAME)")
    if ref.startswith("block:"):
        name = ref.removeprefix("block:")
        try:
            block = ClusterInventory.load(name)
        except ValueError as err:
            raise InventoryError(
                f"inventory block:{name}: no such block ({err}); save one with "
                "`nova-dr inventory save FILE --name NAME`"
            ) from None
        return block.to_cluster(name)
    return load_inventory_file(ref)
