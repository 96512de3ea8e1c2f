"""The training loop: loss goes down, exact resume, atomic checkpoints, NaN stop, config checks, DDP."""
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptkern.models.io import load_pretrained
from gptkern.train import TrainConfig, Trainer, TrainingError, train
from gptkern.train import checkpoint as ckpt
from gptkern.train.cli import parse
from gptkern.train.metrics import read_metrics

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(400))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "input").mkdir()
    (root / "input" / "a.txt").write_text(TEXT)
    (root / "input" / "b.txt").write_text(TEXT.upper())
    result = subprocess.run([sys.executable, "-m", "gptkern", "prepare", "--input", str(root / "input"), "--out",
                             str(root / "data"), "--tokenizer", "byte", "--val-fraction", "0.5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "data"


def config(data_dir, out_dir, **overrides):
    values = dict(preset="gpt2-tiny", model=dict(n_layer=2, n_embd=64, n_head=4, block_size=32), data=str(data_dir),
                  out_dir=str(out_dir), batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2, eval_interval=4,
                  eval_steps=2, log_interval=2, checkpoint_interval=4, keep_last=2, progress=False, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def test_loss_decreases_and_outputs_are_written(data_dir, tmp_path):
    losses = train(config(data_dir, tmp_path, max_steps=40, checkpoint_interval=20))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert any("val_loss" in r and "val_ppl" in r for r in records)
    assert any("tokens_per_s" in r for r in records)
    assert (tmp_path / "loss.png").stat().st_size > 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(saved) == config(data_dir, tmp_path, max_steps=40, checkpoint_interval=20)
    assert [p.name for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_00000020", "step_00000040"]
    model, tokenizer = load_pretrained(ckpt.latest_checkpoint(str(tmp_path)))  # a model directory
    assert tokenizer is not None and model.config.n_layer == 2


def test_resume_is_exact(data_dir, tmp_path):
    """2N steps straight give bit-identical losses to N steps, a resume, and N more (dropout on)."""
    cfg = dict(model=dict(n_layer=2, n_embd=64, n_head=4, block_size=32, dropout=0.1), checkpoint_interval=100)
    straight = train(config(data_dir, tmp_path / "straight", max_steps=8, **cfg))
    first = Trainer(config(data_dir, tmp_path / "split", max_steps=8, **cfg))
    losses = [float(first.train_step()) for _ in range(4)]
    first.save()
    del first
    torch.manual_seed(12345)  # the resume restores every RNG: this must not matter
    losses += train(config(data_dir, tmp_path / "split", max_steps=8, resume=True, **cfg))
    assert losses == straight


def test_resume_with_another_config_lists_fields(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_steps=4))
    with pytest.raises(ValueError, match="already holds checkpoints .* --resume"):
        Trainer(config(data_dir, tmp_path, max_steps=8))
    with pytest.raises(ValueError, match=r"model.n_layer: checkpoint 2 != now 3; batch_size: checkpoint 4 != now 8"):
        Trainer(config(data_dir, tmp_path, max_steps=8, resume=True, batch_size=8,
                       model=dict(n_layer=3, n_embd=64, n_head=4, block_size=32)))


def test_nan_loss_stops_without_checkpoint(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(config(data_dir, tmp_path, max_steps=8, checkpoint_interval=2))
    original = trainer.model.forward

    def poisoned(x, y):
        logits, loss = original(x, y)
        return logits, loss * float("nan") if trainer.step >= 3 else loss

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(TrainingError, match="loss is nan at step 4: .* last good one is .*step_00000002"):
        trainer.fit()  # the fourth step, counted from 1 as the metrics and checkpoint names count
    assert [p.name for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_00000002"]


def tiny(data_dir, out_dir, **overrides):
    """A 1-layer model: a few steps take a fraction of a second."""
    values = dict(model=dict(n_layer=1, n_embd=32, n_head=2, block_size=16), batch_size=2, eval_steps=1,
                  checkpoint_interval=1, keep_last=1)
    return config(data_dir, out_dir, **{**values, **overrides})


def strict_json(line):
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds a bare {name}"))


def test_diverged_weights_are_never_saved(data_dir, tmp_path):
    """The step's loss is computed before its update: a NaN validation loss, or weights an update blew
    up, stop training before the save, and keep-last never rotates the good checkpoint out."""
    diverging = dict(lr=1e8, min_lr=1e8, warmup_steps=0)
    with pytest.raises(TrainingError, match="validation loss is nan at step 1: .*none was written before"):
        train(tiny(data_dir, tmp_path / "fresh", eval_interval=1, **diverging))
    assert ckpt.list_checkpoints(str(tmp_path / "fresh")) == []
    records = [strict_json(line) for line in (tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] is None  # null, not a bare NaN

    train(tiny(data_dir, tmp_path / "run", max_steps=2))
    good = ckpt.latest_checkpoint(str(tmp_path / "run"))
    with pytest.raises(TrainingError, match=f"at step 3: .*the last good one is {good}"):
        train(tiny(data_dir, tmp_path / "run", max_steps=4, resume=True, lr=1e30, min_lr=1e30, warmup_steps=0))
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == [good]
    load_pretrained(good)


def test_keep_last_and_resume_touch_only_checkpoint_folders(data_dir, tmp_path):
    root = tmp_path / "checkpoints"
    mine = [root / "step_00000002_backup", root / ".tmp-notes", root / "step_x"]
    for folder in mine:
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    killed = root / ".tmp-step_00000001-999999999"  # a staging folder of a killed run
    killed.mkdir()
    train(tiny(data_dir, tmp_path, max_steps=3, keep_last=1))
    assert [p.name for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_00000003"]
    assert all(folder.is_dir() for folder in mine) and not killed.exists()
    (root / "step_00000003" / "state.json").unlink()  # not a checkpoint any more: nothing to resume
    assert ckpt.latest_checkpoint(str(tmp_path)) is None


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.json"])
def test_corrupt_checkpoint_file_is_named(data_dir, tmp_path, name):
    train(tiny(data_dir, tmp_path, max_steps=1))
    file = ckpt.latest_checkpoint(str(tmp_path)) / name
    file.write_bytes(file.read_bytes()[:100])  # head -c 100
    with pytest.raises(ValueError, match=f"{file} is corrupt"):
        train(tiny(data_dir, tmp_path, max_steps=2, resume=True))


def test_a_newest_checkpoint_folder_without_its_state_is_named_not_skipped(data_dir, tmp_path):
    """Saves rename whole folders into place, so a newest step folder lacking state.json was damaged
    from outside: resuming from the one before, or starting afresh, would overwrite it."""
    train(tiny(data_dir, tmp_path, max_steps=2))
    newest = ckpt.latest_checkpoint(str(tmp_path))
    (newest / "state.json").unlink()
    weights = (newest / "model.safetensors").read_bytes()
    for resume in (True, False):
        with pytest.raises(ValueError, match=f"checkpoint folder {newest} has no state.json"):
            train(tiny(data_dir, tmp_path, max_steps=3, resume=resume))
    assert (newest / "model.safetensors").read_bytes() == weights
    # an older one (a rotation killed midway) is ignored
    shutil.move(newest, tmp_path / "aside")
    train(tiny(data_dir, tmp_path, max_steps=2, keep_last=2))
    older = ckpt.list_checkpoints(str(tmp_path))[0]
    (older / "state.json").unlink()
    train(tiny(data_dir, tmp_path, max_steps=3, keep_last=2, resume=True))
    assert [p.name for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_00000002", "step_00000003"]


@pytest.mark.parametrize("name, content", [("rng.pt", {"python": 1}),
                                           ("optimizer.pt", {"state": {}, "param_groups": []})])
def test_a_checkpoint_file_of_the_wrong_structure_is_named(data_dir, tmp_path, name, content):
    train(tiny(data_dir, tmp_path, max_steps=1))
    file = ckpt.latest_checkpoint(str(tmp_path)) / name
    torch.save(content, file)
    with pytest.raises(ValueError, match=f"checkpoint file {file} does not hold what it should"):
        train(tiny(data_dir, tmp_path, max_steps=2, resume=True))


def test_a_state_file_without_the_loader_position_is_named(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path, max_steps=1))
    file = ckpt.latest_checkpoint(str(tmp_path)) / "state.json"
    state = json.loads(file.read_text())
    del state["loader"]
    file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"{file} is corrupt"):
        train(tiny(data_dir, tmp_path, max_steps=2, resume=True))


@pytest.mark.parametrize("state", [
    {"step": 2, "config": {}, "loader": {}},  # no data folder in the config
    {"step": 2, "config": {"data": 5}, "loader": {}},
    {"step": 2, "config": {"data": "d"}, "loader": [1, 2]},
    {"step": 2, "config": {"data": "d"}, "loader": [{}], "world_size": 2},
    {"step": 2, "config": {"data": "d"}, "loader": {}, "world_size": "1"},
    {"step": 2, "config": {"data": "d"}, "loader": {}, "data_realpath": 3},
    {"step": True, "config": {"data": "d"}, "loader": {}},
    {"step": -1, "config": {"data": "d"}, "loader": {}},
])
def test_a_state_file_missing_what_resuming_reads_is_named(data_dir, tmp_path, state):
    train(tiny(data_dir, tmp_path, max_steps=1))
    file = ckpt.latest_checkpoint(str(tmp_path)) / "state.json"
    file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"checkpoint file {file} is corrupt"):
        train(tiny(data_dir, tmp_path, max_steps=2, resume=True))


def test_resume_compares_resolved_settings(data_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    monkeypatch.chdir(tmp_path)
    train(tiny("data", "run", max_steps=1))
    # the same folder and window, written differently: no mismatch
    train(tiny("./data", "run", max_steps=2, resume=True, block_size=16))
    train(tiny(str(data), "run", max_steps=3, resume=True))
    # the data prepared again with another tokenizer: the vocabulary differs
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 300}))
    with pytest.raises(ValueError, match="another configuration: .*model.vocab_size: checkpoint 257 != now 300"):
        Trainer(tiny("data", "run", max_steps=4, resume=True))
    capsys.readouterr()
    Trainer(tiny("data", "empty", resume=True))  # nothing to resume: starts fresh, and says so
    assert "--resume: no checkpoint in empty/checkpoints, starting from scratch" in capsys.readouterr().err


def test_resume_from_another_directory_and_world_size(data_dir, tmp_path, monkeypatch):
    """The data folder is the same when it resolves as it did when the checkpoint was written (a
    relative path resumed from another directory) or as the saved path resolves from here (the
    project moved); another folder is refused, and so is a checkpoint of another world size."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    monkeypatch.chdir(tmp_path)
    train(tiny("data", str(tmp_path / "run"), max_steps=1))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(data_dir, elsewhere / "other")
    monkeypatch.chdir(elsewhere)
    train(tiny(str(data), str(tmp_path / "run"), max_steps=2, resume=True))
    with pytest.raises(ValueError, match=f"data: checkpoint '{data}' != now 'other'"):
        Trainer(tiny("other", str(tmp_path / "run"), max_steps=3, resume=True))
    state_file = ckpt.latest_checkpoint(str(tmp_path / "run")) / "state.json"
    state = json.loads(state_file.read_text())
    moved = {**state, "data_realpath": "/moved/away/data", "config": {**state["config"], "data": "data"}}
    state_file.write_text(json.dumps(moved))  # as if written from /moved/away with --data data
    monkeypatch.chdir(tmp_path)
    train(tiny("data", str(tmp_path / "run"), max_steps=3, resume=True))  # "data" resolves here
    state_file = ckpt.latest_checkpoint(str(tmp_path / "run")) / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2, "loader": [state["loader"]] * 2}))
    with pytest.raises(ValueError, match="world_size: checkpoint 2 != now 1"):
        Trainer(tiny(str(data), str(tmp_path / "run"), max_steps=4, resume=True))


def test_a_fresh_start_drops_an_earlier_runs_metrics(data_dir, tmp_path):
    """A run that stopped before its first checkpoint (a NaN, a kill) leaves metrics only: the
    next run in that folder starts them over, as --resume without a checkpoint does."""
    train(tiny(data_dir, tmp_path, max_steps=3, checkpoint_interval=100))
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
    train(tiny(data_dir, tmp_path, max_steps=2, checkpoint_interval=100, log_interval=1))
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]


def test_vocab_size_may_pad_the_datas_but_not_cut_it(data_dir, tmp_path):
    padded = Trainer(tiny(data_dir, tmp_path / "padded", model=dict(n_layer=1, n_embd=32, n_head=2, block_size=16,
                                                                    vocab_size=320)))
    assert padded.model_config.vocab_size == 320 and padded.raw_model.lm_head.weight.shape[0] == 320
    with pytest.raises(ValueError, match="vocab_size 100 .* smaller than the data's vocabulary 257"):
        Trainer(tiny(data_dir, tmp_path / "cut", model=dict(n_layer=1, n_embd=32, n_head=2, block_size=16,
                                                             vocab_size=100)))


def test_training_without_validation_data(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"]["tokens"] = 0  # as `prepare --val-fraction 0` writes it
    (data / "meta.json").write_text(json.dumps(meta))
    (data / meta["splits"]["val"]["file"]).write_bytes(b"")
    losses = train(tiny(data, tmp_path / "run", max_steps=2, eval_interval=1))
    assert len(losses) == 2 and "training without evaluation" in capsys.readouterr().err
    assert not [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert len(ckpt.list_checkpoints(str(tmp_path / "run"))) == 1


def test_failed_save_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(config(data_dir, tmp_path, max_steps=2))
    trainer.train_step()
    first = trainer.save()
    trainer.train_step()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_torch_save_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    assert ckpt.list_checkpoints(str(tmp_path)) == [first]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    load_pretrained(first)


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


REAL_TORCH_SAVE = torch.save


def torch_save_on_a_full_disk(obj, f):
    """torch.save's own failure there: "[enforce fail at inline_container.cc] unexpected pos", raised while
    handling the OSError."""
    REAL_TORCH_SAVE(obj, io.BufferedWriter(FullDisk()))


def raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("patch", ["_torch_save_atomic", "torch.save", "save_safetensors"])
def test_a_full_disk_during_a_save_is_one_clear_error(data_dir, tmp_path, monkeypatch, patch):
    trainer = Trainer(tiny(data_dir, tmp_path, max_steps=2))
    trainer.train_step()
    first = trainer.save()
    trainer.train_step()
    if patch == "_torch_save_atomic":
        monkeypatch.setattr(ckpt, "_torch_save_atomic", raise_enospc)
    elif patch == "torch.save":
        monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    else:  # safetensors reports an OS error as SafetensorError("... I/O error: ... (os error 28)")
        from safetensors import SafetensorError

        import gptkern.models.io as model_io

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(model_io, "save_safetensors_atomic", full)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"could not write checkpoint .*step_00000002: No space left "
                                                        r"on device") as failed:
        trainer.save()
    assert isinstance(failed.value, OSError)
    assert ckpt.list_checkpoints(str(tmp_path)) == [first]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    load_pretrained(first)
    torch.load(first / "optimizer.pt", weights_only=True)


def test_a_full_disk_is_one_line_on_the_command_line(data_dir, tmp_path, monkeypatch, capsys):
    from gptkern import cli

    flags = ["train", "--data", str(data_dir), "--out-dir", str(tmp_path), "--n-layer", "1", "--n-embd", "32",
             "--n-head", "2", "--block-size", "16", "--batch-size", "2", "--eval-steps", "1", "--device", "cpu",
             "--progress", "false"]
    assert cli.main(flags + ["--max-steps", "1"]) == 0
    first = ckpt.latest_checkpoint(str(tmp_path))
    capsys.readouterr()
    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    assert cli.main(flags + ["--max-steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the run's notes and metrics lines
    assert last.startswith("gptkern train: error: could not write checkpoint ") and err.count("error") == 1
    assert "step_00000002: No space left on device" in last and "Traceback" not in err
    assert ckpt.list_checkpoints(str(tmp_path)) == [first]
    monkeypatch.undo()
    assert cli.main(flags + ["--max-steps", "2", "--resume"]) == 0  # the earlier checkpoint resumes


SAVER = """
import sys, torch
from gptkern.data import ByteTokenizer
from gptkern.models import GPT, GPTConfig
from gptkern.train.checkpoint import save_checkpoint
model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=4, vocab_size=257))
optimizer = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
optimizer.step()
step = 0
while True:
    step += 1
    save_checkpoint(sys.argv[1], step, model, optimizer, ByteTokenizer(), {"config": {}, "loader": {}}, keep_last=3)
    print(step, flush=True)
"""


def test_sigkill_during_saves_leaves_loadable_checkpoints(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # wait for a few complete saves
            assert proc.stdout.readline()
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    found = ckpt.list_checkpoints(str(tmp_path))
    assert found
    for path in found:  # every visible checkpoint is complete
        load_pretrained(path)
        torch.load(path / "optimizer.pt", weights_only=True)
        torch.load(path / "rng.pt", weights_only=True)


def test_cli_flags_and_config_files(tmp_path):
    (tmp_path / "run.toml").write_text('preset = "llama-tiny"\nmax_steps = 7\n[model]\nn_layer = 3\n')
    (tmp_path / "run.yaml").write_text("preset: gpt2-tiny\nlr: 0.01\n")
    cfg = parse(["--config", str(tmp_path / "run.toml"), "--lr", "3e-4", "--n-embd=64", "--compile"])
    assert (cfg.preset, cfg.max_steps, cfg.lr, cfg.compile) == ("llama-tiny", 7, 3e-4, True)
    assert cfg.model == {"n_layer": 3, "n_embd": 64}
    assert parse(["--config", str(tmp_path / "run.yaml")]).lr == 0.01
    with pytest.raises(ValueError, match="unknown flag --learning-rate; `gptkern train -h` lists every flag"):
        parse(["--learning-rate", "1"])
    with pytest.raises(ValueError, match="unknown flag --max_step \\(did you mean --max-steps\\?\\)"):
        parse(["--max_step=3"])
    with pytest.raises(ValueError, match="--max-steps expects int"):
        parse(["--max-steps", "many"])
    with pytest.raises(ValueError, match="--compile expects true or false"):
        parse(["--compile", "maybe"])
    with pytest.raises(ValueError, match="--lr needs a value"):
        parse(["--lr"])
    for empty in (["--out-dir=", "--resume"], ["--compile="], ["--lr="]):  # never the next flag as its value
        with pytest.raises(ValueError, match=f"{empty[0][:-1]} needs a value after ="):
            parse(empty)
    with pytest.raises(ValueError, match="n_embd .* divisible"):
        parse(["--n-embd", "130"])


def _flags(data_dir, out_dir, batch_size):
    return ["--preset", "gpt2-tiny", "--n-layer", "2", "--n-embd", "64", "--block-size", "32", "--data",
            str(data_dir), "--out-dir", str(out_dir), "--batch-size", str(batch_size), "--max-steps", "4",
            "--log-interval", "1", "--eval-interval", "4", "--eval-steps", "1", "--checkpoint-interval", "4",
            "--progress", "false", "--seed", "5", "--lr", "3e-3", "--peak-tflops", "1"]


def test_ddp_and_fsdp_on_two_cpu_processes_match_one_process(data_dir, tmp_path):
    """torchrun with 2 gloo ranks of batch 2 (DDP, then FSDP2) gives the losses of one process with batch 4."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "gptkern", "train", *_flags(data_dir, tmp_path / "one", 4)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]

    def losses(out):
        return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    def flops_per_token(out, world_size):  # MFU is against the peak of world_size devices
        return [r["mfu"] * 1e12 * world_size / r["tokens_per_s"] for r in read_metrics(out / "metrics.jsonl")
                if "mfu" in r]

    one = losses(tmp_path / "one")
    assert len(one) == 4 and one[0] != one[-1]  # the steps changed the weights
    per_token = flops_per_token(tmp_path / "one", 1)
    assert len(per_token) == 4 and per_token == pytest.approx([per_token[0]] * 4, rel=1e-9)
    for mode, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "gptkern", "train", *_flags(data_dir, tmp_path / mode, 2), *extra],
                             capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert losses(tmp_path / mode) == pytest.approx(one, rel=1e-5, abs=1e-6), mode
        assert flops_per_token(tmp_path / mode, 2) == pytest.approx(per_token, rel=1e-9), mode
        assert [p.name for p in ckpt.list_checkpoints(str(tmp_path / mode))] == ["step_00000004"]  # rank 0 only
        model, _ = load_pretrained(ckpt.latest_checkpoint(str(tmp_path / mode)))  # the full, unsharded weights
        assert model.transformer.h[1].mlp.c_fc.weight.shape == (256, 64)
    def resume_under_fsdp_to_step_6(mode):
        flags = _flags(data_dir, tmp_path / mode, 2)
        flags[flags.index("--max-steps") + 1] = "6"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "gptkern", "train", *flags, "--fsdp", "--resume"], capture_output=True, text=True,
                             timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-3000:]

    # FSDP resumes from the full checkpoint (model and optimizer sharded again)
    resume_under_fsdp_to_step_6("fsdp")
    assert [r["step"] for r in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # a DDP checkpoint (its optimizer state keyed by positions) resumed under FSDP: the same steps 5 and 6
    resume_under_fsdp_to_step_6("ddp")
    assert losses(tmp_path / "ddp")[4:] == pytest.approx(losses(tmp_path / "fsdp")[4:], rel=1e-5, abs=1e-6)


def test_fp16_autocast_scales_the_loss(data_dir, tmp_path, monkeypatch):
    """dtype fp16 trains through a GradScaler: the backward sees the scaled loss, the optimizer the
    unscaled gradients, and the scale is saved with the checkpoint and restored on resume."""
    trainer = Trainer(config(data_dir, tmp_path, dtype="fp16", max_steps=2, checkpoint_interval=2))
    assert trainer.scaler.is_enabled() and trainer.autocast is torch.float16
    seen = []
    real_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda t, *a, **k: (seen.append(t.item()), real_backward(t, *a, **k)))
    losses = trainer.fit()
    monkeypatch.undo()
    assert all(loss == loss for loss in losses)
    assert seen[0] == pytest.approx(losses[0] * 2.0 ** 16, rel=1e-3)  # the initial scale
    saved = json.loads((ckpt.latest_checkpoint(str(tmp_path)) / "state.json").read_text())
    assert saved["grad_scaler"]["scale"] == 2.0 ** 16
    assert saved["grad_scaler"]["_growth_tracker"] == 2  # two steps without overflow
    resumed = Trainer(config(data_dir, tmp_path, dtype="fp16", max_steps=4, checkpoint_interval=2, resume=True))
    assert resumed.step == 2 and resumed.scaler.state_dict() == saved["grad_scaler"]  # a new scaler's tracker is 0
    assert not Trainer(config(data_dir, tmp_path / "bf16", dtype="bf16")).scaler.is_enabled()


def test_one_gpu_index_for_every_local_process_is_refused(data_dir, tmp_path, monkeypatch):
    """Under torchrun with 2 processes per node, --device cuda:1 would put both on GPU 1 (NCCL
    refuses duplicate GPUs): a clear error instead; --device cuda picks cuda:LOCAL_RANK."""
    from gptkern.train.trainer import Distributed, pick_device

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every process of this node on one GPU"):
        pick_device(config(data_dir, tmp_path, device="cuda:1"), Distributed(1, 1, 2))
    assert pick_device(config(data_dir, tmp_path, device="cpu"), Distributed(1, 1, 2)) == torch.device("cpu")


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_device_is_this_process_gpu_or_the_cpu(data_dir, tmp_path, monkeypatch, cuda):
    """--device auto: cuda:LOCAL_RANK when CUDA is available (each torchrun process its own GPU),
    else the CPU; the task commands and `gptkern generate` resolve auto the same way."""
    from gptkern._backend import resolve_device
    from gptkern.train.tasks import TaskConfig, _check_config
    from gptkern.train.trainer import Distributed, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # auto is never refused as one GPU for every process
    want = torch.device("cuda", 1) if cuda else torch.device("cpu")
    assert pick_device(config(data_dir, tmp_path, device="auto"), Distributed(1, 1, 2)) == want
    assert resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert _check_config(TaskConfig(), 1).device == ("cuda" if cuda else "cpu")


def test_document_masked_training(data_dir, tmp_path):
    losses = train(config(data_dir, tmp_path, max_steps=6, doc_mask=True, checkpoint_interval=6))
    assert len(losses) == 6 and all(loss == loss for loss in losses) and losses[-1] < losses[0]


def test_train_help_lists_every_flag(capsys):
    from gptkern.train import cli as train_cli

    assert train_cli.main(["-h"]) == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            assert f"--{f.name.replace('_', '-')} " in text
    assert "--n-kv-head" in text and "--max-steps INT" in text and "(default 1000)" in text


def test_time_budget_stops_with_a_checkpoint_and_a_note_on_its_own_line(data_dir, tmp_path, capsys):
    """max_seconds ends training after the step that crosses it: a checkpoint of that step, and the
    note printed after the progress bar has closed (it was glued to the bar's last redraw)."""
    losses = train(config(data_dir, tmp_path, max_steps=1000, max_seconds=1e-9, progress=True))
    assert len(losses) == 1
    assert [p.name for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_00000001"]
    err = capsys.readouterr().err
    assert "\ngptkern train: stopped at step 1: max_seconds" in err


def test_cuda_generator_state_is_this_ranks_device(monkeypatch):
    """A checkpoint keeps the current device's CUDA generator (each rank restores it on its own
    device); one from an 8-GPU process loads on fewer GPUs (only the devices present are set)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls.append((state.tolist(), device)))
    state = ckpt.rng_state()
    assert state["cuda_device"].tolist() == [7]
    ckpt.set_rng_state(state)
    assert calls == [([7], "cuda")]  # the current device
    calls.clear()
    old = {**state, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    del old["cuda_device"]
    ckpt.set_rng_state(old)
    assert calls == [([0], 0)]


def test_resume_takes_this_runs_weight_decay_and_betas(data_dir, tmp_path, capsys):
    """The optimizer state brings the saved group settings back: the run's own weight decay, betas,
    eps and fused / foreach choice are set again (the learning rate follows the schedule), and
    changing them changes the steps; a resume already at max_steps says so."""
    train(config(data_dir, tmp_path / "a", max_steps=4))
    saved = ckpt.latest_checkpoint(str(tmp_path / "a")) / "optimizer.pt"
    state = torch.load(saved, weights_only=True)
    for group in state["param_groups"]:  # as if written by another machine's optimizer (fused, eps)
        group.update(eps=1e-3, foreach=not group["foreach"])
    torch.save(state, saved)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same = Trainer(config(data_dir, tmp_path / "a", max_steps=6, resume=True))
    other = Trainer(config(data_dir, tmp_path / "b", max_steps=6, resume=True, weight_decay=0.0, beta1=0.5,
                           beta2=0.6))
    assert [g["weight_decay"] for g in other.optimizer.param_groups] == [0.0, 0.0]
    assert all(g["betas"] == (0.5, 0.6) for g in other.optimizer.param_groups)
    assert same.optimizer.param_groups[0]["weight_decay"] == TrainConfig().weight_decay
    assert same.optimizer.param_groups[1]["weight_decay"] == 0.0
    fresh = Trainer(config(data_dir, tmp_path / "c", max_steps=6)).optimizer.param_groups
    for group, own in zip(same.optimizer.param_groups, fresh):
        assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in own.items() if k != "params"}
    same.fit()
    other.fit()
    a, b = (load_pretrained(ckpt.latest_checkpoint(str(tmp_path / d)))[0].state_dict() for d in "ab")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    train(config(data_dir, tmp_path / "a", max_steps=6, resume=True))
    assert "nothing to train" in capsys.readouterr().err


def test_rng_state_round_trip_restores_python_numpy_and_torch():
    import random

    import numpy as np

    buffer = io.BytesIO()
    torch.save(ckpt.rng_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    first = (random.random(), float(np.random.rand()), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first
