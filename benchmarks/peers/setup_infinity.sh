#!/usr/bin/env bash
# Make the venv of the infinity peer for benchmarks/serve.py: .venv-peers/infinity (not committed).
#
#   bash benchmarks/peers/setup_infinity.sh [VENV_DIR]
#
# infinity-emb 0.0.78 pins numpy<2 and sentence-transformers<4 (so transformers<5), which the
# project's own venv cannot hold: it gets a venv of its own, from PyPI, every version pinned in
# requirements-infinity.txt (torch included, in the same pip call, so no resolver swaps the torch
# build). Python 3.11 by default (PYTHON=... to change). Idempotent: an existing venv is reused.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/.venv-peers/infinity}"
python="${PYTHON:-python3.11}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet -r "$here/requirements-infinity.txt"
"$venv/bin/infinity_emb" --help >/dev/null
echo "infinity ready: $venv/bin/infinity_emb ($("$venv/bin/python" -c \
    'import importlib.metadata as m; print("infinity-emb", m.version("infinity-emb"), "torch", m.version("torch"))'))"
