"""The trainer's step arithmetic, checkpoint durability, config checks and the task helpers, each
checked alone on tiny models (the end-to-end runs are in test_train.py and test_tasks.py)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from gptkern.data import ByteTokenizer, TokenLoader
from gptkern.train import TrainConfig, Trainer, TrainingError, train
from gptkern.train import checkpoint as ckpt
from gptkern.train.metrics import read_metrics
from helpers import fsync_spy
import test_train
from test_train import tiny

data_dir = test_train.data_dir  # the fixture: test_train's byte-level shards


def config(data_dir, out_dir, **overrides):
    """test_train's 1-layer model, 4 steps, checkpoints at the last one."""
    return tiny(data_dir, out_dir, **{"max_steps": 4, "checkpoint_interval": 4, "keep_last": 2, **overrides})


def fixed_grads(trainer, batch):
    trainer.loader.next_batch = lambda with_doc_ids=False: batch
    seen = []
    real_step = trainer.optimizer.step

    def step(*a, **k):
        seen.append([p.grad.clone() for p in trainer.raw_model.parameters()])
        return real_step(*a, **k)

    trainer.optimizer.step = step
    trainer.train_step()
    return seen[0]


def test_accumulated_gradients_are_the_mean_of_the_micro_batches(data_dir, tmp_path):
    one = Trainer(config(data_dir, tmp_path / "one", grad_clip=0.0))
    batch = one.loader.next_batch()
    two = Trainer(config(data_dir, tmp_path / "two", grad_clip=0.0, grad_accum=3))
    for a, b in zip(fixed_grads(one, batch), fixed_grads(two, batch)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_step_loss_is_the_mean_of_the_micro_batch_losses(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, grad_accum=2))
    trainer._micro_step = lambda last: torch.tensor(3.0 if last else 1.0)
    assert float(trainer.train_step()) == 2.0


def test_gradients_are_clipped_before_the_update(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, grad_clip=1e-3))
    norms = []
    real_step = trainer.optimizer.step

    def step(*a, **k):
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in trainer.raw_model.parameters() if p.grad is not None]))))
        return real_step(*a, **k)

    trainer.optimizer.step = step
    trainer.train_step()
    assert norms[0] <= 1e-3 * (1 + 1e-4)


def test_the_first_step_uses_the_schedules_step_0_rate(data_dir, tmp_path):
    from gptkern.train.trainer import learning_rate

    c = config(data_dir, tmp_path, warmup_steps=4, lr=1e-3)
    trainer = Trainer(c)
    trainer.train_step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(c, 0)) == pytest.approx(2.5e-4)


@torch.no_grad()
def test_evaluate_is_the_mean_batch_loss(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path))
    loader = TokenLoader(*trainer.val_loader_args, seed=trainer.config.seed)
    trainer.model.eval()
    want = sum(float(trainer.model(*loader.next_batch())[1]) for _ in range(3)) / 3
    assert trainer.evaluate(steps=3) == pytest.approx(want, rel=1e-5)


def test_an_infinite_loss_stops_training(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(config(data_dir, tmp_path, checkpoint_interval=100, max_steps=6))
    original = trainer.model.forward

    def poisoned(x, y):
        logits, loss = original(x, y)
        return logits, (loss * float("inf") if trainer.step >= 1 else loss)

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(TrainingError, match="loss is inf at step 2"):
        trainer.fit()


def test_a_validation_split_of_exactly_one_window_is_evaluated(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.fromfile(data / "val.bin", dtype=np.uint16)[:17]  # block_size 16 + 1
    tokens.tofile(data / "val.bin")
    meta["splits"]["val"]["tokens"] = 17
    (data / "meta.json").write_text(json.dumps(meta))
    trainer = Trainer(config(data, tmp_path / "run"))
    assert trainer.evaluating and trainer.val_loader_args[1] == "val"


def test_a_vocab_size_equal_to_the_datas_is_taken(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, model=dict(n_layer=1, n_embd=32, n_head=2, block_size=16,
                                                            vocab_size=257)))
    assert trainer.model_config.vocab_size == 257


def test_the_last_step_is_logged(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_steps=3, log_interval=2, checkpoint_interval=100))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [2, 3]


# ---------------------------------------------------------------- checkpoint

def small_model():
    from gptkern.models import GPT, GPTConfig

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=257))
    return model, torch.optim.AdamW(model.parameters())


def test_optimizer_and_rng_files_are_fsynced(tmp_path, monkeypatch):
    model, opt = small_model()
    synced = fsync_spy(monkeypatch)
    ckpt.save_checkpoint(str(tmp_path), 1, model, opt, ByteTokenizer(), {"config": {}, "loader": {}}, keep_last=2)
    names = [os.path.basename(p) for p in synced]
    assert any(n.startswith("optimizer.pt.tmp") for n in names) and any(n.startswith("rng.pt.tmp") for n in names)


def test_a_failed_same_step_swap_puts_the_earlier_save_back(tmp_path, monkeypatch):
    model, opt = small_model()
    final = ckpt.save_checkpoint(str(tmp_path), 5, model, opt, ByteTokenizer(), {"config": {}, "loader": {}, "v": 1}, 2)
    real = os.rename

    def fail(src, dst):
        if os.path.basename(str(src)).startswith(".tmp-") and str(dst) == str(final):
            raise OSError(5, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", fail)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(str(tmp_path), 5, model, opt, ByteTokenizer(), {"config": {}, "loader": {}, "v": 2}, 2)
    monkeypatch.undo()
    assert json.loads((final / "state.json").read_text())["v"] == 1


def test_leftovers_old_swaps_return_and_staging_goes(tmp_path):
    model, opt = small_model()
    root = tmp_path / "checkpoints"
    root.mkdir()
    for name in (".old-step_00000001-999999999", ".tmp-step_00000005-999999998"):
        (root / name).mkdir()
        (root / name / "state.json").write_text(json.dumps({"config": {"data": "d"}, "loader": {}, "step": 1}))
    ckpt.save_checkpoint(str(tmp_path), 2, model, opt, ByteTokenizer(), {"config": {}, "loader": {}}, keep_last=5)
    assert (root / "step_00000001" / "state.json").is_file()  # the swapped-out checkpoint is back
    assert not (root / "step_00000005").exists() and not (root / ".tmp-step_00000005-999999998").exists()


def test_an_empty_loader_list_is_a_corrupt_state():
    assert not ckpt._valid_state({"step": 2, "config": {"data": "d"}, "loader": []})


def test_the_latest_checkpoint_is_by_step_number(tmp_path):
    for step in (99_999_999, 100_000_000):
        d = tmp_path / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
    assert ckpt.latest_checkpoint(str(tmp_path)).name == "step_100000000"


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("name", ["batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps",
                                  "log_interval", "checkpoint_interval", "keep_last"])
def test_counts_below_one_are_refused(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
        TrainConfig(**{name: 0})


def test_resume_with_another_seed_is_a_mismatch():
    from gptkern.train.config import config_mismatch

    assert config_mismatch(TrainConfig(seed=3).to_dict(), TrainConfig(seed=4).to_dict()) == \
        ["seed: checkpoint 3 != now 4"]


@pytest.mark.parametrize("text, value", [("yes", True), ("1", True), ("no", False), ("0", False)])
def test_boolean_flag_spellings(text, value):
    from gptkern.train.cli import parse

    assert parse(["--compile", text]).compile is value


def test_a_zero_time_budget_is_refused():
    with pytest.raises(ValueError, match=r"max_seconds \(--max-seconds\) must be a positive number"):
        TrainConfig(max_seconds=0)


# ---------------------------------------------------------------- tasks

def test_texts_are_cut_to_their_last_tokens():
    from gptkern.train.tasks import _encode_batch

    ids, _ = _encode_batch(ByteTokenizer(), ["abcdef"], 3, 256, "cpu")
    assert ids.tolist() == [list(b"def")]


def test_task_warmup_starts_above_zero():
    from gptkern.train.tasks import TaskConfig, _schedule

    c = TaskConfig(lr=1.0, warmup_steps=4, steps=10)
    assert [_schedule(s, c) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_byte_batches_fit_max_len_with_bos_and_eos():
    from gptkern.train.tasks import BOS, EOS, _byte_batch

    ids = _byte_batch(["abcdef"], [BOS], [EOS], "cpu", 4)
    assert ids.tolist() == [[BOS, 97, 98, EOS]]


def test_seq2seq_trains_on_targets_longer_than_max_len(tmp_path):
    from gptkern.train.tasks import TaskConfig, train_seq2seq

    (tmp_path / "p.tsv").write_text("abcdefghijkl\tlkjihgfedcba\nmnopqrstuvwx\txwvutsrqponm\n")
    train_seq2seq(str(tmp_path / "p.tsv"), TaskConfig(steps=1, batch_size=2, max_len=8, num_beams=1), n_embd=32,
                  n_layer=1, n_head=2)


def test_the_mask_covers_only_real_tokens():
    from gptkern.train.tasks import _encode_batch

    _, mask = _encode_batch(ByteTokenizer(), ["ab", "abcd"], 8, 256, "cpu")
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_a_csv_with_a_header_only_is_refused(tmp_path):
    from gptkern.train.tasks import read_labelled_csv

    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match=r"h\.csv: no rows"):
        read_labelled_csv(str(tmp_path / "h.csv"))


def test_a_resume_keeps_the_metrics_of_the_checkpoint_step(data_dir, tmp_path):
    """Resuming truncates metrics.jsonl after the checkpoint step, keeping that step's record."""
    train(config(data_dir, tmp_path, max_steps=4, log_interval=1, checkpoint_interval=4))
    train(config(data_dir, tmp_path, max_steps=6, log_interval=1, checkpoint_interval=4, resume=True))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_running_out_of_memory_while_loading_is_not_called_a_damaged_file(tmp_path):
    model, opt = small_model()
    path = ckpt.save_checkpoint(str(tmp_path), 1, model, opt, ByteTokenizer(), {"config": {"data": "d"}, "loader": {}},
                                keep_last=1)

    def out_of_memory(state):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        ckpt.load_training_state(path, out_of_memory)
    with pytest.raises(ValueError, match="optimizer.pt does not hold what it should"):
        ckpt.load_training_state(path, lambda state: opt.load_state_dict({"state": {}, "param_groups": []}))
