"""What the sdist and the wheel ship, built from this source tree with the real build backend.

The sdist must run its own tests: every file of tests/ (helpers included) and what they read
(README.md, examples/, benchmarks/). The wheel carries py.typed and the license; the metadata
names the license as an SPDX expression (PEP 639).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIRS = ("tests", "examples", "benchmarks", "docs", "scripts", "src")


def source_files(root: Path) -> set[str]:
    """Files of the source tree an sdist must hold (caches and build output aside)."""
    skip = {"__pycache__", ".hypothesis", ".pytest_cache"}
    files = {"README.md", "LICENSE", "pyproject.toml", "MANIFEST.in"}
    for top in SHIPPED_DIRS:
        for path in (root / top).rglob("*"):
            rel = path.relative_to(root)
            if path.is_file() and not skip & set(rel.parts) and not rel.parts[-1].endswith(".pyc") \
                    and not any(p.endswith(".egg-info") for p in rel.parts):
                files.add(rel.as_posix())
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, set[str]]:
    """An sdist and a wheel built (without build isolation: offline, seconds) from a copy."""
    tmp = tmp_path_factory.mktemp("dist")
    copy = tmp / "src-copy"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                                    "muonkit-runs")
    shutil.copytree(ROOT, copy, ignore=ignore)
    expected = source_files(copy)
    out = tmp / "out"
    for kind in ("--sdist", "--wheel"):
        result = subprocess.run([sys.executable, "-m", "build", kind, "--no-isolation", "--outdir", str(out), str(copy)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return next(out.glob("*.tar.gz")), next(out.glob("*.whl")), expected


@pytest.mark.slow
def test_sdist_holds_the_tests_and_what_they_read(built):
    sdist, _, expected = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    for helper in ("tests/conftest.py", "tests/reference.py", "tests/seed_net.py", "tests/distributed_worker.py"):
        assert helper in names, helper
    assert not expected - names, sorted(expected - names)
    assert "License-Expression: MIT" in pkg_info and "License-File: LICENSE" in pkg_info


@pytest.mark.slow
def test_wheel_ships_py_typed_and_the_license(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "muonkit/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in metadata
    assert not any(n.startswith("tests/") for n in names)


# Run with numpy, matplotlib and tqdm made unimportable (a None entry in sys.modules raises ImportError),
# as in an environment that installed muonkit without the `bench` extra.
WITHOUT_BENCH = "import sys\nfor m in ('numpy', 'matplotlib', 'tqdm'):\n    sys.modules[m] = None\n"


def run_without_bench(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_BENCH + code], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_library_imports_and_steps_with_torch_alone():
    code = (
        "import torch, muonkit\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
        "for variant in ('muon', 'normuon', 'adamuon'):\n"
        "    opt = muonkit.Muon(muonkit.param_groups(model), variant=variant, orthogonalizer='svd')\n"
        "    model(torch.randn(3, 8)).sum().backward(); opt.step(); opt.zero_grad()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'matplotlib', 'tqdm')\n"
        "             and sys.modules[m] is not None))\n"
    )
    result = run_without_bench(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_the_command_line_without_the_bench_extra_says_what_to_install():
    result = run_without_bench("from muonkit.cli import main\nraise SystemExit(main(['bench']))")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("muonkit")]
    assert len(lines) == 1 and "pip install 'muonkit[bench]'" in lines[0], result.stderr


@pytest.mark.parametrize("args, extras", [([], "bench"), (["hf-lm", "--hf-config", "qwen3-moe"], "bench,hf")])
def test_bench_script_installs_the_hf_extra_for_hf_lm(tmp_path, args, extras):
    """README's `./scripts/bench.sh hf-lm ...` on a fresh clone: the script asks setup.sh for the hf
    extra (transformers), instead of stopping at "hf-lm needs transformers". setup.sh is stubbed
    here to print what it was asked for."""
    (tmp_path / "bench.sh").write_text((ROOT / "scripts" / "bench.sh").read_text())
    (tmp_path / "setup.sh").write_text('echo "$extras|$needed"; exit 0\n')
    out = subprocess.run(["bash", str(tmp_path / "bench.sh"), *args], capture_output=True, text=True, timeout=30)
    got_extras, needed = out.stdout.strip().split("|")
    assert got_extras == extras and ("transformers" in needed.split()) == ("hf" in extras), out.stdout


def test_citations_name_sections_of_docs_references_and_no_path_outside_the_repository():
    """Code, tests, benchmarks and docs cite docs/references.md by section, and every cited section
    exists; none names an absolute path (a file outside the repository a reader cannot open)."""
    import re

    sections = {int(n) for n in re.findall(r"^## (\d+)\.", (ROOT / "docs" / "references.md").read_text(), re.M)}
    cited, outside = set(), []
    files = [p for top in ("src", "tests", "benchmarks", "docs", "examples") for p in (ROOT / top).rglob("*")
             if p.suffix in (".py", ".md") and p.is_file()] + [ROOT / "README.md"]
    for path in files:
        text = path.read_text()
        cited |= {int(n) for n in re.findall(r"docs/references\.md,? sections? (\d+)", text)}
        outside += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"(?<![\w.])/(?:work|home|shared)/\S*", text)]
    assert cited and cited <= sections, sorted(cited - sections)
    assert not outside, outside
