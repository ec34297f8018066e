"""Running code from inside the repository imports the installed packages, not the repository's folders.

transformers (>= 5.25) imports Hugging Face's ``kernels`` distribution; ``python -m``, pytest and
scripts put their working or script directory first on ``sys.path``, so a repository folder or file
named ``kernels`` would shadow it (issue 14: no test ran on a fresh machine). Each check runs a fresh
interpreter from the places a user or a test runs code: the repository root, ``bench/``, ``examples/``.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLACES = ["", "bench", "examples"]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _installed_kernels() -> Path | None:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels")).resolve()


@pytest.mark.parametrize("place", PLACES)
def test_transformers_imports_from(place: str) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    done = _run(ROOT / place, "-c", "import transformers.modeling_utils")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("place", PLACES)
def test_kernels_is_the_installed_distribution_from(place: str) -> None:
    installed = _installed_kernels()
    if installed is None:
        pytest.skip("Hugging Face's `kernels` distribution is not installed (transformers >= 5.25 brings it)")
    code = "import kernels, pathlib; print(pathlib.Path(kernels.__file__).resolve().parent)"
    # -m puts the working directory first on sys.path; a script run puts its own folder first
    done = _run(ROOT / place, "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == installed


def test_no_repository_file_is_named_kernels_outside_the_kernel_folder() -> None:
    """A ``kernels.py`` anywhere a script runs from would shadow the distribution for that script."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert not [p for p in tracked if Path(p).name == "kernels.py"]
    assert "kernels/__init__.py" not in tracked  # a regular package there shadows an installed one


def test_cli_help_from_the_root() -> None:
    done = _run(ROOT, "-m", "lowmembp_convert", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--demo" in done.stdout


def test_package_kernels_come_from_the_kernel_folder() -> None:
    done = _run(ROOT, "-c", "import lowmembp_convert.kernels.norms as n; print(n.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() == ROOT / "kernels" / "norms.py"
