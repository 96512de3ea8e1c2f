"""TrainConfig: every training setting, from a TOML/YAML file and ``--key value`` flags."""
from __future__ import annotations

import dataclasses
import difflib
import json
import numbers
import os
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gptkern.models.config import GPTConfig, build_dataclass
from gptkern.ops._checks import is_int

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def check_adamw_lr(lr: float, beta1: float, weight_decay: float, name: str = "lr") -> None:
    """A learning rate whose AdamW step factors fit float32, the parameters' type: the first step's
    ``lr / (1 - beta1)`` (its bias correction) and the decay factor ``1 - lr * weight_decay``; torch
    raises "value cannot be converted to type float without overflow" (CPU) or writes inf (CUDA) beyond."""
    if lr / (1 - beta1) > FLOAT32_MAX or lr * weight_decay > FLOAT32_MAX:
        raise ValueError(f"{name} ({_flag(name)}) is too large for AdamW in float32: {name} / (1 - beta1) and "
                         f"{name} * weight_decay must be at most {FLOAT32_MAX:.4g}, got {lr!r} with beta1 {beta1!r} "
                         f"and weight_decay {weight_decay!r}")


@dataclass
class TrainConfig:
    """Training settings. ``model`` holds GPTConfig overrides of the ``preset``."""
    preset: str = "gpt2-tiny"
    model: dict = field(default_factory=dict)
    data: str = "data/corpus"
    out_dir: str = "runs/gpt"
    batch_size: int = 16  # sequences per micro-batch and rank
    block_size: Optional[int] = None  # the training window; default the model's, which grows to fit a longer one
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_steps: int = 10
    log_interval: int = 10
    checkpoint_interval: int = 200
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    doc_mask: bool = False  # attention stays inside each document (EOS-separated), via varlen attention
    fsdp: bool = False
    peak_tflops: Optional[float] = None
    max_seconds: Optional[float] = None  # stop (and checkpoint) after this much training time
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):  # bools and strings as such ("false" is a true value)
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"{f.name} ({_flag(f.name)}) must be true or false, got {value!r}")
            if f.type in ("str", str) and isinstance(value, os.PathLike):
                setattr(self, f.name, os.fspath(value))  # a folder as a pathlib.Path, kept as a str (JSON)
            elif f.type in ("str", str) and not isinstance(value, str):
                raise ValueError(f"{f.name} ({_flag(f.name)}) must be a string, got {value!r}")
        counts = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps", "log_interval",
                  "checkpoint_interval", "keep_last")
        for name in (*counts, "warmup_steps", "seed"):
            value = getattr(self, name)
            if not is_int(value):  # 3.5 steps would never reach max_steps
                raise ValueError(f"{name} ({_flag(name)}) must be an integer, got {value!r}")
            setattr(self, name, int(value))  # numpy ints too, stored as plain ints (JSON)
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:  # torch.manual_seed's range (of non-negative seeds)
            raise ValueError(f"seed ({_flag('seed')}) must be in [0, 2**64), got {self.seed}")
        if self.block_size is not None and (not is_int(self.block_size) or self.block_size < 1):
            raise ValueError(f"block_size ({_flag('block_size')}) must be an integer >= 1, got {self.block_size!r}")
        if self.block_size is not None:
            self.block_size = int(self.block_size)
        if self.max_seconds is not None:
            if isinstance(self.max_seconds, bool) or not isinstance(self.max_seconds, numbers.Real) or not (
                    0 < self.max_seconds < float("inf")):
                raise ValueError(f"max_seconds ({_flag('max_seconds')}) must be a positive number, got "
                                 f"{self.max_seconds!r}")
            self.max_seconds = float(self.max_seconds)  # numpy numbers too, stored as a float (JSON)
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            value = getattr(self, name)
            # AdamW computes in float32: a larger value overflows there
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= FLOAT32_MAX:
                raise ValueError(f"{name} ({_flag(name)}) must be a finite number at most {FLOAT32_MAX:.4g} "
                                 f"(float32), got {value!r}")
        for name in ("weight_decay", "grad_clip"):  # AdamW checks only its default weight decay
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({_flag(name)}) must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} ({_flag(name)}) must be in [0, 1), got {getattr(self, name)!r}")
        if self.peak_tflops is not None and (isinstance(self.peak_tflops, bool)
                                             or not isinstance(self.peak_tflops, numbers.Real)
                                             or not 0 < self.peak_tflops < float("inf")):
            raise ValueError(f"peak_tflops ({_flag('peak_tflops')}) must be a positive number, got "
                             f"{self.peak_tflops!r}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"need warmup_steps >= 0, lr > 0 and min_lr >= 0, got {self.warmup_steps}, {self.lr}, "
                             f"{self.min_lr}")
        for name in ("lr", "min_lr"):  # the schedule's rates run between the two
            check_adamw_lr(getattr(self, name), self.beta1, self.weight_decay, name)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({_flag('min_lr')}) must be at most lr ({_flag('lr')}): the cosine decays "
                             f"from lr to min_lr, got lr {self.lr} and min_lr {self.min_lr}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        self.model_config()  # checks the preset and overrides

    def model_config(self, vocab_size: Optional[int] = None) -> GPTConfig:
        overrides = dict(self.model)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        if self.activation_checkpointing:
            overrides["activation_checkpointing"] = True
        config = GPTConfig.from_name(self.preset, **overrides)
        if self.block_size and self.block_size > config.block_size and "block_size" not in self.model:
            # --block-size longer than the preset's context: the model's context follows
            config = GPTConfig.from_name(self.preset, **overrides, block_size=self.block_size)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return build_dataclass(cls, values, "training settings")


def read_config_file(path: str) -> dict[str, Any]:
    """A TOML/YAML/JSON file's settings, each checked against its TrainConfig field (GPTConfig's under
    ``model``); strings are converted as flag strings are ("false", "3e-4", "4")."""
    kinds = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
    kind = kinds.get(Path(path).suffix)
    if kind is None:
        raise ValueError(f"config file must be .toml, .yaml, .yml or .json, got {path}")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) skipped
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err})") from None
    if kind == "TOML":
        import tomllib

        errors, load = (tomllib.TOMLDecodeError,), tomllib.loads
    elif kind == "YAML":
        import yaml

        errors, load = (yaml.YAMLError,), yaml.safe_load
    else:
        errors, load = (json.JSONDecodeError,), json.loads
    try:
        values = load(text)
    except errors as err:
        raise ValueError(f"config file {path} is not valid {kind}: {err}") from None
    return check_file_values({} if values is None else values, path)


def check_file_values(values: Any, path: str) -> dict[str, Any]:
    """``values`` read from config file ``path``, typed as TrainConfig's fields; a clear error otherwise."""
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of settings (key: value), got a "
                         f"{type(values).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    model_hints = typing.get_type_hints(GPTConfig)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key == "model":
            value = {} if value is None else value  # an empty YAML `model:`
            if not isinstance(value, dict):
                raise ValueError(f"config file {path}: model must be a table of GPTConfig overrides ([model] in "
                                 f"TOML), got {value!r}")
            unknown = [k for k in value if k not in model_hints]
            if unknown:
                raise ValueError(f"config file {path}: unknown model field {unknown[0]!r}; known: "
                                 f"{', '.join(model_hints)}")
            checked["model"] = {k: _file_value(f"model.{k}", model_hints[k], v, path) for k, v in value.items()}
        elif key in hints:
            checked[key] = _file_value(key, hints[key], value, path)
        else:
            close = difflib.get_close_matches(str(key), [name for name in hints], n=1)
            hint = (" (a model field: put it under model, [model] in TOML)" if key in model_hints
                    else f" (did you mean {close[0]}?)" if close else "")
            raise ValueError(f"config file {path}: unknown setting {key!r}{hint}; `gptkern train -h` lists them")
    return checked


def _file_value(name: str, kind, value: Any, path: str) -> Any:
    """A config file's ``value`` as the field's type: the same type, an int for a float, an integral
    float for an int, or a string converted as a flag's text."""
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else kind
    expected = f"{base.__name__}{' or none' if optional else ''}"
    if value is None and optional:
        return value
    if isinstance(value, str) and base is not str:
        try:
            return _convert(name, kind, value)
        except ValueError:
            pass
    elif base is bool and isinstance(value, bool) or base is str and isinstance(value, str):
        return value
    elif base in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if base is float:
            return float(value)
        if isinstance(value, int) or value.is_integer():
            return int(value)
    raise ValueError(f"config file {path}: {name} expects {expected}, got {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(name: str, kind, text: str) -> Any:
    """A flag's text as the field's type (Optional unwrapped)."""
    args = typing.get_args(kind)
    if type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{_flag(name)} expects true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{_flag(name)} expects {kind.__name__}, got {text!r}") from None
    return json.loads(text)


# One line per TrainConfig field for ``gptkern train -h``.
FLAG_HELP = {
    "preset": "model preset to start from (gpt2-tiny, gpt2-small, ..., llama-tiny, llama-small)",
    "model": "GPTConfig overrides (a [model] table in a config file; as flags: --n-layer 6 ...)",
    "data": "folder of token shards written by `gptkern prepare`",
    "out_dir": "run folder: config, metrics, loss curve, checkpoints/",
    "batch_size": "sequences per micro-batch and rank",
    "block_size": "training window in tokens (default: the model's; a longer one grows the model's context)",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine decay (at most --lr)",
    "warmup_steps": "steps of linear warmup",
    "weight_decay": "AdamW weight decay (not on norms and biases)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "eval_interval": "validation loss and perplexity every N steps",
    "eval_steps": "validation batches per evaluation",
    "log_interval": "metrics line every N steps",
    "checkpoint_interval": "checkpoint every N steps (and at the end)",
    "keep_last": "checkpoints kept",
    "seed": "seed of the model init, the data windows and dropout",
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16",
    "compile": "torch.compile the model",
    "activation_checkpointing": "recompute each block's activations in the backward",
    "doc_mask": "attention stays inside each EOS-separated document (varlen attention)",
    "fsdp": "FSDP2 (fully_shard) instead of DDP under torchrun",
    "peak_tflops": "peak TFLOP/s per device for MFU (default: known GPUs' dense bf16 peak)",
    "max_seconds": "stop (and checkpoint) after this much training time (under torchrun checked at log steps, "
                   "where the ranks agree to stop together)",
    "resume": "continue from the last checkpoint in out_dir",
    "progress": "show the progress bar",
}


def flags_help() -> str:
    """Every training flag with its type, default and meaning, then the model overrides."""
    hints = typing.get_type_hints(TrainConfig)
    rows = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        kind = typing.get_args(hints[f.name])[0] if type(None) in typing.get_args(hints[f.name]) else hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = FLAG_HELP[f.name] + ("" if default is None else f" (default {default})")
        rows.append((f"{_flag(f.name)} {kind.__name__.upper()}", text))
    width = max(len(flag) for flag, _ in rows)
    lines = ["training flags:"] + [f"  {flag:<{width}}  {text}" for flag, text in rows]
    model = ", ".join(_flag(f.name) for f in dataclasses.fields(GPTConfig) if f.name not in hints)
    lines += ["model overrides (GPTConfig fields, on top of --preset):",
              textwrap.fill(model, width=100, initial_indent="  ", subsequent_indent="  ")]
    return "\n".join(lines)


def apply_flags(values: dict[str, Any], flags: Sequence[str]) -> dict[str, Any]:
    """``--key value`` pairs (or ``--key=value``) onto ``values``: TrainConfig fields, else GPTConfig
    fields as model overrides. A bare ``--flag`` means true for booleans."""
    hints = typing.get_type_hints(TrainConfig)
    model_hints = typing.get_type_hints(GPTConfig)
    values = {**values, "model": dict(values.get("model", {}))}
    i = 0
    while i < len(flags):
        flag = flags[i]
        if not flag.startswith("--"):
            raise ValueError(f"expected --key value, got {flag!r}")
        typed, equals, text = flag.partition("=")
        key = typed[2:].replace("-", "_")
        if equals and not text:  # never the next flag as its value
            raise ValueError(f"{typed} needs a value after =")
        if not equals:
            is_bool = hints.get(key) is bool or model_hints.get(key) is bool
            if is_bool and (i + 1 == len(flags) or flags[i + 1].startswith("--")):
                text = "true"
            elif i + 1 < len(flags):
                i += 1
                text = flags[i]
            else:
                raise ValueError(f"{typed} needs a value")
        if key in hints and key != "model":
            values[key] = _convert(key, hints[key], text)
        elif key in model_hints:
            values["model"][key] = _convert(key, model_hints[key], text)
        else:
            known = [_flag(name) for name in (*hints, *model_hints) if name != "model"]
            close = difflib.get_close_matches(_flag(key), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown flag {typed}{hint}; `gptkern train -h` lists every flag")
        i += 1
    return values


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], saved_model: Optional[dict] = None,
                    current_model: Optional[dict] = None, saved_data_realpath: Optional[str] = None) -> list[str]:
    """Fields that must agree to resume: the model (every GPTConfig field, as resolved: the data's
    vocab_size is in ``saved_model`` and ``current_model`` when given), the data folder (its real path:
    ``saved_data_realpath`` as resolved when the checkpoint was written, else the saved path resolved
    from here) and the batch geometry (the window the model's default gives when block_size is unset)."""
    if saved_model is None or current_model is None:
        saved_model = TrainConfig.from_dict(saved).model_config().to_dict()
        current_model = TrainConfig.from_dict(current).model_config().to_dict()
    wrong = []

    def compare(name, old, new, shown=None):
        if old != new:
            old, new = shown or (old, new)
            wrong.append(f"{name}: checkpoint {old!r} != now {new!r}")

    model_wrong = [k for k in {**saved_model, **current_model}
                   if k != "activation_checkpointing" and saved_model.get(k) != current_model.get(k)]
    if model_wrong:
        compare("preset", saved.get("preset"), current.get("preset"))
    for k in model_wrong:
        compare(f"model.{k}", saved_model.get(k), current_model.get(k))
    # the same folder: as resolved when the checkpoint was written, or the saved path resolved from
    # here (a project moved, or a relative path resumed from another directory)
    here = os.path.realpath(current["data"])
    if here not in (saved_data_realpath, os.path.realpath(saved["data"])):
        wrong.append(f"data: checkpoint {saved_data_realpath or saved['data']!r} != now {current['data']!r}")
    for k in ("batch_size", "grad_accum", "seed"):
        compare(k, saved.get(k), current.get(k))
    compare("block_size", saved.get("block_size") or saved_model.get("block_size"),
            current.get("block_size") or current_model.get("block_size"))
    return wrong
