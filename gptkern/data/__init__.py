"""Data: tokenizers (byte-level, locally trained BPE, GPT-2's)."""
from gptkern.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, make_tokenizer, train_bpe

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "make_tokenizer", "train_bpe"]
