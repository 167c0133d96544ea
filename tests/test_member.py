"""restart-etcd-member and replace-etcd-member on the lab (real etcd over real SSH)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.errors import PreflightError
from core.facts import ClusterFacts, MasterFacts
from core.member_plan import choose_member_to_replace
from core.inventory import parse_inventory
from flows.member import replace_etcd_member, restart_etcd_member
from lab.lab import etcd_bin_dir
from tests.helpers import REPO, keys_on, put_keys
from tests.test_restore import _kill_and_release, _wait_for, error_of, fingerprint, quarantines


# -- who may be replaced: pure, for 1, 3, 5 and 7 masters ----------------------------------

def _cluster(n):
    return parse_inventory({
        "name": "c", "nova_version": "6.0.1", "k8s_version": "1.27.11", "ssh": {"private_key": "k", "known_hosts": ""},
        "masters": [{"node": f"m{i}", "address": f"10.0.0.{i}", "etcd_member": f"etcd{i}"} for i in range(1, n + 1)],
    }, "t")


def _facts(n, down):
    return ClusterFacts(masters=tuple(MasterFacts(member=f"etcd{i}", node=f"m{i}", healthy=i not in down)
                                      for i in range(1, n + 1)))


@pytest.mark.parametrize("n, down, member, refusal", [
    (1, {1}, None, "no quorum"),  # a lone member: nothing to replace it from -> full restore
    (3, {2}, None, None),
    (3, {2, 3}, "etcd2", "no quorum"),
    (5, {2}, None, None),
    (5, {2, 3}, "etcd2", "etcd3 is down too"),  # quorum held, but etcd refuses the add
    (5, {2, 3, 4}, "etcd2", "no quorum"),
    (7, {5}, None, None),
    (7, {2, 3, 4}, "etcd2", "etcd3, etcd4 are down too"),
    (7, {1, 2, 3, 4}, "etcd2", "no quorum"),
])
def test_quorum_rules(n, down, member, refusal):
    if refusal is None:
        assert choose_member_to_replace(_cluster(n), _facts(n, down), member, False) == f"etcd{min(down)}"
    else:
        with pytest.raises(PreflightError, match=refusal):
            choose_member_to_replace(_cluster(n), _facts(n, down), member, False)


def test_every_destructive_step_of_a_replacement_names_its_target():
    """Step ids are checkpoint keys: after a failed replacement of etcd3, a replacement of etcd2
    under the same recovery id must find none of etcd3's steps done."""
    from core.member_plan import build_replace_plan

    c = _cluster(3)
    for_3 = build_replace_plan(c, _facts(3, {3}), "etcd3", "etcd1", "replace-etcd-member-c-auto")
    for_2 = build_replace_plan(c, _facts(3, {2}), "etcd2", "etcd1", "replace-etcd-member-c-auto")
    ids_3 = {s.id for s in for_3.steps if s.args.get("checkpoint", True)}
    ids_2 = {s.id for s in for_2.steps if s.args.get("checkpoint", True)}
    assert ids_3 and not ids_3 & ids_2, ids_3 & ids_2
    assert all("etcd3" in i for i in ids_3)


def test_removing_a_healthy_member_must_keep_quorum():
    # force-replacing a healthy member of 3 with one other down: etcd would refuse the add,
    # and the remove would leave 1 of 2
    with pytest.raises(PreflightError, match="etcd3 is down too"):
        choose_member_to_replace(_cluster(3), _facts(3, {3}), "etcd1", True)
    assert choose_member_to_replace(_cluster(3), _facts(3, set()), "etcd1", True) == "etcd1"


def test_which_member():
    c = _cluster(3)
    with pytest.raises(PreflightError, match=r"several members are unhealthy \(etcd1, etcd2\)"):
        choose_member_to_replace(_cluster(5), _facts(5, {1, 2}), None, False)
    with pytest.raises(PreflightError, match="every member is healthy"):
        choose_member_to_replace(c, _facts(3, set()), None, False)
    with pytest.raises(PreflightError, match="etcd1 is healthy.*force=true"):
        choose_member_to_replace(c, _facts(3, set()), "etcd1", False)
    assert choose_member_to_replace(c, _facts(3, set()), "etcd1", True) == "etcd1"
    with pytest.raises(Exception, match="no master named 'etcd9'.*etcd1, etcd2, etcd3"):
        choose_member_to_replace(c, _facts(3, set()), "etcd9", False)


# -- on the lab ------------------------------------------------------------------------

class Writer(threading.Thread):
    """Keeps writing through the healthy members; remembers every acknowledged write."""

    def __init__(self, lab, endpoints: list[str]):
        super().__init__(daemon=True)
        self.lab, self.endpoints, self.acked, self.failed = lab, endpoints, [], 0
        self.stop = threading.Event()

    def run(self):
        i = 0
        env = self.lab.etcdctl_env(self.endpoints)
        while not self.stop.is_set():
            key = f"/writer/{i:06d}"
            p = subprocess.run([str(etcd_bin_dir() / "etcdctl"), "put", key, "x", "--command-timeout=3s"], env=env,
                               capture_output=True)
            if p.returncode == 0:
                self.acked.append(key)
            else:
                self.failed += 1
            i += 1


def test_replace_finds_the_member_while_writes_go_on(lab3):
    put_keys(lab3, "/registry/secrets/s", 200)
    lab3.break_member("etcd2", "corrupt")
    writer = Writer(lab3, [f"https://{m.address}:2379" for m in lab3.masters() if m.member != "etcd2"])
    writer.start()
    time.sleep(1)
    state = replace_etcd_member(inventory=str(lab3.dir / "inventory.yaml"), auto_approve=True, return_state=True)
    time.sleep(1)
    writer.stop.set()
    writer.join(10)
    assert state.is_completed(), error_of(state)
    assert len(writer.acked) > 10
    lab3.wait_healthy()
    _wait_for(lambda: set(writer.acked) <= set(keys_on(lab3, "etcd2", "/writer/")), 20, "etcd2 to serve every write")
    assert len(keys_on(lab3, "etcd2", "/registry/")) == 200
    q = quarantines(lab3, "etcd2")
    assert len(q) == 1 and (q[0] / "member/snap/db").stat().st_size == 4096
    steps = state.result()["steps"]
    assert steps["remove-member@etcd2"]["result"].startswith("removed ") and steps["add-member@etcd2"]["result"] == "added"


def test_five_with_two_down_then_three_with_two_down(lab_factory):
    lab5 = lab_factory(5)
    inv5 = str(lab5.dir / "inventory.yaml")
    put_keys(lab5, "/registry/a/", 50)
    lab5.break_member("etcd2", "wipe")
    lab5.break_member("etcd4", "stop")
    # Quorum holds (3 of 5), but etcd refuses `member add` while etcd4 is unreachable: the flow
    # says so before removing anything, and names the way out.
    before = fingerprint(lab5)
    state = replace_etcd_member(inventory=inv5, member="etcd2", auto_approve=True, return_state=True)
    assert "etcd4 is down too" in error_of(state) and "restart-etcd-member" in error_of(state)
    assert fingerprint(lab5) == before
    state = restart_etcd_member(inventory=inv5, member="etcd4", auto_approve=True, return_state=True)
    assert state.is_completed(), error_of(state)
    state = replace_etcd_member(inventory=inv5, auto_approve=True, return_state=True)  # finds etcd2 itself
    assert state.is_completed(), error_of(state)
    assert len(keys_on(lab5, "etcd2", "/registry/")) == 50
    lab3 = lab_factory(3)
    lab3.break_member("etcd1", "corrupt")
    lab3.break_member("etcd2", "stop")
    before = fingerprint(lab3)
    state = replace_etcd_member(inventory=str(lab3.dir / "inventory.yaml"), member="etcd1", auto_approve=True,
                                return_state=True)
    assert "no quorum" in error_of(state) and "restore-etcd-cluster" in error_of(state)
    assert fingerprint(lab3) == before


def test_restart_brings_a_stopped_member_back_and_explains_a_corrupt_one(lab3):
    inv = str(lab3.dir / "inventory.yaml")
    lab3.break_member("etcd1", "stop")
    state = restart_etcd_member(inventory=inv, member="etcd1", auto_approve=True, return_state=True)
    assert state.is_completed(), error_of(state)
    assert all(r["healthy"] for r in lab3.status())
    lab3.break_member("etcd3", "corrupt")
    before = fingerprint(lab3)
    state = restart_etcd_member(inventory=inv, member="etcd3", auto_approve=True, return_state=True,
                                catch_up_timeout_seconds=10)
    msg = error_of(state)
    assert "etcd3 did not start" in msg and "replace-etcd-member --param member=etcd3" in msg
    assert "file size too small" in msg  # the evidence: its own log lines
    assert fingerprint(lab3)["etcd3"][1] == before["etcd3"][1]  # its data dir untouched


def test_resume_replace_after_the_add(lab3, tmp_path):
    put_keys(lab3, "/registry/a/", 50)
    lab3.break_member("etcd3", "corrupt")  # etcd3: its data dir is a mount point
    hold = lab3.hold("etcd3", "systemctl-start")
    code = ("from flows.member import replace_etcd_member as f; "
            f"f(inventory={str(lab3.dir / 'inventory.yaml')!r}, recovery_id='resume-me', auto_approve=True)")
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True, stdout=log, stderr=log)
    _wait_for(lambda: Path(f"{hold}.reached").exists() or proc.poll() is not None, 180, "the hold")
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    _kill_and_release(proc, [hold])
    ids_before = lab3.etcdctl("member", "list").stdout
    assert ", unstarted, " in ids_before  # the add landed; the start did not
    state = replace_etcd_member(inventory=str(lab3.dir / "inventory.yaml"), recovery_id="resume-me",
                                auto_approve=True, return_state=True)
    assert state.is_completed(), error_of(state)
    # Checkpointed from the first run: neither the remove nor the add ran again.
    assert {"remove-member@etcd3", "add-member@etcd3", "quarantine-data@etcd3"} <= set(state.result()["resumed_steps"])
    members = lab3.etcdctl("member", "list").stdout.splitlines()
    assert len(members) == 3 and all(", started, " in x for x in members)
    assert len(keys_on(lab3, "etcd3", "/registry/")) == 50
    assert len(quarantines(lab3, "etcd3")) == 1


def test_refusals_change_nothing(lab3):
    inv = str(lab3.dir / "inventory.yaml")
    lab3.break_member("etcd2", "corrupt")
    before = fingerprint(lab3)
    state = replace_etcd_member(inventory=inv, member="etcd9", auto_approve=True, return_state=True)
    assert "no master named 'etcd9'" in error_of(state)
    state = replace_etcd_member(inventory=inv, member="etcd1", auto_approve=True, return_state=True)
    assert "etcd1 is healthy" in error_of(state) and "force=true" in error_of(state)
    assert fingerprint(lab3) == before
    lab3.stop_sshd("etcd2")
    state = replace_etcd_member(inventory=inv, member="etcd2", auto_approve=True, return_state=True)
    assert "etcd2 is unreachable over SSH" in error_of(state)
