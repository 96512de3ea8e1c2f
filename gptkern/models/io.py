"""A GPT saved as a directory: ``config.json``, ``model.safetensors`` and the tokenizer's files.

Every file is written to a temporary name, synced and renamed into place, so a reader sees the
old file or the new one, never half of one. Loading reads tensors only (safetensors).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from gptkern._backend import check_device
from gptkern._files import is_weights_file, read_json_object, save_into_directory, write_atomic
from gptkern.models.config import GPTConfig
from gptkern.models.gpt import GPT

MODEL_TYPE = "gptkern-gpt"


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    from safetensors.torch import save_file

    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict with a tied output layer stored once (under ``transformer.wte``)."""
    state = model.state_dict()
    if model.config.tie_weights:
        state.pop("lm_head.weight", None)
    return state


def save_pretrained(model: GPT, directory: Union[str, os.PathLike], tokenizer=None) -> None:
    """Write the model (and tokenizer) to ``directory``, built in a temporary sibling directory that
    then replaces it: a reader sees the old directory or the new one. Other files already in
    ``directory`` stay, except older weights and tokenizer files."""
    from gptkern.data.tokenizer import TOKENIZER_FILES

    save_into_directory(directory, lambda staging: write_model_files(model, staging, tokenizer),
                        keep=lambda name: not is_weights_file(name) and name not in TOKENIZER_FILES)


def write_model_files(model: GPT, directory: Path, tokenizer=None) -> None:
    """The files of a model directory, each written atomically, config.json last."""
    save_safetensors_atomic(model_state(model), directory / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save(directory)
    config = {"model_type": MODEL_TYPE, "config": model.config.to_dict()}
    write_atomic(str(directory / "config.json"), json.dumps(config, indent=1) + "\n")


def load_pretrained(directory: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                    dtype: Optional[torch.dtype] = None):
    """(GPT, tokenizer or None) from a directory written by :func:`save_pretrained`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gptkern.data.tokenizer import META_FILE, load_tokenizer

    directory = Path(directory)
    config_file = directory / "config.json"
    if directory.is_file():  # (e.g. the model.safetensors inside one)
        raise FileNotFoundError(f"{directory} is a file, not a model directory: give the folder that holds "
                                f"config.json (here perhaps {directory.parent})")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found: no such model directory")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a gptkern model directory")
    meta = read_json_object(config_file)
    if "preset" in meta and "model" in meta and (directory / "checkpoints").is_dir():
        raise ValueError(f"{directory} is a training run, not a model: pass one of its checkpoints, "
                         f"{directory / 'checkpoints'}/step_N")
    if meta.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{config_file}: model_type {meta.get('model_type')!r} is not {MODEL_TYPE!r} "
                         f"(a Hugging Face GPT-2 directory loads with GPT.from_hf, or gptkern generate --hf-dir)")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{config_file} is corrupt: its 'config' entry is missing or not an object")
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_file}: {err}") from None
    device = check_device(device or "cpu")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the model directory has no weights")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is corrupt: not a readable safetensors file ({err})") from None
    with torch.device("meta"):
        model = GPT(config)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    expected = set(shapes) - ({"lm_head.weight"} if config.tie_weights else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing keys {missing}, unexpected keys "
                         f"{unexpected}")
    wrong = [f"{key} {list(value.shape)} (config: {list(shapes[key])})"
             for key, value in state.items() if value.shape != shapes[key]]
    if wrong:
        raise ValueError(f"{weights} does not match its config {config_file}: shapes {', '.join(wrong)}")
    model.load_state_dict(state, assign=True)
    if dtype is not None:
        model.to(dtype)
    tokenizer = load_tokenizer(directory) if (directory / META_FILE).is_file() else None
    return model.eval(), tokenizer
