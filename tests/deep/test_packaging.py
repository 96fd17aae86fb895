"""What a non-editable install (`pip install .`, a wheel) carries: every data file the
packages read must match a package-data pattern of pyproject.toml, or the installed
package cannot find it (the adaptation protocols were missing from wheels)."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def package_data() -> dict[str, list[str]]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-data"]


def tracked_data_files() -> list[str]:
    """Files that git tracks inside the packages, other than Python sources."""
    out = subprocess.run(["git", "ls-files", "theory", "sims", "deep"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if not f.endswith(".py")]


def shipped(path: str, patterns: dict[str, list[str]]) -> bool:
    # setuptools' package-data globs are relative to the package folder; "*" does not
    # cross a "/" (configs/*.toml does not take configs/adapt/x.toml).
    package, _, rest = path.partition("/")
    return any(fnmatch.fnmatch(rest, glob) and rest.count("/") == glob.count("/")
               for glob in patterns.get(package, []))


def test_every_data_file_the_packages_hold_is_shipped():
    files = tracked_data_files()
    assert "deep/configs/adapt/fmnist-c.toml" in files  # the listing works
    missing = [f for f in files if not shipped(f, package_data())]
    assert not missing, f"add patterns for {missing} to [tool.setuptools.package-data]"


def test_the_pattern_check_refuses_a_file_in_a_subfolder():
    assert shipped("deep/configs/fmnist-c.toml", {"deep": ["configs/*.toml"]})
    assert not shipped("deep/configs/adapt/fmnist-c.toml", {"deep": ["configs/*.toml"]})


def test_a_test_file_runs_alone_with_the_pytest_command():
    """`pytest tests/theory/test_theory_t1.py` (the console script, which does not put the
    checkout on sys.path as `python -m pytest` does) imported tests/theory as the package
    `theory` and tests/ fixtures failed as `No module named 'tests'`: 25 files errored
    alone. pyproject.toml's `pythonpath` puts the checkout first. `-P` keeps Python from
    adding the working directory, as the console script does not add it."""
    files = ["tests/theory/test_theory_t1.py", "tests/sims/test_sims_speed.py",
             "tests/deep/test_loaders_celeba.py"]
    run = subprocess.run([sys.executable, "-P", "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *files], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    assert "error" not in run.stdout.splitlines()[-1]
