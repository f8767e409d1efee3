# Sourced by the other scripts: a virtual environment in .venv with CPU torch and muonkit.
# torch==2.13.0 is installed before the package so pip never resolves a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MUONKIT_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, muonkit, pytest, hypothesis, tensorboard" >/dev/null 2>&1; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
    "$venv/bin/pip" install --quiet --disable-pip-version-check -e "$root[test,tensorboard]"
fi
export PATH="$venv/bin:$PATH"
