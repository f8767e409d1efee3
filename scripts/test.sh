#!/usr/bin/env bash
# The test suite (CPU), with the extras its tests exercise: the bench extra (numpy, matplotlib, tqdm),
# pytest and hypothesis, tensorboard, and
# transformers, accelerate and lightning (tests/test_integrations.py). Extra arguments pass through to pytest.
extras="bench,test,tensorboard,integrations"
needed="numpy matplotlib tqdm pytest hypothesis build tensorboard transformers accelerate lightning peft"
source "$(dirname "$0")/setup.sh"
cd "$root"
exec python -m pytest -q "$@"
