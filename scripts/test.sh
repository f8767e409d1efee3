#!/usr/bin/env bash
# The test suite (CPU). Extra arguments pass through to pytest.
source "$(dirname "$0")/setup.sh"
cd "$root"
exec python -m pytest -q "$@"
