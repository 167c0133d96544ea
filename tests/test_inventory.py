"""The inventory model: every bad case gives one clear message; YAML and Block agree; the SSH
key never shows."""

from __future__ import annotations

import pytest
import yaml

from blocks.inventory import ClusterInventory, resolve_inventory
from core.errors import InventoryError
from core.inventory import load_inventory_file, parse_inventory

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nTOP-SECRET-KEY-MATERIAL\n-----END OPENSSH PRIVATE KEY-----\n"


def base(**over) -> dict:
    d = {
        "name": "prod", "nova_version": "v6.0.1", "k8s_version": "1.27.11",
        "ssh": {"private_key": KEY, "known_hosts": "10.0.0.1 ssh-ed25519 AAAA"},
        "masters": [
            {"node": "nova-master-1.mycompany.local", "address": "172.31.100.97", "etcd_member": "etcd1"},
            {"node": "nova-master-2.mycompany.local", "address": "172.31.100.105", "etcd_member": "etcd2"},
            {"node": "nova-master-3.mycompany.local", "address": "172.31.100.106", "etcd_member": "etcd3"},
        ],
    }
    d.update(over)
    return d


def test_defaults_follow_the_seed():
    c = parse_inventory(base(), "t")
    m = c.masters[0]
    assert c.nova_version == "6.0.1" and c.nova_tag == "v6.0.1" and c.k8s_tag == "v1.27.11"
    assert m.peer_url == "https://172.31.100.97:2380" and m.client_url == "https://172.31.100.97:2379"
    assert m.archive_name == m.node and m.paths.etcd_env == "/etc/etcd.env" and m.paths.data_dir == "/var/lib/etcd"
    assert c.etcd_token == "k8s_etcd" and c.unseal_threshold == 3
    assert c.initial_cluster() == ("etcd1=https://172.31.100.97:2380,etcd2=https://172.31.100.105:2380,"
                                   "etcd3=https://172.31.100.106:2380")


def test_cluster_paths_are_defaults_a_master_overrides():
    d = base(paths={"data_dir": "/data/etcd"})
    d["masters"][1]["paths"] = {"data_dir": "/disk2/etcd"}
    c = parse_inventory(d, "t")
    assert [m.paths.data_dir for m in c.masters] == ["/data/etcd", "/disk2/etcd", "/data/etcd"]


def _dup_member(d):
    d["masters"][1]["etcd_member"] = "etcd1"


def _bad_url(d):
    d["masters"][0]["peer_url"] = "htps:/172.31.100.97"


def _unknown_key(d):
    d["masters"][0]["adress"] = "x"


@pytest.mark.parametrize("mutate, expected", [
    (_dup_member, "masters: two masters share etcd_member 'etcd1'"),
    (_bad_url, "masters[0].peer_url: 'htps:/172.31.100.97' is not a URL like https://10.0.0.1:2380"),
    (lambda d: d.update(masters=[]), "masters: the cluster has no masters"),
    (lambda d: d.update(nova_version="6.0"), "nova_version: '6.0' is not a version x.y.Z; write e.g. 6.0.1"),
    (_unknown_key, "masters[0].adress: unknown key; remove it or check its spelling"),
    (lambda d: d.pop("name"), "name: required; add it"),
    (lambda d: d["masters"][0].update(etcd_member="etcd 1"), "masters[0].etcd_member: 'etcd 1' is not a plain name"),
    (lambda d: d["ssh"].pop("private_key"), "ssh: no SSH key: give ssh.private_key_file, or use_agent: true"),
    (lambda d: d["ssh"].update(become="su"), "ssh.become: Input should be 'none' or 'sudo'"),
])
def test_bad_inventories_say_what_to_write(mutate, expected):
    d = base()
    mutate(d)
    with pytest.raises(InventoryError) as e:
        parse_inventory(d, "inv.yaml")
    assert str(e.value).startswith("inventory inv.yaml: ")
    assert expected in str(e.value)
    assert "TOP-SECRET" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InventoryError, match="no such file; pass --inventory"):
        load_inventory_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(InventoryError, match="not valid YAML"):
        load_inventory_file(tmp_path / "bad.yaml")
    d = base()
    d["ssh"] = {"private_key_file": "missing_key", "known_hosts_file": "kh"}
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(InventoryError, match="ssh.private_key_file: cannot read"):
        load_inventory_file(tmp_path / "inv.yaml")


def _write_yaml(tmp_path) -> str:
    d = base()
    (tmp_path / "id_key").write_text(KEY)
    (tmp_path / "kh").write_text("10.0.0.1 ssh-ed25519 AAAA")
    d["ssh"] = {"private_key_file": "id_key", "known_hosts_file": "kh", "connect_timeout": 5}
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(d))
    return str(tmp_path / "inv.yaml")


def test_yaml_and_block_give_the_same_model(tmp_path):
    path = _write_yaml(tmp_path)
    from_yaml = load_inventory_file(path)
    ClusterInventory.from_file(path).save("test-inv", overwrite=True)
    from_block = resolve_inventory("block:test-inv")
    assert from_block == from_yaml
    assert from_block.ssh.private_key.get_secret_value() == KEY
    # What the server stores outside the secret fields carries no key.
    assert "TOP-SECRET" not in ClusterInventory.load("test-inv").inventory_yaml


def test_unknown_block_is_a_clear_error():
    with pytest.raises(InventoryError, match="block:no-such-inv: no such block.*nova-dr inventory save"):
        resolve_inventory("block:no-such-inv")


def test_key_never_in_repr_logs_or_parameters(tmp_path):
    import logging
    import time

    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    path = _write_yaml(tmp_path)
    c = load_inventory_file(path)
    assert "TOP-SECRET" not in repr(c) and "TOP-SECRET" not in str(c) and "TOP-SECRET" not in c.model_dump_json()

    @flow
    def uses_inventory(inventory: str) -> str:
        cluster = resolve_inventory(inventory)
        get_run_logger().info("loaded %r", cluster)
        return cluster.name

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("prefect.flow_runs").addHandler(handler)
    try:
        state = uses_inventory(path, return_state=True)
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(handler)
    assert state.is_completed()
    local = "\n".join(records)
    assert "loaded Cluster(" in local and "TOP-SECRET" not in local
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).parameters == {"inventory": path}
        deadline = time.monotonic() + 20  # logs reach the server in batches
        stored = ""
        while "loaded Cluster(" not in stored and time.monotonic() < deadline:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            stored = "\n".join(x.message for x in logs)
            time.sleep(0.5)
    assert "loaded Cluster(" in stored and "TOP-SECRET" not in stored
