"""Hugging Face GPT-2 import and export for gptkern's GPT (transformers is optional)."""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from gptkern._files import is_weights_file, read_json_object, save_into_directory
from gptkern.models.config import GPTConfig
from gptkern.models.gpt import GPT

# transformers' GPT-2 uses Conv1D, whose weight is (in, out): these are transposed both ways.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers that older GPT-2 checkpoints carry: not weights, dropped on import
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
_ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict) -> GPTConfig:
    """A GPTConfig from a GPT-2 ``config.json`` dictionary; unsupported options raise ValueError."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"only GPT-2 checkpoints can be imported, got model_type {hf.get('model_type')!r}"
                         + (" (a gptkern model directory: load_pretrained, or gptkern generate --checkpoint)"
                            if hf.get("model_type") == "gptkern-gpt" else ""))
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS_FROM_HF:
        raise ValueError(f"unsupported GPT-2 activation_function {activation!r}; supported: "
                         f"{sorted(_ACTIVATIONS_FROM_HF)}")
    for flag, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("add_cross_attention", False)):
        if hf.get(flag, supported) != supported:
            raise ValueError(f"GPT-2 option {flag}={hf[flag]} is not supported")
    n_embd = hf.get("n_embd", 768)
    rates = {name: hf.get(name, 0.0) for name in ("resid_pdrop", "attn_pdrop", "embd_pdrop")}
    if len(set(rates.values())) > 1:  # GPTConfig has one dropout rate (training only)
        warnings.warn(f"GPT-2 dropout rates {rates} differ; gptkern's GPT applies one rate everywhere: "
                      f"resid_pdrop={rates['resid_pdrop']} (set config.dropout to choose another)", stacklevel=2)
    return GPTConfig(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                     mlp_hidden=hf.get("n_inner") or 4 * n_embd, activation=_ACTIVATIONS_FROM_HF[activation],
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=hf.get("resid_pdrop", 0.0),
                     tie_weights=hf.get("tie_word_embeddings", True))


def _weight_files(directory: Path) -> list[Path]:
    """model.safetensors, else the shards its index names (as transformers looks: a folder saved
    unsharded over a sharded one keeps the old index), else pytorch_model.bin."""
    single, index, bin_file = (directory / name for name in
                               ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if single.is_file():
        return [single]
    missing: list[str] = []
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} is corrupt: no 'weight_map' object")
        shards = [directory / name for name in sorted(set(map(str, weight_map.values())))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if not missing:
            return shards
    if bin_file.is_file():
        return [bin_file]
    if missing:
        raise FileNotFoundError(f"{directory}: shards {missing} named by {index.name} are missing "
                                f"(and there is no model.safetensors or pytorch_model.bin)")
    raise FileNotFoundError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors (single or sharded) or pytorch_model.bin (weights only)."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(directory):
        try:
            part = (torch.load(f, map_location="cpu", weights_only=True) if f.suffix == ".bin"
                    else load_file(str(f)))
        except pickle.UnpicklingError:  # (torch's message suggests weights_only=False: never here)
            raise ValueError(f"{f} is corrupt or not weights only: torch.load(weights_only=True) refuses it") from None
        except (SafetensorError, OSError, RuntimeError, EOFError) as err:
            raise ValueError(f"{f} is corrupt: not a readable weights file ({str(err).splitlines()[0]})") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ValueError(f"{f} is corrupt: not a dictionary of tensors")
        state.update(part)
    return state


def _state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any(key.startswith("transformer.") for key in state):  # a GPT2Model checkpoint: no prefix
        state = {f"transformer.{key}": value for key, value in state.items()}
    out = {}
    for key, value in state.items():
        if key.endswith(_HF_BUFFERS):
            continue
        out[key] = value.t().contiguous() if key.endswith(_CONV1D) else value
    return out


def _load_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(assign=True), raising one error that lists every missing and unexpected key."""
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    expected = set(shapes)
    missing = sorted(expected - set(state))
    if getattr(model, "config", None) is not None and getattr(model.config, "tie_weights", False):
        missing = [k for k in missing if k != "lm_head.weight"]  # filled from the tied token table
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing keys {missing}, unexpected keys "
                         f"{unexpected}")
    wrong = [f"{key} {list(value.shape)} (config: {list(shapes[key])})"
             for key, value in state.items() if value.shape != shapes[key]]
    if wrong:
        raise ValueError(f"{source} does not match its config: shapes {', '.join(wrong)}")
    model.load_state_dict(state, strict=True, assign=True)


def gpt_from_hf(model_or_dir: Union[str, os.PathLike, torch.nn.Module]) -> GPT:
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face GPT-2 directory")
        config = config_from_hf(read_json_object(config_file))
        state, source = _read_state_dict(directory), str(directory)
    elif isinstance(model_or_dir, torch.nn.Module) and hasattr(model_or_dir, "config"):
        config = config_from_hf(model_or_dir.config.to_dict())
        # copies: the GPT must not share storage with the model it came from
        state = {k: v.detach().clone() for k, v in model_or_dir.state_dict().items()}
        source = type(model_or_dir).__name__
    else:
        raise TypeError(f"GPT.from_hf expects a GPT2LMHeadModel or a directory, got {type(model_or_dir).__name__}")
    state = _state_from_hf(state)
    head, table = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    if config.tie_weights and head is not None and table is not None and not torch.equal(head, table):
        # as transformers 5 loads it: the checkpoint's own head, untied
        warnings.warn(f"{source}: tie_word_embeddings is set but lm_head.weight differs from the token "
                      f"table; keeping the head untied, as transformers does", stacklevel=3)
        config = dataclasses.replace(config, tie_weights=False)
    with torch.device("meta"):
        model = GPT(config)
    _load_exact(model, state, source)
    return model.eval()  # as transformers' from_pretrained returns it


GPT2_EOS = 50256  # GPT2Config's default bos / eos id


def config_to_hf(config: GPTConfig):
    from transformers import GPT2Config

    unsupported = [f"{name}={getattr(config, name)!r}" for name, ok in (
        ("pos_embedding", config.pos_embedding == "learned"), ("norm", config.norm == "layernorm"),
        ("bias", config.bias), ("n_kv_head", config.n_kv_head == config.n_head),
        ("activation", config.activation in _ACTIVATIONS_TO_HF), ("window", config.window is None)) if not ok]
    if unsupported:
        raise ValueError(f"this GPT has no GPT-2 equivalent: {', '.join(unsupported)}")
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, n_inner=config.mlp_hidden,
                      activation_function=_ACTIVATIONS_TO_HF[config.activation], resid_pdrop=config.dropout,
                      embd_pdrop=config.dropout, attn_pdrop=config.dropout, layer_norm_epsilon=config.norm_eps,
                      tie_word_embeddings=config.tie_weights,
                      # GPT-2's <|endoftext|> (50256) when the vocabulary has it; a smaller one has no such id
                      **({} if config.vocab_size > GPT2_EOS else {"bos_token_id": None, "eos_token_id": None}))


def gpt_to_hf(model: GPT, save_directory: Optional[Union[str, os.PathLike]] = None):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(config_to_hf(model.config))
    state = {key: (value.t() if key.endswith(_CONV1D) else value).detach().clone()
             for key, value in model.state_dict().items()}
    _load_exact(hf, state, "the gptkern GPT")
    hf.tie_weights()
    hf.eval()
    if save_directory is not None:
        save_pretrained_atomic(hf, save_directory)
    return hf


def save_pretrained_atomic(hf_model, save_directory: Union[str, os.PathLike]) -> None:
    """``save_pretrained`` into a temporary sibling directory that then replaces ``save_directory``
    (a reader never sees new weights beside an old config, or a stale shard index). Other files
    already there stay, as with transformers' own ``save_pretrained``, except older weights."""
    save_into_directory(save_directory, hf_model.save_pretrained, keep=lambda name: not is_weights_file(name))
