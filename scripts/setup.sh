#!/usr/bin/env bash
# Create .venv and install clstm4d with everything the demo and the tests need.
# - An existing torch (system site-packages, or already in .venv) is kept.
# - Without torch: a local/offline wheel if pip's config offers one, else the CUDA build
#   when an NVIDIA driver is present, else the CPU build (never a multi-GB CUDA build on a
#   CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif local=$(mktemp -d) && "${pip[@]}" download --no-deps --no-index -d "$local" \
      "torch==$TORCH_VERSION" >/dev/null 2>&1; then
  # pip's configuration offers a local wheel (find-links): take that one, deps from the index.
  "${pip[@]}" install "$local"/torch-*.whl
  echo "setup: installed torch from a local wheel: $(basename "$local"/torch-*.whl)"
elif command -v nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" install "torch==$TORCH_VERSION"
else
  "${pip[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

"${pip[@]}" install -e ".[dev]"
