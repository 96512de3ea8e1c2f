"""Training-step benchmark: gptkern vs the torch backend, eager and compiled (see ``gptkern.bench_train``).

``python benchmarks/bench_train.py [--quick] [--threads N] [--out-json PATH]``.
"""
import sys

from gptkern.bench_train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
