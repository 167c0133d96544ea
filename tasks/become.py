"""Root through sudo (`ssh.become: sudo`): the command line a master runs, and what goes first
on its stdin.

The password never appears on a command line: it is the first line of the command's stdin,
for `sudo -S`. So that a NOPASSWD rule cannot pass that line on to the command (a copy would
then start with the password), a small wrapper first asks sudo, with cached credentials
ignored (`-k`), whether it would need a password at all: if not, it reads the line away
itself and runs `sudo -n`; if so, `sudo -k -S` reads exactly that one line.
"""

from __future__ import annotations

import shlex
from typing import Sequence

_ASKS_PASSWORD = ('if sudo -k -n true 2>/dev/null; then IFS= read -r _; exec sudo -n -- "$@"; fi; '
                  'exec sudo -k -S -p "" -- "$@"')

# What sudo says when it refuses, to tell a sudo problem from the command's own failure.
_REFUSALS = ("a password is required", "incorrect password attempt", "is not in the sudoers file",
             "is not allowed to run sudo", "no tty present", "a terminal is required", "Sorry, try again",
             "may not run sudo")


def command_line(argv: Sequence[str], become: str, password: str | None) -> tuple[str, bytes]:
    """(the command line for the SSH exec request, the bytes to send before the command's own stdin)."""
    cmd = " ".join(shlex.quote(str(a)) for a in argv)
    if become != "sudo":
        return cmd, b""
    if password is None:
        return "sudo -n -- " + cmd, b""
    # `cmd` is already quoted words: after the wrapper, they are its "$@", one by one.
    return " ".join(["sh", "-c", shlex.quote(_ASKS_PASSWORD), "sudo", cmd]), password.encode() + b"\n"


def sudo_refusal(code: int, stderr: str) -> str | None:
    """sudo's own refusal line, when the command never ran because sudo said no."""
    if code == 0:
        return None
    return next((line.strip() for line in stderr.splitlines() if any(r in line for r in _REFUSALS)), None)
