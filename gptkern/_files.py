"""Atomic file writes: a reader sees the old file or the new one, never part of one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file in the same folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def replace_directory(staging, target) -> None:
    """Move the finished directory ``staging`` to ``target``, replacing what is there: ``target``
    is renamed aside first, so at every moment it is either the old directory or the new one."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.rename(staging, target)
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(target, aside)
    os.rename(staging, target)
    shutil.rmtree(aside, ignore_errors=True)
