"""Atomic file writes: a reader sees the old file or the new one, never part of one."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file in the same folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json_object(path: Path) -> dict:
    """``path``'s JSON object; ValueError naming the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is corrupt: a JSON object was expected, got {type(value).__name__}")
    return value


def output_file_problem(path: str) -> str | None:
    """Why :func:`write_atomic` could not write ``path`` (checked before a long job that ends with
    it), or None: a folder there, or a file where one of its folders would be."""
    if os.path.isdir(path):
        return "is a folder"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # write_atomic makes the missing folders
        folder = os.path.dirname(folder)
    return None if os.path.isdir(folder) else f"cannot be written: {folder} is a file"


_WEIGHTS = re.compile(r"(pytorch_model|model|tf_model|flax_model)(-\d+-of-\d+)?"
                      r"\.(safetensors|bin|h5|msgpack)(\.index\.json)?")


def is_weights_file(name: str) -> bool:
    """A model weights file or shard index of a saved model directory (``model.safetensors``,
    ``model-00001-of-00002.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin``,
    ``tf_model.h5``): a new save replaces all of them."""
    return _WEIGHTS.fullmatch(name) is not None


def holds_working_directory(target: Path) -> bool:
    return Path.cwd().resolve().is_relative_to(target.resolve())


def _umask() -> int:
    """The process's umask, read from a probe directory's mode (os.umask would set it, racing threads)."""
    probe = Path(tempfile.mkdtemp())
    try:
        (probe / "d").mkdir(mode=0o777)
        return 0o777 & ~stat.S_IMODE((probe / "d").stat().st_mode)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def save_into_directory(target, write, keep) -> None:
    """``write(folder)`` into a new hidden folder on ``target``'s filesystem, which then replaces
    ``target`` (:func:`replace_directory`, keeping the old entries ``keep(name)`` accepts). The
    folder is a sibling, or inside ``target`` when that holds the working directory; a symlinked
    ``target`` is resolved, so the link keeps pointing at the saved directory."""
    target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    inside = target.is_dir() and holds_working_directory(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target if inside else target.parent))
    try:
        # mkdtemp makes 0700: the saved directory gets the mode of the one it replaces, else the
        # umask's, as os.mkdir (and transformers' save_pretrained) give
        os.chmod(staging, stat.S_IMODE(target.stat().st_mode) if target.is_dir() else 0o777 & ~_umask())
        write(staging)
        replace_directory(staging, target, keep)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` made of hard links (a real copy where linking fails)."""
    def link_or_copy(a, b):
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def replace_directory(staging, target, keep=lambda name: True) -> None:
    """Move the finished directory ``staging`` to ``target``. What ``target`` held beside the new
    entries is kept where ``keep(name)`` says so (hard-linked into the new directory first, so
    nothing is copied or ever missing) and removed otherwise. ``target`` is renamed aside, so at
    every moment it is the old directory or the new one; a ``target`` holding the working
    directory is updated in place instead, an entry at a time."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.rename(staging, target)
        return
    new = set(os.listdir(staging))
    old = [name for name in os.listdir(target) if name not in new and target / name != staging]
    if holds_working_directory(target):
        for name in sorted(new, key=lambda n: (n == "config.json", n)):  # config.json last, as when written
            if (target / name).is_dir() and not (target / name).is_symlink():
                shutil.rmtree(target / name)
            os.replace(staging / name, target / name)
        for name in old:
            if not keep(name):
                _remove(target / name)
        return
    for name in old:
        if keep(name):
            _link_tree(target / name, staging / name)
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(target, aside)
    os.rename(staging, target)
    shutil.rmtree(aside, ignore_errors=True)
