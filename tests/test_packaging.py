"""The distributions: the sdist carries everything its tests need, the wheel only the package.

The sdist is what a downstream packager runs the suite from, so it must hold every file
the repository tracks (the test helpers, the live and browser apps, the docs, the examples,
the benchmarks, the changelog); the wheel is what an application installs, so it holds
``flask_datastar`` and ``py.typed`` and nothing else. Both are built once per module
without build isolation (the installed setuptools, no network), which takes a few seconds.
``.ci/sdist-check`` then builds them the way a release would, runs ``twine check`` and runs
the sdist's own tests against the package installed from it. The pins of ``.ci/lowest.txt``,
which ``.ci/lowest-deps`` tests, are checked against the lower bounds of ``setup.cfg``.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers import REPO_ROOT, require_module, require_tool

# Tracked files that only mean something inside a git checkout.
GIT_ONLY = {".gitignore"}

# Files the sdist's tests open by path; named so a failure says which part of the suite broke.
NEEDED_BY_TESTS = [
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/helpers.py",
    "tests/live_apps/__init__.py",
    "tests/browser/conftest.py",
    "docs/conf.py",
    "docs/index.rst",
    "examples/__init__.py",
    "example_app.py",
    "gunicorn.conf.py",
    "CHANGES.rst",
    "benchmarks/fanout.py",
]


@dataclass
class Dists:
    """The members of the built sdist (relative to its top folder) and wheel."""

    sdist: set[str]
    wheel: set[str]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dists]:
    """Build the sdist, and the wheel from it, into a temporary folder."""
    require_module("build")
    require_module("setuptools")
    require_module("wheel")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the test extra installs setuptools and wheel, so no download is needed.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [sdist_path] = out.glob("*.tar.gz")
    [wheel_path] = out.glob("*.whl")
    with tarfile.open(sdist_path) as tar:
        # Every member sits under one top folder, name-version/.
        sdist = {
            str(PurePosixPath(*PurePosixPath(member.name).parts[1:]))
            for member in tar.getmembers()
            if member.isfile()
        }
    with zipfile.ZipFile(wheel_path) as whl:
        wheel = set(whl.namelist())
    yield Dists(sdist=sdist, wheel=wheel)


def tracked_files() -> set[str]:
    """Return the files git tracks in the repository, or skip outside a git checkout."""
    git = require_tool("git")
    result = subprocess.run(
        [git, "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        # An unpacked sdist: nothing to compare with (.ci/sdist-check does not run this file).
        pytest.skip("Not a git checkout; the sdist's contents are checked from a checkout.")
    return {name for name in result.stdout.split("\0") if name}


def test_sdist_holds_what_its_tests_need(dists: Dists) -> None:
    missing = [name for name in NEEDED_BY_TESTS if name not in dists.sdist]
    assert not missing, f"The sdist lacks files its tests need: {missing}. Add them to MANIFEST.in."


def test_sdist_holds_every_tracked_file(dists: Dists) -> None:
    # A file added to the repository later (a new test module, a doc page) must reach the
    # sdist without anyone remembering MANIFEST.in.
    missing = sorted(tracked_files() - GIT_ONLY - dists.sdist)
    assert not missing, f"The sdist lacks tracked files: {missing}. Add them to MANIFEST.in."


def test_sdist_holds_no_build_or_cache_debris(dists: Dists) -> None:
    debris = sorted(
        name
        for name in dists.sdist
        if "__pycache__" in name
        or name.endswith((".pyc", ".pyo"))
        or name.startswith(("docs/_build/", "build/", "dist/", "test-artifacts/"))
        or "/.pytest_cache/" in f"/{name}"
    )
    assert not debris, f"The sdist carries generated files: {debris}. Exclude them in MANIFEST.in."


def test_wheel_holds_only_the_package(dists: Dists) -> None:
    top = {name.split("/", 1)[0] for name in dists.wheel}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert top - dist_info == {"flask_datastar"}, sorted(top)
    modules = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "flask_datastar").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    package = {name for name in dists.wheel if name.startswith("flask_datastar/")}
    assert package == modules | {"flask_datastar/py.typed"}


def test_lowest_constraints_pin_the_lower_bounds_of_setup_cfg() -> None:
    # .ci/lowest-deps tests these pins; if they drifted from setup.cfg, CI would test
    # versions that users cannot get, or miss the ones they can.
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    runtime = [
        *config["options"]["install_requires"].split(),
        *config["options.extras_require"]["gunicorn"].split(),
        *config["options.extras_require"]["redis"].split(),
    ]
    bounds = {}
    for line in runtime:
        requirement = Requirement(line)
        [lower] = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        bounds[canonicalize_name(requirement.name)] = Version(lower)
    pins = {}
    for line in (REPO_ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    assert pins == bounds
