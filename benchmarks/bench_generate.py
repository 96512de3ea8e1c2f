"""Generation benchmark: gptkern generate vs transformers, the KV cache's gain, the decode kernel
(see ``gptkern.bench_generate``).

``python benchmarks/bench_generate.py [--quick] [--threads N] [--out-json PATH]``.
"""
import sys

from gptkern.bench_generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
