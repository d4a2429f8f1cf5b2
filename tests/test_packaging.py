"""The package as a user gets it: the wheel and the sdist that ``python -m build`` makes.

The wheel is installed with ``pip --no-index --no-deps`` into a fresh venv outside the repository
(its dependencies come from this interpreter's site-packages through a ``.pth`` line, so the test runs
offline) and runs the demo there; the sdist is unpacked and its tests are collected and one file is run
from it. The build works on a copy of the repository, so nothing is written into the working tree.
"""
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache",
                                 "demo_out", "arena_out", "site")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
OUTSIDE = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # a user's shell: the repository not on the path


def run(*cmd, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) built from a copy of the repository."""
    tmp = tmp_path_factory.mktemp("build")
    shutil.copytree(ROOT, tmp / "src", ignore=IGNORED)
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", tmp / "src", cwd=tmp)
    wheel, = (tmp / "dist").glob("*.whl")
    sdist, = (tmp / "dist").glob("*.tar.gz")
    return wheel, sdist


@pytest.mark.slow  # builds both distributions (~20 s) and installs the wheel into a fresh venv
def test_the_wheel_carries_its_license_metadata_and_runs_the_demo_from_a_fresh_venv(dists, tmp_path):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(f"{info}/METADATA").decode()
        assert z.read(f"{info}/licenses/LICENSE").decode().startswith("MIT License")
    assert "License-Expression: MIT" in meta and "Author-email: kdiff_align maintainers" in meta
    assert "kdiff_align_cli.py" in names and any(n.startswith("kdiff_align/weights/") for n in names)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=OUTSIDE)
    purelib = Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                       cwd=tmp_path, env=OUTSIDE).stdout.strip())
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-index", "--no-deps",
        "--no-compile", wheel, cwd=tmp_path, env=OUTSIDE)
    # then torch & co. from this interpreter's site-packages, offline (after the install, so that pip does
    # not take a kdiff_align it might see there for the one to install)
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    where = run(venv / "bin" / "python", "-c", "import kdiff_align; print(kdiff_align.__file__)", cwd=tmp_path,
                env=OUTSIDE)
    assert where.stdout.strip().startswith(str(purelib))  # the installed wheel, not the repository
    demo = run(venv / "bin" / "kdiff-align", "demo", "--quick", "--no-progress", "--out", tmp_path / "demo",
               cwd=tmp_path, env=OUTSIDE)
    assert "wrote" in demo.stdout and (tmp_path / "demo" / "reward_vs_nfe.png").stat().st_size > 5000


@pytest.mark.slow  # builds both distributions (~20 s), then collects every test of the unpacked sdist
def test_the_sdists_tests_run_from_the_unpacked_sdist(dists, tmp_path):
    _, sdist = dists
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    root, = tmp_path.iterdir()
    for name in ("LICENSE", "tests/conftest.py", "tests/strategies.py", "tests/tiny.py", "mkdocs.yml"):
        assert (root / name).is_file(), name
    env = {**ENV, "PYTHONPATH": str(root)}
    where = run(sys.executable, "-c", "import kdiff_align; print(kdiff_align.__file__)", cwd=root, env=env)
    assert where.stdout.strip().startswith(str(root))
    collected = run(sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", cwd=root, env=env)
    count = int(collected.stdout.strip().splitlines()[-1].split()[0])
    mine = run(sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", cwd=ROOT,
               env={**ENV, "PYTHONPATH": str(ROOT)})
    assert count == int(mine.stdout.strip().splitlines()[-1].split()[0])  # every test of the repository
    run(sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_layout.py", cwd=root, env=env)
