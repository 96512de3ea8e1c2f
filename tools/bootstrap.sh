#!/usr/bin/env bash
# Creates $VENV (default .venv) and installs the pinned dependencies and gptkern.
# A machine whose python3 already has a CUDA build of torch keeps it: the venv sees
# the system packages and nothing is installed over torch or triton.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
EXTRA_TRITONS=${EXTRA_TRITONS-3.6.0}

system_cuda_torch() {
  "$PYTHON" - <<'PY' 2>/dev/null
import sys, torch
sys.exit(0 if torch.version.cuda else 1)
PY
}

if system_cuda_torch; then
  echo "bootstrap: using the CUDA torch of $PYTHON (nothing installed over it)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  # Install only what is missing, runtime and test packages, never triton over the system's
  # (the GPU machine may have no network).
  missing=$("$VENV/bin/python" - <<'PY'
import importlib.util
modules = {"PyYAML": "yaml", "pytest-xdist": "xdist"}  # distributions whose module is named otherwise
lines = [l.strip() for f in ("requirements.txt", "requirements-dev.txt") for l in open(f)]
names = [l.split("==")[0] for l in lines if l and not l.startswith("#")]
print(" ".join(n for n in names if n != "triton" and importlib.util.find_spec(modules.get(n, n)) is None))
PY
)
  if [ -n "$missing" ] && ! "${PIP[@]}" $missing; then
    echo "bootstrap: could not install $missing (no network?); what needs it will fail or be skipped" >&2
  fi
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # The CPU wheel: from a local wheel directory when there is one, else PyTorch's CPU index.
    if compgen -G "${PIP_FIND_LINKS:-/opt/wheels}/torch-${TORCH_VERSION}+cpu-*.whl" >/dev/null; then
      "${PIP[@]}" --find-links "${PIP_FIND_LINKS:-/opt/wheels}" "torch==${TORCH_VERSION}+cpu"
    else
      "${PIP[@]}" --index-url "$TORCH_CPU_INDEX" "torch==${TORCH_VERSION}+cpu"
    fi
  fi
  "${PIP[@]}" -r requirements.txt -r requirements-dev.txt
  # Other Triton versions beside the pinned one, for tests/test_hopper_compile.py only (3.6 is
  # torch 2.11's, whose code generation spills where 3.7's does not). Never imported otherwise.
  for version in $EXTRA_TRITONS; do
    dir="$VENV/triton-$version"
    if [ ! -f "$dir/.installed" ]; then  # (a marker: an interrupted install is redone whole)
      rm -rf "$dir"
      "${PIP[@]}" --no-deps --target "$dir" "triton==$version"
      touch "$dir/.installed"
    fi
  done
fi
# --no-deps: the dependencies are in place; --no-build-isolation: the build sees this torch.
"${PIP[@]}" --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import gptkern, torch; print('bootstrap: gptkern', gptkern.__version__, 'torch', torch.__version__, 'backends', gptkern.available_backends())"
