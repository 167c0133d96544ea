"""Scratch dirs on the machine running the flows that hold plaintext (a decrypted etcd db, a
verification's unpacked keys and tokens). Each is named with its process id, so that the next
run removes what a killed one left, and never a dir whose process still runs."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def make(prefix: str, parent: str | Path | None = None) -> str:
    """A new 0700 dir `<parent>/<prefix><pid>-XXXX`, after clearing the dead ones of `prefix`."""
    clear_dead(prefix, parent)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    return True


def clear_dead(prefix: str, parent: str | Path | None = None) -> list[str]:
    """Remove `<prefix><pid>-*` dirs whose process is gone; returns their names."""
    parent = Path(parent or tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[A-Za-z0-9_]+$")
    gone = []
    for p in parent.iterdir() if parent.is_dir() else []:
        m = pattern.match(p.name)
        if not m or p.is_symlink() or not p.is_dir() or p.stat().st_uid != os.geteuid():
            continue
        if int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


@contextmanager
def scratch_dir(prefix: str, parent: str | Path | None = None) -> Iterator[str]:
    """`make`, removed on the way out (a kill leaves it to the next run's `clear_dead`)."""
    d = make(prefix, parent)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
