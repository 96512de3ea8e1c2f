"""Contracts of the data and training pipeline that a mutation run found untested: the tokenizer
trained on the training split only, the validation count, byte order marks, loader state checks,
the logged learning rate and token counts, resume and metrics truncation, evaluation batches,
fp16 clipping, checkpoint fsync and RNG state, the task schedule, seq2seq padding, classification
in eval mode, a failed run's exit status."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from gptkern.data import ByteTokenizer, TokenLoader, load_tokenizer
from gptkern.data.prepare import prepare, split_documents
from gptkern.train import Trainer, train
from gptkern.train.checkpoint import latest_checkpoint
from gptkern.train.metrics import read_metrics
from gptkern.train.trainer import learning_rate
import test_train
from test_train import tiny

data_dir = test_train.data_dir


def config(data_dir, out_dir, **overrides):  # as test_trainer_units.config
    return tiny(data_dir, out_dir, **{"max_steps": 4, "checkpoint_interval": 4, "keep_last": 2, **overrides})


# ---------------------------------------------------------------- data

def test_bpe_is_trained_on_the_training_split_only(tmp_path):
    """Validation text must not leak into the tokenizer: a word only a val document holds gets no merges."""
    docs = [f"train document {i}: the quick brown fox jumps over the lazy dog\n" for i in range(4)] + ["zyxwvu " * 200]
    val = int(np.flatnonzero(split_documents(len(docs), 0.2, 0))[0])
    docs[val], docs[-1] = docs[-1], docs[val]  # the val-only word in the document the draw sends to val
    paths = []
    for i, text in enumerate(docs):
        paths.append(tmp_path / f"in{i}.txt")
        paths[-1].write_text(text)
    prepare(paths, tmp_path / "out", "bpe", vocab_size=400, val_fraction=0.2, seed=0, workers=1, progress=False)
    assert len(load_tokenizer(tmp_path / "out").encode("zyxwvu")) == 6  # one id per byte


def test_the_validation_count_is_rounded():
    assert split_documents(19, 0.1, 0).sum() == 2 and split_documents(7, 0.5, 0).sum() == 4


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello world\n")
    prepare([tmp_path / "a.txt"], tmp_path / "out", "byte", val_fraction=0, workers=1, progress=False)
    tokens = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert ByteTokenizer().decode(tokens.tolist()) == "hello world\n"


@pytest.mark.parametrize("field", ["num_tokens", "seed", "block_size", "split"])
def test_a_loader_state_of_other_settings_is_refused(tmp_path, field):
    from test_data import twin_split_dir

    d = twin_split_dir(tmp_path)
    loader = TokenLoader(d, "train", 8, 2, seed=1)
    other = {"num_tokens": 199, "seed": 2, "block_size": 9, "split": "val"}[field]
    with pytest.raises(ValueError, match=f"{field}: saved {other!r}, this loader"):
        loader.load_state_dict({**loader.state_dict(), field: other})


# ---------------------------------------------------------------- trainer

def test_metrics_log_the_rate_the_step_trained_with(data_dir, tmp_path):
    c = config(data_dir, tmp_path, lr=1e-3, min_lr=1e-4, warmup_steps=4, log_interval=1, checkpoint_interval=100)
    train(c)
    logged = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    assert logged == pytest.approx([learning_rate(c, s) for s in range(4)])  # step 1 trained at learning_rate(c, 0)


def test_token_counts_include_accumulated_micro_batches(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, grad_accum=3, max_steps=2, checkpoint_interval=2))
    trainer.fit()
    state = json.loads((latest_checkpoint(str(tmp_path)) / "state.json").read_text())
    assert trainer.tokens_per_step == 2 * 16 * 3 and state["tokens"] == 2 * 2 * 16 * 3


def test_a_resume_drops_the_metrics_of_steps_it_repeats(data_dir, tmp_path):
    """A run killed after logging steps past its last checkpoint: the resume logs them once."""
    train(config(data_dir, tmp_path, max_steps=6, log_interval=1, checkpoint_interval=4))
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")  # as if killed before this save
    train(config(data_dir, tmp_path, max_steps=6, log_interval=1, checkpoint_interval=4, resume=True))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


@torch.no_grad()
def test_evaluation_reads_the_same_batches_at_every_step(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path))
    before = trainer.evaluate(steps=2)
    trainer.step = 5  # the same weights, a later step
    assert trainer.evaluate(steps=2) == before


def test_fp16_clips_the_unscaled_gradients(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, dtype="fp16", grad_clip=0.5, lr=1e-3, min_lr=1e-4))
    assert trainer.scaler.get_scale() > 1
    norms, real_step = [], trainer.optimizer.step

    def step(*a, **k):
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in trainer.raw_model.parameters() if p.grad is not None]))))
        return real_step(*a, **k)

    trainer.optimizer.step = step
    trainer.train_step()
    assert norms[0] == pytest.approx(0.5, rel=1e-3)  # the initial gradient norm is far above 0.5


# ---------------------------------------------------------------- tasks

def test_seq2seq_padding_is_out_of_the_loss_and_the_encoders_attention(tmp_path, monkeypatch):
    import gptkern.train.tasks as tasks
    from gptkern.models import Seq2SeqTransformer

    (tmp_path / "p.tsv").write_text("ab\tba\nabcdefg\tgfedcba\nxyz\tzyx\n")
    targets, masks = [], []
    real_ce, real_forward = tasks.F.cross_entropy, Seq2SeqTransformer.forward
    monkeypatch.setattr(tasks.F, "cross_entropy", lambda logits, target, **k: (targets.append(target), real_ce(
        logits, target, **k))[1])

    def forward(self, src, tgt, src_pad_mask=None, *a, **k):
        masks.append((src, src_pad_mask))
        return real_forward(self, src, tgt, src_pad_mask, *a, **k)

    monkeypatch.setattr(Seq2SeqTransformer, "forward", forward)
    tasks.train_seq2seq(str(tmp_path / "p.tsv"), tasks.TaskConfig(steps=1, batch_size=4, max_len=16, num_beams=1,
                                                                  device="cpu"), n_embd=32, n_layer=1, n_head=2)
    assert not (targets[0] == tasks.PAD).any() and (targets[0] == -100).any()
    src, mask = masks[0]
    assert (src == tasks.PAD).any() and mask is not None and torch.equal(mask, src == tasks.PAD)


# ---------------------------------------------------------------- trainer, metrics and checkpoints

def test_the_last_step_is_evaluated(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_steps=6, eval_interval=4, checkpoint_interval=100))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r] == [4, 6]


def test_tokens_per_second_counts_every_step_of_the_log_window(data_dir, tmp_path, monkeypatch):
    import itertools
    import time
    import types

    import gptkern.train.trainer as trainer_module

    clock = itertools.count()  # one second per reading
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock)),
                                                                      sleep=time.sleep))
    trainer = Trainer(config(data_dir, tmp_path, max_steps=8, log_interval=4, checkpoint_interval=100))
    trainer.fit()
    rates = [r["tokens_per_s"] for r in read_metrics(tmp_path / "metrics.jsonl") if "tokens_per_s" in r]
    assert rates == [4 * trainer.tokens_per_step] * 2


def test_peak_tflops_is_in_tera_flops():
    from gptkern.train.metrics import peak_flops

    assert peak_flops(torch.device("cpu"), 100.0, {}) == 1e14


def test_the_checkpoints_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    import os

    from gptkern.models import GPT, GPTConfig
    from gptkern.train import checkpoint as ckpt
    from helpers import fsync_spy

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=257))
    synced = fsync_spy(monkeypatch)
    ckpt.save_checkpoint(str(tmp_path), 1, model, torch.optim.AdamW(model.parameters()), ByteTokenizer(),
                         {"config": {}, "loader": {}}, keep_last=2)
    assert os.path.join(str(tmp_path), "checkpoints") in synced


def test_the_numpy_rng_round_trip_keeps_its_position():
    import io

    from gptkern.train import checkpoint as ckpt

    saved = np.random.get_state()  # put back at the end: other tests in this worker draw from it
    np.random.seed(0)
    np.random.rand(10)  # a position inside the key block
    buffer = io.BytesIO()
    torch.save(ckpt.rng_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    first = np.random.rand(3).tolist()
    ckpt.set_rng_state(state)
    try:
        assert np.random.rand(3).tolist() == first
    finally:
        np.random.set_state(saved)


def test_a_full_disk_while_truncating_the_metrics_keeps_them(tmp_path, monkeypatch):
    import builtins
    import errno
    import io

    from gptkern.train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 7):
        log.log(step=step, loss=1.0 / step)
    real_open = io.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if "w" in mode and str(file).startswith(str(tmp_path)) else f

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)
    with pytest.raises(OSError):
        log.truncate_after(4)
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_task_schedule_peaks_after_warmup_and_decays_to_zero():
    from gptkern.train.tasks import TaskConfig, _schedule

    c = TaskConfig(lr=1.0, warmup_steps=4, steps=12)
    assert [_schedule(s, c) for s in (3, 4, 8, 12)] == pytest.approx([1.0, 1.0, 0.5, 0.0], abs=1e-12)
    values = [_schedule(s, c) for s in range(4, 13)]
    assert values == sorted(values, reverse=True)  # never rises after the warmup


def test_a_resume_may_switch_activation_checkpointing(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_steps=2, checkpoint_interval=2))
    resumed = Trainer(config(data_dir, tmp_path, max_steps=4, checkpoint_interval=2, resume=True,
                             activation_checkpointing=True))
    assert resumed.step == 2 and resumed.model_config.activation_checkpointing


def test_classify_cuts_texts_to_the_checkpoints_context(tmp_path):
    from gptkern.models import GPT, GPTConfig
    from gptkern.models.io import save_pretrained
    from gptkern.train.tasks import TaskConfig, finetune_classify

    save_pretrained(GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=257,
                                            block_size=16)), tmp_path / "ckpt", ByteTokenizer())
    rows = "text,label\n" + "".join(f"{'x' * 40} {i},{'ab'[i % 2]}\n" for i in range(8))  # 42 bytes > 16
    (tmp_path / "t.csv").write_text(rows)
    result = finetune_classify(str(tmp_path / "ckpt"), str(tmp_path / "t.csv"), str(tmp_path / "t.csv"),
                               TaskConfig(steps=2, batch_size=4, device="cpu"))  # max_len 64 by default
    assert 0 <= result["accuracy"] <= 1


def test_classification_accuracy_runs_in_eval_mode():
    from gptkern.models import GPT, GPTConfig, GPTForSequenceClassification
    from gptkern.train.tasks import TaskConfig, classification_accuracy

    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=257, block_size=32,
                                  dropout=0.5))
    model = GPTForSequenceClassification.from_gpt(gpt, 2).train()
    rows = [(f"text {i} " * 3, "ab"[i % 2]) for i in range(64)]
    c = TaskConfig(batch_size=16)  # device "auto": the model's device is used
    accuracies = {classification_accuracy(model, ByteTokenizer(), rows, {"a": 0, "b": 1}, 32, c) for _ in range(4)}
    assert len(accuracies) == 1 and model.training  # dropout off while measuring, back on after


def test_a_stopped_training_exits_with_status_1(data_dir, tmp_path, capsys):
    from gptkern.train.cli import main

    rc = main(["--data", str(data_dir), "--out-dir", str(tmp_path), "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
               "--block-size", "16", "--batch-size", "2", "--max-steps", "2", "--eval-interval", "1", "--eval-steps",
               "1", "--lr", "1e8", "--min-lr", "1e8", "--warmup-steps", "0", "--progress", "false"])
    assert rc == 1 and re.search(r"validation loss is (nan|inf) at step 1", capsys.readouterr().err)


def test_a_disabled_metrics_log_writes_nothing_and_none_values_are_left_out(tmp_path):
    """Only rank 0's log writes (or truncates); a value of None is no key of the record; without a
    training loss there is no loss-curve PNG."""
    from gptkern.train.metrics import MetricsLog, plot_losses

    path, loss = tmp_path / "metrics.jsonl", float(torch.rand(()))
    MetricsLog(tmp_path / "off" / "metrics.jsonl", enabled=False).log(step=1, loss=loss)
    assert not (tmp_path / "off").exists()
    log = MetricsLog(path)
    log.log(step=1, val_loss=loss, lr=None)
    assert plot_losses(path, tmp_path / "loss.png") is None and not (tmp_path / "loss.png").exists()
    log.log(step=2, loss=loss)
    MetricsLog(path, enabled=False).truncate_after(1)
    assert [sorted(r) for r in read_metrics(path)] == [["step", "time", "val_loss"], ["loss", "step", "time"]]
