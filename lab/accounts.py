"""The lab masters' operator account: `nova`, with root through sudo, as on real masters
(root cannot log in over SSH there).

Each master's /etc is an overlay, so the account exists only inside that master's mount
namespace: its passwd, group, shadow and sudoers.d lines are written to the overlay's upper
dir, never to the machine's /etc.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

USER, UID = "nova", 4242
HOME = "/var/lib/nova"  # /var/lib is an overlay too; a home must exist (sshd says so on stderr otherwise)


def make_password(path: Path) -> str:
    """A random sudo password, kept in a 0600 file for the inventory's ssh.sudo_password_file."""
    pw = "nova-lab-sudo-" + secrets.token_hex(12)
    path.write_text(pw + "\n")
    path.chmod(0o600)
    return pw


def _crypt(password: str) -> str:
    # On stdin, not the command line: `ps` would show it.
    return subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True, text=True,
                          check=True).stdout.strip()


def write_account(etc_up: Path, varlib_up: Path, bin_dir: str, public_key: str, password: str | None) -> None:
    """`nova` on one master: its key in ~/.ssh/authorized_keys (sshd reads it as nova, so it
    must not sit in a folder nova cannot enter), and NOPASSWD sudo, or sudo that asks."""
    def with_line(name: str, line: str) -> None:
        base = Path("/etc", name).read_text()
        kept = [x for x in base.splitlines() if not x.startswith(f"{USER}:")]
        (etc_up / name).write_text("\n".join(kept + [line]) + "\n")

    with_line("passwd", f"{USER}:x:{UID}:{UID}:nova-dr operator:{HOME}:/bin/sh")
    with_line("group", f"{USER}:x:{UID}:")
    # "*": no password to log in with (keys only), and not a locked account, which sshd refuses.
    with_line("shadow", f"{USER}:{_crypt(password) if password else '*'}:20000:0:99999:7:::")
    (etc_up / "shadow").chmod(0o640)
    sudoers = etc_up / "sudoers.d"
    sudoers.mkdir(exist_ok=True)
    rule = f"{USER} ALL=(ALL) ALL" if password else f"{USER} ALL=(ALL) NOPASSWD: ALL"
    # secure_path: the lab's own systemctl and journalctl come first, as systemd's would be found.
    # passwd_tries=1: a wrong password fails at once, instead of reading more of stdin as tries.
    (sudoers / "nova-lab").write_text(
        f'Defaults:{USER} secure_path="{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"\n'
        f"Defaults:{USER} passwd_tries=1, !lecture\n{rule}\n")
    (sudoers / "nova-lab").chmod(0o440)
    home = varlib_up / HOME.removeprefix("/var/lib/")
    keys = home / ".ssh" / "authorized_keys"
    keys.parent.mkdir(parents=True, exist_ok=True)
    keys.write_text(public_key)
    for p, mode in ((home, 0o700), (keys.parent, 0o700), (keys, 0o600)):
        os.chown(p, UID, UID)
        p.chmod(mode)
