"""Training checkpoints: one directory per step, built under a temporary name and renamed into
place, so a crash or a full disk mid-save leaves every earlier checkpoint loadable.

``OUT/checkpoints/step_00000100/`` holds ``config.json`` + ``model.safetensors`` + the tokenizer
(a gptkern model directory: ``gptkern generate --checkpoint`` reads it), ``optimizer.pt`` (tensors
and plain values only, loaded with ``weights_only=True``), ``rng.pt`` and ``state.json`` (step,
data-loader position, training config).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gptkern._files import write_atomic
from gptkern.models.io import write_model_files

PREFIX = "step_"
# The names this module writes; every other folder under checkpoints/ is the user's and left alone.
CHECKPOINT_NAME = re.compile(PREFIX + r"(\d{8,})")
STAGING_NAME = re.compile(r"\.(tmp|old)-(" + PREFIX + r"\d{8,})-\d+")
AN_EARLIER_ONE = "move {} out of the checkpoints folder to resume from an earlier checkpoint"


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a quota, an I/O error); the earlier ones are
    intact. The CLI reports it in one line."""


def _write_failure(err: Exception) -> Optional[tuple[Optional[int], str]]:
    """(errno, what the OS said) when ``err`` comes from a failed write, else None: an OSError, an error
    raised while handling one (torch.save's "[enforce fail at inline_container.cc] unexpected pos") or
    safetensors' "I/O error"."""
    cause, seen = err, set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause.errno, cause.strerror or str(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    if type(err).__name__ == "SafetensorError" and "I/O error: " in text:
        return None, text.split("I/O error: ", 1)[1]
    return None


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and plain values. CUDA: the current
    device's generator (the trainer makes its rank's device current). Every rank seeds the same and
    draws alike, so rank 0's state is every rank's, each for its own device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state(), "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])  # on the current device: this rank's
    elif state["cuda"]:  # older checkpoints: every device of the saving process, as many as exist here
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def _torch_save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir: str, step: int, model, optimizer, tokenizer, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` and delete all but the newest ``keep_last``. Returns its path."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    staging = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write_model_files(model, staging, tokenizer)
        _torch_save_atomic(optimizer.state_dict(), staging / "optimizer.pt")
        _torch_save_atomic(rng_state(), staging / "rng.pt")
        write_atomic(str(staging / "state.json"), json.dumps({**state, "step": step}, indent=1) + "\n")
        if final.exists():  # the same step saved again: swap
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            try:
                os.rename(staging, final)
            except BaseException:
                os.rename(old, final)  # the one saved before, back in place
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
        _fsync_dir(root)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        failure = _write_failure(err) if isinstance(err, Exception) else None
        if failure is None:
            raise
        failed = CheckpointWriteError(f"could not write checkpoint {final}: {failure[1]} (earlier checkpoints "
                                      f"are intact)")
        failed.errno = failure[0]
        raise failed from err
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    _clean_leftovers(root)
    return final


def _clean_leftovers(root: Path) -> None:
    """Staging directories of a process killed mid-save are dropped; a checkpoint moved aside
    for a same-step swap that never finished is put back."""
    for leftover in root.iterdir():
        match = STAGING_NAME.fullmatch(leftover.name)
        if match is None or not leftover.is_dir() or leftover.name.endswith(f"-{os.getpid()}"):
            continue
        kind, name = match.groups()
        if kind == "tmp" or (root / name).exists():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            os.rename(leftover, root / name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(out_dir: str) -> list[Path]:
    """Complete checkpoints (``step_N`` folders renamed into place, with state.json), oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def damaged_checkpoint(out_dir: str) -> Optional[Path]:
    """The newest ``step_N`` folder without state.json, if it is newer than every complete one.
    Saves rename whole folders into place, so only damage from outside leaves one (an older one
    is what a process killed while rotating leaves, and is ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    numbered = sorted((int(m.group(1)), p) for p in root.iterdir()
                      if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir())
    if numbered and not (numbered[-1][1] / "state.json").is_file():
        return numbered[-1][1]
    return None


def latest_checkpoint(out_dir: str) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_training_state(path: Path, load_optimizer) -> dict[str, Any]:
    """The optimizer state (handed to ``load_optimizer``, which knows how the optimizer is
    sharded) and the RNG states into place; returns state.json's content (the model is loaded by
    the caller, from the same directory)."""
    for name, apply in (("optimizer.pt", load_optimizer), ("rng.pt", set_rng_state)):
        content = read_file(path / name, lambda f: torch.load(f, map_location="cpu", weights_only=True))
        try:
            apply(content)
        except (MemoryError, torch.cuda.OutOfMemoryError, getattr(torch.distributed, "DistError", MemoryError)):
            raise  # not the file's fault
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:  # loads, but not this shape
            raise ValueError(f"checkpoint file {path / name} does not hold what it should "
                             f"({type(err).__name__}: {err}); {AN_EARLIER_ONE.format(path)}") from err
    return read_state(path)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json."""
    state = read_file(path / "state.json", lambda f: json.loads(Path(f).read_text(encoding="utf-8")))
    if not _valid_state(state):
        raise ValueError(f"checkpoint file {path / 'state.json'} is corrupt (no step, training config with its "
                         f"data folder, or loader position); {AN_EARLIER_ONE.format(path)}")
    return state


def _valid_state(state) -> bool:
    """state.json holds what resuming reads, each of its type: the step, the training config with its data
    folder, the loader position (one, or one per rank); data_realpath, world_size, grad_scaler if there."""
    def typed(value, kind) -> bool:  # a bool is no int here
        return isinstance(value, kind) and not isinstance(value, bool)

    if not isinstance(state, dict):
        return False
    loader = state.get("loader")
    optional = {"data_realpath": str, "world_size": int, "grad_scaler": dict}
    return (all(typed(state[key], kind) for key, kind in optional.items() if key in state)
            and typed(state.get("step"), int) and state["step"] >= 0
            and typed(state.get("config"), dict) and typed(state["config"].get("data"), str)
            and (typed(loader, dict) or typed(loader, list) and all(typed(s, dict) for s in loader)
                 and len(loader) == state.get("world_size", len(loader)) >= 1))  # one per rank


def read_file(file: Path, load):
    """``load(file)``; a missing, truncated or corrupt file raises an error naming it (ValueError: the
    CLI reports it in one line)."""
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} not found; {AN_EARLIER_ONE.format(file.parent)}")
    try:
        return load(str(file))
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:  # safetensors, zipfile, pickle and JSON each raise their own kind
        raise ValueError(f"checkpoint file {file} is corrupt or truncated ({type(err).__name__}: {err}); "
                         f"{AN_EARLIER_ONE.format(file.parent)}") from err
