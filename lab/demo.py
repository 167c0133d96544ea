"""`make demo`: the main job on a 3-master lab. Keys written, a snapshot taken, more keys
written, two members broken, restore-etcd-cluster run with auto-approval through the
`nova-dr` command, the keys checked on every member."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lab.lab import Lab, etcd_bin_dir

LAB_DIR = Path(os.environ.get("NOVA_DR_LAB_DIR", ".lab"))


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def keys(lab: Lab, member: str, prefix: str) -> list[str]:
    m = lab.master(member)
    out = lab.etcdctl("get", prefix, "--prefix", "--keys-only", "--consistency=s",
                      endpoints=[f"https://{m.address}:2379"]).stdout
    return [k for k in out.splitlines() if k]


def put_many(lab: Lab, prefix: str, n: int) -> None:
    for start in range(0, n, 100):
        body = "\n".join(f"put {prefix}{i:05d} value-{i}" for i in range(start, min(n, start + 100)))
        subprocess.run([str(etcd_bin_dir() / "etcdctl"), "txn"], input=f"\n{body}\n\n\n", text=True, check=True,
                       env=lab.etcdctl_env(), capture_output=True)


def main() -> int:
    lab = Lab(LAB_DIR)
    say(f"Lab: 3 masters (sshd + etcd 3.5 with TLS) in {lab.dir}")
    if lab.running() and not all(r["healthy"] for r in lab.status()):
        print(lab.down())
    print(lab.up(masters=3))
    for r in lab.status():
        print(f"  {r['member']} {r['address']} healthy={r['healthy']} data-dir-mount-point={r['data_dir_mount_point']}")

    say("Writing 500 keys under /registry/, then taking a snapshot from etcd1")
    put_many(lab, "/registry/demo/k", 500)
    snap = lab.dir / "demo-snapshot.db"
    snap.unlink(missing_ok=True)
    m1 = lab.master("etcd1")
    lab.etcdctl("snapshot", "save", str(snap), endpoints=[f"https://{m1.address}:2379"])
    expected = keys(lab, "etcd1", "/")
    print(f"  {snap} ({snap.stat().st_size} bytes), {len(expected)} keys")

    say("Writing 50 more keys under /later/ (the restore must take them away)")
    put_many(lab, "/later/k", 50)

    say("Breaking two of three members: etcd1 corrupt, etcd3 wiped (its data dir is a mount point)")
    print("  " + lab.break_member("etcd1", "corrupt"))
    print("  " + lab.break_member("etcd3", "wipe"))

    say("nova-dr run restore-etcd-cluster --auto-approve (Prefect's embedded server, nothing to configure)")
    cli = Path(sys.executable).parent / "nova-dr"
    rc = subprocess.run([str(cli), "run", "restore-etcd-cluster", "--inventory", str(lab.dir / "inventory.yaml"),
                         "--param", f"snapshot={snap}", "--auto-approve"]).returncode
    if rc != 0:
        print("restore-etcd-cluster failed; see above", file=sys.stderr)
        return rc

    say("Checking the keys on every member")
    ok = True
    for m in lab.masters():
        got = keys(lab, m.member, "/")
        later = [k for k in got if k.startswith("/later/")]
        good = got == expected and not later
        ok &= good
        print(f"  {m.member}: {len(got)} keys, {len(later)} from after the snapshot -> {'OK' if good else 'WRONG'}")
    say("Done. The old data dirs are in quarantine under /var/lib/etcd/nova-dr-quarantine-* on each master;"
        f" `. {lab.dir}/etcdctl.env && etcdctl endpoint status -w table` to look; `.venv/bin/nova-dr lab down` to stop")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
