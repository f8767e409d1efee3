#!/usr/bin/env bash
# The test suite (CPU), with the extras its tests exercise: the bench extra (numpy, matplotlib, tqdm),
# pytest, pytest-xdist and hypothesis, tensorboard, and
# transformers, accelerate and lightning (tests/test_integrations.py). Extra arguments pass through to pytest.
# Two pytest-xdist workers, one per core (each test runs torch on one thread, tests/conftest.py);
# `--dist loadfile` keeps each file on one worker, so a module-scoped fixture is computed once (the
# spawned gloo ranks, shared by six files, once per run: tests/conftest.py); `--no-loadscope-reorder`
# hands the files out in collection order, the longest first (tests/conftest.py LONGEST_FIRST), rather
# than by number of tests. `-n 0`: one process.
extras="bench,test,tensorboard,integrations"
needed="numpy matplotlib tqdm pytest xdist hypothesis build tensorboard transformers accelerate lightning peft"
source "$(dirname "$0")/setup.sh"
cd "$root"
# Cache compiled modules and pytest's rewritten test modules (__pycache__, git-ignored): a warm run
# then skips ~3 CPU-s of assertion rewriting per worker and the compiling in every spawned rank.
unset PYTHONDONTWRITEBYTECODE
exec python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
