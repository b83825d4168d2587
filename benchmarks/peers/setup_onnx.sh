#!/usr/bin/env bash
# A venv for `mrl serve --backend onnx` in benchmarks/serve.py without touching the project venv:
# .venv-peers/onnx (not committed) sees the project venv's packages through a .pth file and adds
# the `onnx` extra's packages, pinned, on top.
#
#   bash benchmarks/peers/setup_onnx.sh [PROJECT_VENV] [VENV_DIR]
#
# PROJECT_VENV defaults to $MRL_VENV, else .venv in the repository root. Once the project venv
# has the extra (`pip install -e '.[onnx]'`), this venv is not needed: serve.py then runs
# mrl-onnx with its own Python.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
project="${1:-${MRL_VENV:-$root/.venv}}"
venv="${2:-$root/.venv-peers/onnx}"
site="$("$project/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -x "$venv/bin/python" ]; then
    "$project/bin/python" -m venv "$venv"
fi
own="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$site" > "$own/project-venv.pth"
"$venv/bin/python" -m pip install --quiet "onnxruntime==1.32.0" "onnx==1.23.2"
"$venv/bin/python" -c 'import onnx, onnxruntime, torch; print("onnx venv ready:", "onnxruntime", onnxruntime.__version__, "onnx", onnx.__version__, "torch", torch.__version__)'
