"""Shared test setup: import path, thread count, seeds and the hypothesis profile."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings

_TESTS = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_TESTS), "src")
# The checkout has a src layout and may not be installed; tests import muonkit from the checkout
# and the oracles (reference.py, seed_net.py) from this folder.
for path in (_SRC, _TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

# The machine has 2 cores shared with other jobs; one thread also keeps every run's round-off
# identical, which the bit-for-bit tests rely on.
torch.set_num_threads(1)

settings.register_profile("muonkit", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "muonkit"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
