"""Atomic file writes: a reader sees the old file or the new one, never part of one."""
from __future__ import annotations

import os


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
