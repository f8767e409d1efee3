"""The suite's float32 pin of the default Newton-Schulz dtype (issue 22 item 1).

ns_dtype=None means `muonkit.orthogonalize.default_ns_dtype(device)`: bfloat16 on CPUs with native
bfloat16 products (AVX512_BF16, AMX), float32 on the others. Many tests compare a default step bit
for bit or at float32 tolerances with a float32 reference, so the suite runs as on a CPU without
native bfloat16: `pin_float32_newton_schulz()` is called once per process, by tests/conftest.py (the
pytest processes) and by tests/distributed_worker.py (every spawned gloo rank; mesh_worker imports
it). A test of the machine's real default asks for the fixture `machine_ns_dtype` (conftest.py),
which restores the flag read from the CPU. CUDA keeps its bfloat16 default either way. Subprocesses
that run examples/ (torchrun) are not pinned: they compare their runs only with each other.
"""

from __future__ import annotations

import importlib

kernels = importlib.import_module("muonkit.orthogonalize")  # the module, not the function
MACHINE_FAST_BFLOAT16 = kernels.cpu_has_fast_bfloat16()


def pin_float32_newton_schulz() -> None:
    """Make ns_dtype=None float32 on this process's CPU (the AVX2 branch of default_ns_dtype)."""
    kernels.CPU_FAST_BFLOAT16 = False
