#!/usr/bin/env bash
# Create .venv and install clstm4d with everything the demo and the tests need.
# - An existing torch 2.8 or newer (system site-packages, or already in .venv) is kept; an
#   older one is left in place and a newer one installed into .venv (training needs 2.8).
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

# Training needs MONAI 1.6.1, which needs torch 2.8 (README, "Supported torch"). An older
# torch is left where it is and a new one goes into .venv, which shadows it; otherwise pip
# would replace it while resolving MONAI, with a multi-GB CUDA build even on a CPU machine.
have=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
recent='import sys, torch; v = torch.__version__.split("+")[0].split(".")
sys.exit(0 if (int(v[0]), int(v[1])) >= (2, 8) else 1)'
if [ -n "$have" ] && "$VENV/bin/python" -c "$recent"; then
  echo "setup: keeping torch $have"
else
  if [ -n "$have" ]; then
    echo "setup: torch $have is older than 2.8, which training needs: installing torch" \
         "$TORCH_VERSION into $VENV (torch $have stays where it is)"
  fi
  if local=$(mktemp -d) && "${pip[@]}" download --no-deps --no-index -d "$local" \
        "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    # pip's configuration offers a local wheel (find-links): take that one, deps from the index.
    "${pip[@]}" install "$local"/torch-*.whl
    echo "setup: installed torch from a local wheel: $(basename "$local"/torch-*.whl)"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "torch==$TORCH_VERSION"
  else
    "${pip[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

"${pip[@]}" install -e ".[dev]"
