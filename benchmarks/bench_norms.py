"""layer_norm and rms_norm benchmark: gptkern backends vs torch eager and torch.compile.

Needs gptkern importable (installed, or ``PYTHONPATH=.`` from the repository root):
``python benchmarks/bench_norms.py [gptkern bench options]``.
"""
import sys

from gptkern.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="bench_norms.py", default_ops=("layer_norm", "rms_norm")))
