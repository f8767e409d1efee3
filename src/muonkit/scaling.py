"""Update scale: how much the orthogonalized update of a rows x cols matrix is multiplied by.

| name          | scale(rows, cols)              |
|---------------|--------------------------------|
| naive         | 1                              |
| keller_jordan | sqrt(max(1, rows / cols))      |
| mup           | sqrt(rows / cols)              |
| moonlight     | rms * sqrt(max(rows, cols))    |

rows is fan_out and cols fan_in of the matrix view. For a full-rank polar factor O,
RMS(O) = 1 / sqrt(max(rows, cols)), so "moonlight" gives the update an RMS of `rms` (0.2
matches AdamW's typical update RMS) and is symmetric in rows and cols.

References:
    Keller Jordan, "Muon" (2024): keller_jordan.
    Bernstein et al., spectral condition / muP: mup.
    Liu et al., "Muon is Scalable for LLM Training" (Moonlight), arXiv:2502.16982: moonlight.
    Su Jianlin, "A Guide to the Muon Optimizer" and the Keras pull request (docs/references.md
    section 10, peer 002): the four versions side by side.
"""

from __future__ import annotations

import math
from typing import Literal

Scale = Literal["naive", "keller_jordan", "mup", "moonlight"]
SCALES: tuple[str, ...] = ("naive", "keller_jordan", "mup", "moonlight")


def update_scale(scale: Scale, rows: int, cols: int, rms: float = 0.2) -> float:
    """The multiplier of the orthogonalized update for a rows x cols matrix."""
    if scale == "naive":
        return 1.0
    if scale == "keller_jordan":
        return math.sqrt(max(1.0, rows / cols))
    if scale == "mup":
        return math.sqrt(rows / cols)
    if scale == "moonlight":
        return rms * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
