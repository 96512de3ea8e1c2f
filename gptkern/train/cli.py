"""``gptkern train``: pretrain a GPT on prepared token data.

``gptkern train [--config FILE.toml|yaml|json] [--preset gpt2-tiny] [--data DIR] [--key value ...]``:
every TrainConfig field is a flag (``--max-steps 200``, ``--lr 3e-4``, ``--resume``) and every
GPTConfig field a model override (``--n-layer 4``). Under ``torchrun --nproc_per_node=G -m gptkern
train ...`` each process trains one rank (DDP, or FSDP2 with ``--fsdp``).

``gptkern train seq2seq --data pairs.tsv`` trains a byte-level translation model instead
(``gptkern train seq2seq -h``).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from gptkern.train.config import TrainConfig, apply_flags, flags_help, read_config_file


def parse(argv: Sequence[str]) -> TrainConfig:
    argv = list(argv)
    values: dict = {}
    found = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if len(found) > 1:
        raise ValueError("--config given more than once")
    if found:
        i = found[0]
        if argv[i] == "--config":  # --config FILE
            if i + 1 == len(argv) or not argv[i + 1]:
                raise ValueError("--config needs a file")
            path, end = argv[i + 1], i + 2
        else:  # --config=FILE
            path, end = argv[i].partition("=")[2], i + 1
            if not path:
                raise ValueError("--config needs a file")
        values = read_config_file(path)
        del argv[i:end]
    return TrainConfig.from_dict(apply_flags(values, argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["seq2seq"] and ("-h" in argv or "--help" in argv):  # anywhere, as argparse takes it
        print(__doc__.replace("``", "").strip() + "\n\n" + flags_help())
        return 0
    if argv[:1] == ["seq2seq"]:
        from gptkern.train.tasks import main_seq2seq

        return main_seq2seq(argv[1:])
    from gptkern.train.trainer import TrainingError, train

    try:
        config = parse(argv)
    except ValueError as err:
        if os.environ.get("GPTKERN_TRACEBACK"):
            raise
        print(f"gptkern train: error: {err}", file=sys.stderr)
        return 2
    try:
        losses = train(config)
    except TrainingError as err:
        print(f"gptkern train: {err}", file=sys.stderr)
        return 1
    if losses and os.environ.get("RANK", "0") == "0":
        print(f"gptkern train: {len(losses)} steps in this run, last loss {losses[-1]:.4f}, checkpoints in "
              f"{config.out_dir}/checkpoints", file=sys.stderr)
    return 0


def finetune_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gptkern finetune classify --init CKPT --data train.csv --val val.csv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: gptkern finetune classify --init CKPT --data train.csv --val val.csv [--steps N ...]"
    if argv[:1] in (["-h"], ["--help"]):  # after classify, its own parser lists the flags
        print(f"{usage}\n\nFine-tune a pretrained GPT checkpoint as a text classifier (CSV columns text, label); "
              f"`gptkern finetune classify -h` lists its flags.")
        return 0
    if argv[:1] != ["classify"]:
        what = f"unknown task {argv[0]!r}" if argv else "no task given"
        print(f"{usage}\ngptkern finetune: error: {what}: the task is classify", file=sys.stderr)
        return 2
    from gptkern.train.tasks import main_classify

    return main_classify(argv[1:])
