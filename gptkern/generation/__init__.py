"""Generation: KV caches, next-token sampling and ``generate``."""
from gptkern.generation.cuda_graph import release_decode_graphs
from gptkern.generation.generate import generate
from gptkern.generation.kv_cache import PagedKVCache, StaticKVCache
from gptkern.generation.seq2seq import generate_seq2seq

__all__ = ["generate", "generate_seq2seq", "release_decode_graphs", "StaticKVCache", "PagedKVCache"]
