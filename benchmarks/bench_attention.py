"""Attention benchmark: gptkern flash attention (dense and varlen) vs torch SDPA backends and
torch.compile (see ``gptkern.bench_attention``).

Needs gptkern importable (installed, or ``PYTHONPATH=.`` from the repository root):
``python benchmarks/bench_attention.py [--quick] [gptkern bench-attention options]``.
"""
import sys

from gptkern.bench_attention import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
