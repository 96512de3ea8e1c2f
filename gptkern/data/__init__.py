"""Data: tokenizers (byte-level, locally trained BPE, GPT-2's), the embedded corpus, token shards
(``gptkern prepare``) and their loader."""
from gptkern.data.corpus import stdlib_corpus
from gptkern.data.loader import TokenLoader, document_bounds
from gptkern.data.prepare import read_meta
from gptkern.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, make_tokenizer, train_bpe

__all__ = ["ByteTokenizer", "HFTokenizer", "TokenLoader", "document_bounds", "load_tokenizer", "make_tokenizer",
           "read_meta", "stdlib_corpus", "train_bpe"]
