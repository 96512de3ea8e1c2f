#!/usr/bin/env bash
# The GPU machine's software, checked on a machine without a GPU: a venv with another Python and
# a CUDA build of torch (and the Triton it pins) from PyPI, the CUDA extension built there as
# benchmarks/gpu_check.sh builds it (then loaded: its CUDA kernels must be registered), and the
# test suite run against those versions (GPU tests skip). Not part of `make test`: the CUDA torch
# is a download of about 5 GB.
#
# Usage: bash tools/gpu_versions_check.sh VENV [pytest args...]
#   PYTHON=python3.12 TORCH=2.11.0 (defaults: the GPU machine's); CUDA_HOME=/usr/local/cuda
# Works on a clone of the repository in VENV/repo (the committed HEAD: commit first), so the
# checkout's own build is left alone.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 VENV [pytest args...]" >&2; exit 2; }
VENV=$1
shift
PYTHON=${PYTHON:-python3.12}
TORCH=${TORCH:-2.11.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
want=$("$PYTHON" -c 'import sys; print(sys.version_info[:2])')
have=$("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])')
[ "$want" = "$have" ] || { echo "$VENV has Python $have, not $PYTHON's $want: use another VENV" >&2; exit 2; }
# numpy < 2.4: Triton 3.6's interpreter breaks with numpy 2.4; the rest as requirements.txt pins it
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH" "numpy<2.4" \
  $(grep -vE '^(#|triton|numpy|torch)' "$REPO/requirements.txt" | tr '\n' ' ') \
  $(grep -vE '^(#|-r)' "$REPO/requirements-dev.txt" | tr '\n' ' ')
"$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "CUDA", torch.version.cuda,
                       "triton", triton.__version__)'

rm -rf "$VENV/repo"
git clone -q "$REPO" "$VENV/repo"
cd "$VENV/repo"
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH" PYTHONPATH="$VENV/repo"
GPTKERN_BUILD_CUDA=1 GPTKERN_CUDA_ARCHS=9.0 MAX_JOBS="$(nproc)" python3 setup.py -q build_ext --inplace
python3 - <<'PY'
import torch
import gptkern.ops  # loads gptkern._C and the Python-side registrations

for op in ("attention_fwd", "attention_bwd", "decode_attention", "softmax_fwd", "norm_fwd"):
    name = getattr(torch.ops.gptkern, op).default.name()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{op}: no CUDA kernel registered"
print("CUDA kernels registered")
PY
python3 -m gptkern info
python3 -m pytest -q -p no:cacheprovider "$@" tests
