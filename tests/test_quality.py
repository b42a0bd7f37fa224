"""The package stays lint-clean and type-checks under ``mypy --strict``."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO_ROOT, require_module


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_mypy_strict() -> None:
    require_module("mypy")
    result = run("mypy", "--strict", "flask_datastar")
    assert result.returncode == 0, result.stdout + result.stderr


def test_examples_type_check_against_the_public_api() -> None:
    # The decorators keep the views' types, so user code checks under --strict too.
    require_module("mypy")
    result = run("mypy", "--strict", "example_app.py", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    require_module("ruff")
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
