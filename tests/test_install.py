"""What `make install` needs and does: the Python version the lock needs, checked first, and torch's build."""

import re
import subprocess
import tomllib
from importlib.metadata import distribution
from pathlib import Path

from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]


def locked() -> dict[str, str]:
    lines = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    return dict(re.fullmatch(r"([\w.-]+)==(\S+)", line).groups() for line in lines if line and line[0] != "#")


def test_requires_python_is_what_the_lock_needs():
    """Every locked package, as installed, accepts the oldest Python that pyproject.toml declares."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    oldest = declared.removeprefix(">=")
    refusing = {name: distribution(name).metadata["Requires-Python"] for name in locked()
                if not SpecifierSet(distribution(name).metadata["Requires-Python"] or "").contains(oldest)}
    assert refusing == {}, f"requires-python {declared} is older than these locked packages accept"


def test_make_install_checks_the_interpreter_first(tmp_path):
    old = tmp_path / "python3.10"  # answers as Python 3.10 does when asked for its version
    old.write_text("#!/bin/sh\necho 3.10\n")
    old.chmod(0o755)
    done = subprocess.run(["make", "-C", str(REPO), "install", f"PYTHON={old}", f"VENV={tmp_path / 'venv'}"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and not (tmp_path / "venv").exists()
    assert f"oplora needs Python >= 3.11 (the locked numpy, pandas, scipy and transformers do); {old} is 3.10" \
        in done.stderr
    assert "make install PYTHON=python3.11" in done.stderr


def test_make_install_takes_the_torch_build(tmp_path):
    """`make install TORCH=cu126` installs the locked version's CUDA 12.6 build from PyTorch's index. With the local
    label pip replaces an installed plain 2.13.0 (PyPI's CUDA 13 build), which `torch==2.13.0 --index-url …` leaves:
    that plain pin is satisfied by any build. The lock's pin then accepts the CUDA 12.6 build as it is."""
    version = locked()["torch"]

    def torch_install(*args: str) -> str:
        plan = subprocess.run(["make", "-n", "-C", str(REPO), "install", f"VENV={tmp_path}", *args],
                              capture_output=True, text=True, check=True).stdout
        (line,) = [line for line in plan.splitlines() if "pip install --quiet torch==" in line]
        return line.split("pip install --quiet ", 1)[1]

    assert torch_install() == f"torch=={version}"
    assert torch_install("TORCH=cu126") == f"torch=={version}+cu126 --index-url https://download.pytorch.org/whl/cu126"
    assert SpecifierSet(f"=={version}").contains(f"{version}+cu126")  # the lock accepts the CUDA build
    assert not SpecifierSet(f"=={version}+cu126").contains(version)  # the plain build does not satisfy +cu126
