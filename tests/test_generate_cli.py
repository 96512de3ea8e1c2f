"""``gptkern generate`` from a gptkern checkpoint and from a Hugging Face GPT-2 directory."""
import subprocess
import sys

import pytest
import torch

from gptkern.data import ByteTokenizer, train_bpe
from gptkern.generation import generate
from gptkern.models import GPT, GPTConfig
from gptkern.models.io import save_pretrained


def run_cli(*args):
    result = subprocess.run([sys.executable, "-m", "gptkern", "generate", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_generate_from_checkpoint_greedy_matches_the_api(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=2, vocab_size=257, init_std=0.3)).eval()
    tokenizer = ByteTokenizer()
    save_pretrained(model, tmp_path, tokenizer)
    result = run_cli("--checkpoint", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "12",
                     "--temperature", "0", "--bench")
    ids = generate(model, torch.tensor([tokenizer.encode("Hi")]), 12, eos_token_id=tokenizer.eos_id)[0, 2:].tolist()
    ids = ids[:ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
    assert result.stdout == "Hi" + tokenizer.decode(ids) + "\n"
    assert "tokens/s" in result.stderr and "weights" in result.stderr


def test_generate_from_hf_directory_with_seed(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokenizer = train_bpe(["hello world, hello there. " * 30], 300)
    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=2, vocab_size=tokenizer.vocab_size)).eval()
    model.to_hf(tmp_path)
    tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
    args = ("--hf-dir", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "8", "--seed", "3")
    first, second = run_cli(*args), run_cli(*args)
    assert first.stdout == second.stdout and first.stdout.startswith("hello")


def test_top_k_0_turns_top_k_off_and_ids_past_the_tokenizer_are_skipped(tmp_path, monkeypatch, capsys):
    """In-process: the sampling arguments reach generate, and a model whose vocabulary is padded
    past the tokenizer's may sample ids the tokenizer cannot decode: they are not printed."""
    from gptkern.generation import cli

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, vocab_size=300)).eval()  # 257 bytes + padding
    save_pretrained(model, tmp_path, ByteTokenizer())
    seen = {}

    def fake_generate(model, prompt, max_new_tokens, **kwargs):
        seen.update(kwargs)
        return iter([torch.tensor([ord("A")]), torch.tensor([299]), torch.tensor([257]), torch.tensor([ord("B")])])

    monkeypatch.setattr(cli, "generate", fake_generate)
    assert cli.main(["--checkpoint", str(tmp_path), "--prompt", "x", "--top-k", "0", "--max-new-tokens", "3"]) == 0
    assert seen["top_k"] is None and capsys.readouterr().out == "xAB\n"


def test_bytes_that_are_not_utf8_print_replaced_and_reach_the_model_as_bytes(tmp_path, monkeypatch, capsys):
    """A byte-level model may emit the bytes of a lone surrogate (ED A0 80): the output shows a
    replacement and goes on instead of failing midway. A prompt byte that is not UTF-8 (argv holds
    it as an escaped surrogate) reaches the model as that one byte."""
    from gptkern.generation import cli

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, vocab_size=257)).eval()
    save_pretrained(model, tmp_path, ByteTokenizer())
    seen = {}

    def fake_generate(model, prompt, max_new_tokens, **kwargs):
        seen["prompt"] = prompt[0].tolist()
        return iter(torch.tensor([t]) for t in (0x68, 0xED, 0xA0, 0x80, 0x69))

    monkeypatch.setattr(cli, "generate", fake_generate)
    prompt = b"a\xff".decode("utf-8", errors="surrogateescape")  # as Python reads such an argument
    assert cli.main(["--checkpoint", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert seen["prompt"] == [0x61, 0xFF]
    assert out.startswith("a") and out.endswith("i\n") and "h" in out and "?" in out


def test_streamed_text_is_the_decoded_text(tmp_path, monkeypatch, capsys):
    """A surrogate's bytes, then an invalid byte: what is printed equals the prompt plus the decoded
    new tokens (a decode that switched modes midway used to shift the printed slices)."""
    from gptkern.generation import cli

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, vocab_size=257)).eval()
    save_pretrained(model, tmp_path, ByteTokenizer())
    new = (0x41, 0xED, 0xA0, 0x80, 0x42, 0xFF, 0x43)
    monkeypatch.setattr(cli, "generate", lambda *args, **kwargs: iter(torch.tensor([t]) for t in new))
    shown = []
    monkeypatch.setattr(cli, "_show", shown.append)  # the text itself, before stdout's encoding
    assert cli.main(["--checkpoint", str(tmp_path), "--prompt", "X", "--max-new-tokens", "7"]) == 0
    assert "".join(shown) == "X" + ByteTokenizer().decode(list(new)) + "\n"


def test_a_prompt_outside_the_models_vocabulary(tmp_path, capsys):
    """A tokenizer larger than the model's vocabulary (the wrong one in a directory) is one error line."""
    from gptkern import cli

    for vocab_size in (100, ord("z")):  # "z" is id 122: the largest id a model of 122 ids lacks
        model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, vocab_size=vocab_size)).eval()
        save_pretrained(model, tmp_path, ByteTokenizer())  # ids up to 256
        assert cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "z", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "token id 122" in err and f"vocab_size {vocab_size})" in err and "Traceback" not in err


def test_the_bounds_of_the_sampling_flags_are_taken(tmp_path, monkeypatch, capsys):
    """--top-p 1, --max-new-tokens 0 and a seed of 2**64 - 1 are valid and reach generate; with no new
    tokens the prompt is printed and --bench says nothing was timed."""
    from gptkern.generation import cli

    model = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, vocab_size=257)).eval()
    save_pretrained(model, tmp_path, ByteTokenizer())
    seen = {}

    def fake_generate(model, prompt, max_new_tokens, **kwargs):
        seen.update(kwargs, max_new_tokens=max_new_tokens)
        return iter([])

    monkeypatch.setattr(cli, "generate", fake_generate)
    assert cli.main(["--checkpoint", str(tmp_path), "--prompt", "x", "--top-p", "1", "--seed", str(2**64 - 1),
                     "--max-new-tokens", "0", "--bench"]) == 0
    out = capsys.readouterr()
    assert seen["top_p"] == 1.0 and seen["seed"] == 2**64 - 1 and seen["max_new_tokens"] == 0
    assert out.out == "x\n" and "no new tokens (nothing timed)" in out.err
