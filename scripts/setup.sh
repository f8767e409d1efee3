# Sourced by the other scripts: a virtual environment in .venv with CPU torch and muonkit.
# torch==2.13.0 is installed before the package so pip never resolves a multi-GB CUDA build.
# The sourcing script sets `extras` (e.g. "test,tensorboard,integrations") and `needed` (the modules
# those extras provide); muonkit itself imports none of transformers, lightning or tensorboard.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MUONKIT_VENV:-$root/.venv}"
extras="${extras:-}"
needed="torch muonkit ${needed:-}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# find_spec looks the packages up without importing them (importing transformers takes seconds).
if ! "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
        $needed >/dev/null 2>&1; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
    "$venv/bin/pip" install --quiet --disable-pip-version-check -e "$root${extras:+[$extras]}"
fi
export PATH="$venv/bin:$PATH"
