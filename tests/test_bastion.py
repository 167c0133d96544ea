"""Masters behind a bastion (`ssh.jump_host`): the lab's jump host, an sshd of its own."""

from __future__ import annotations


import pytest

from core.errors import AuthError, ConnectError
from flows.restore import restore_etcd_cluster
from tasks.remote import connect
from tests.test_restore import assert_restored, error_of, prepare_lab


def test_a_restore_through_the_bastion_as_nova_with_sudo(lab_factory, tmp_path):
    lab = lab_factory(3, bastion=True)
    cluster = lab.cluster()
    assert cluster.ssh.jump_host.address.endswith(".10") and cluster.ssh.become == "sudo"
    snap, expected = prepare_lab(lab, tmp_path)
    lab.break_member("etcd1", "corrupt")
    lab.break_member("etcd2", "wipe")
    state = restore_etcd_cluster(inventory=str(lab.dir / "inventory.yaml"), snapshot=str(snap), auto_approve=True,
                                 return_state=True)
    assert state.is_completed(), error_of(state)
    assert_restored(lab, expected)

    # The bastion's host key is checked as strictly as a master's...
    bad = "\n".join(line for line in cluster.ssh.known_hosts.get_secret_value().splitlines()
                    if not line.startswith(cluster.ssh.jump_host.address + " "))
    from pydantic import SecretStr

    unknown = cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"known_hosts": SecretStr(bad)})})
    with pytest.raises(AuthError, match=f"jump host nova@{cluster.ssh.jump_host.address}:22: host key unknown"):
        connect(unknown, unknown.masters[0]).run(["true"])
    # ...and it is the way in: without it, no master is reached.
    lab.stop_sshd("bastion")
    quick = cluster.model_copy(update={"ssh": cluster.ssh.model_copy(update={"connect_attempts": 1,
                                                                            "connect_timeout": 2})})
    with pytest.raises(ConnectError, match="unreachable through jump host"):
        connect(quick, quick.masters[1]).run(["true"])
