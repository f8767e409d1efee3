"""Shared test setup: import path, thread count, seeds and the hypothesis profile."""

from __future__ import annotations

import gc
import os
import sys
from collections import Counter

# Set before torch loads OpenMP (libgomp reads it once, at load), in this process and so in every
# process it starts (pytest-xdist workers, spawned ranks, subprocesses): an idle OpenMP thread sleeps
# instead of spinning. The suite runs 1 thread per test beside a second worker on 2 cores, and its
# few multi-thread cases (2-thread contracts, the gpu_check run) spun their waiting threads against
# the other worker: test_speed_contracts.py's 2-thread cases took 38 CPU-s spinning, 13 sleeping.
# Only waiting changes, not how work is split, so no result changes; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

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

# The default ns_dtype follows the machine (bfloat16 here when the CPU has AVX512_BF16 or AMX);
# the suite's references are float32 ones, so every test process runs as on an AVX2 CPU
# (tests/ns_dtype_pin.py says why and how); `machine_ns_dtype` below undoes it for one test.
from ns_dtype_pin import MACHINE_FAST_BFLOAT16, kernels, pin_float32_newton_schulz  # noqa: E402

pin_float32_newton_schulz()

settings.register_profile("muonkit", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "muonkit"))


# The files whose tests take longest (CPU seconds of a whole run, 2026-12-07 06:07 UTC, load 4-9: the
# session's gloo spawn, run by the first file that needs it, and test_mesh.py's torchrun runs ~140;
# test_cli.py ~45; the gpu_check quick run ~28; test_compile.py ~17; test_speed_contracts.py and
# test_capturable.py ~15; ...). scripts/test.sh hands files to its two pytest-xdist workers in
# collection order (--dist loadfile --no-loadscope-reorder): these first, then the others by number of
# tests, most first (xdist's default order), so that the last files handed out are short and the two
# workers end together. Only the order changes.
LONGEST_FIRST = ("test_mesh.py", "test_cli.py", "test_gpu_check.py", "test_compile.py", "test_speed_contracts.py",
                 "test_capturable.py", "test_cost_model.py", "test_packaging.py", "test_readme.py")


def pytest_collection_modifyitems(items):
    place = {name: i for i, name in enumerate(LONGEST_FIRST)}
    count = Counter(item.path.name for item in items)
    # A stable sort by file: the tests of each file keep their order.
    items.sort(key=lambda item: (place.get(item.path.name, len(place)), -count[item.path.name], item.path.name))


def pytest_collection_finish(session):
    # What collection built (torch, transformers, the test modules, 2500 items) lives to the end of
    # the run: moved out of the collector's reach, a gc.collect() in a test (tasks/training.py calls
    # one per training run, ~0.2 CPU-s each with it in reach) scans only what the tests made since.
    gc.freeze()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def machine_ns_dtype(monkeypatch):
    """This machine's real default ns_dtype for one test (the suite pins float32, ns_dtype_pin.py):
    CPU_FAST_BFLOAT16 as read from the CPU. Yields default_ns_dtype("cpu")."""
    monkeypatch.setattr(kernels, "CPU_FAST_BFLOAT16", MACHINE_FAST_BFLOAT16)
    yield kernels.default_ns_dtype("cpu")


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank in this process (the two-phase distributed path)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


EXAMPLE = os.path.join(os.path.dirname(_TESTS), "examples", "train_distributed.py")


@pytest.fixture
def train_distributed(tmp_path, monkeypatch):
    """run(processes, *args) -> rank 0's stdout of examples/train_distributed.py (with `--log-every 1`).
    Two or more processes: `torchrun --standalone`, as the example's docstring runs it. One process:
    the example's main() in this process, with the environment torchrun gives a single rank (a
    1-rank gloo group, the TCP store on a free port): the same code without the start of a launcher
    and of a rank (~7 s of CPU each). Fails on a non-zero exit, with the end of stderr."""
    import contextlib
    import importlib.util
    import io
    import subprocess

    def run(processes: int, *args: str) -> str:
        args = (*args, "--log-every", "1")
        if processes > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                       EXAMPLE, *args]
            # PYTHONFAULTHANDLER: a rank that aborts prints where each of its threads was.
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (f"rank 0 printed:\n{done.stdout[-1500:]}\nstderr:\n{done.stderr[:2000]}"
                                          f"\n...\n{done.stderr[-1500:]}")
            return done.stdout
        spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        with monkeypatch.context() as env:
            for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                                    MASTER_ADDR="127.0.0.1", MASTER_PORT="0").items():
                env.setenv(name, value)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert example.main(list(args)) == 0
        return out.getvalue()

    return run


# Ranks still running after this are killed (TimeoutError): the 4-rank spawn is ~1 min on 2 quiet cores.
SPAWN_TIMEOUT = 900.0


def _spawn_jobs(session: pytest.Session) -> dict[int, list[str]]:
    """{world: jobs}: distributed_worker.SPAWNED_JOBS, then the jobs of each collected test module
    that declares `SPAWN_JOBS = {world: [job, ...]}` (test_mesh.py, test_cost_model.py, test_dion2.py),
    in collection order; a module not collected (a run of other files) adds nothing."""
    import distributed_worker as worker

    jobs = {world: list(names) for world, names in worker.SPAWNED_JOBS.items()}
    modules = dict.fromkeys(item.module for item in session.items if getattr(item, "module", None) is not None)
    for module in modules:
        for world, names in getattr(module, "SPAWN_JOBS", {}).items():
            for name in names:
                if name not in jobs[world]:
                    jobs[world].append(name)
    return jobs


@pytest.fixture(scope="session")
def spawned(request, tmp_path_factory):
    """The jobs of every test module (`_spawn_jobs`), run by one spawn of 2 and one of 4 gloo ranks
    for the whole run: each rank pays its start (a Python process, torch, gloo: ~4 s of CPU) once
    rather than once per module, and a job's failure fails only the tests that read it.
    {2: [rank 0's {job: result or error}, rank 1's], 4: [...], "tmp": the shared folder}. The
    1-process checkpoints the resume jobs read are saved here first; the 2-rank ones by the 2-rank
    spawn, which runs before the 4-rank one.

    Under pytest-xdist (scripts/test.sh) the workers share one spawn: the first to need it runs it
    while holding a lock in the run's common temporary folder; the others wait, then read its
    result files (pytest-xdist's documented recipe for a session fixture computed once)."""
    import fcntl

    import distributed_worker as worker
    import mesh_worker
    from muonkit.distributed import save_checkpoint

    base = tmp_path_factory.getbasetemp()
    common = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    tmp = common / "spawned"
    with open(common / "spawned.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (tmp / "done").exists():
            tmp.mkdir(exist_ok=True)
            for variant in ("muon", "muon8bit", "normuon8bit"):
                model = worker.make_model()
                opt = worker.make_optimizer(model, variant=variant)
                worker.train_fixed(model, opt, range(worker.STEPS))
                save_checkpoint(tmp / worker.checkpoint_name(1, variant), model, opt)
            for variant, name in (("muon", "mesh_one"), ("muon8bit", "mesh_one__muon8bit")):
                model = mesh_worker.make_model()  # test_mesh.py's resume_fsdp_tp_from_one[__muon8bit]
                opt = mesh_worker.make_optimizer(model, variant=variant)
                mesh_worker.train_fixed(model, opt, range(mesh_worker.STEPS))
                save_checkpoint(tmp / name, model, opt)
            for world, jobs in _spawn_jobs(request.session).items():
                worker.spawn(world, jobs, tmp, SPAWN_TIMEOUT)
            (tmp / "done").touch()
    results = {world: worker.load_results(world, tmp) for world in (2, 4)}
    results["tmp"] = tmp
    return results
