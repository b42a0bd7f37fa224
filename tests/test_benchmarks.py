"""The fan-out benchmark runs, in a tiny configuration, against every server it compares.

Not a speed test (no timing is asserted): it checks that ``benchmarks/fanout.py`` starts
each server (flask_datastar and the thread-per-stream reference under gunicorn, the bare
uvloop floor, datastar-py + Starlette on uvicorn), splits the streams between two holder
processes, gets every click to every stream, and finds the same event bytes on every
server, so that the ratios it reports compare the same work. About 25 s, so opt-in:
``pytest --bench`` (marker ``bench``), with the ``bench`` extra installed (uvloop,
uvicorn, httptools, Starlette, datastar-py).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, _missing

SERVERS = ["flask_datastar", "floor", "starlette", "reference"]
BENCH_MODULES = ["gunicorn", "uvloop", "uvicorn", "httptools", "starlette", "datastar_py"]

pytestmark = [
    pytest.mark.live,
    pytest.mark.bench,
    pytest.mark.skipif(sys.platform != "linux", reason="the benchmark reads /proc"),
]


def run_benchmark(json_path: Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """Run fanout.py; on a timeout, SIGTERM it so it stops the servers it started."""
    command = [
        sys.executable, "benchmarks/fanout.py",
        "--streams", "20", "--duration", "2", "--warmup", "0.5", "--drain", "3",
        "--stalled", "0", "--client-procs", "2", "--servers", ",".join(SERVERS),
        "--json", str(json_path),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"fanout.py did not finish in {timeout} s.\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_fanout_benchmark_measures_every_server_with_the_same_bytes(tmp_path: Path) -> None:
    missing = [m for m in BENCH_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        _missing(f"the benchmark's servers need {missing}: pip install -e '.[bench]'")
    json_path = tmp_path / "fanout.json"
    result = run_benchmark(json_path)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(json_path.read_text())
    runs = results["runs"]
    assert [run["server"] for run in runs] == SERVERS
    for run in runs:
        where = f"{run['server']}: {run}"
        assert run["streams"] == 20, where
        assert run["clicks"] == 20, where
        assert run["undelivered"] == 0 and run["delivery_pct"] == 100.0, where
        assert run["client_errors"] == 0 and run["click_errors"] == [], where
        assert run["client_procs"] == 2 and len(run["client_cpu_per_proc_pct"]) == 2, where
        # The same tick and click events (time and count blanked out) on every server.
        assert run["events"] == runs[0]["events"], where
        assert set(run["events"]) == {"tick", "click"}, where
    assert results["errors"] == []
    # The report: a row per server, the same-bytes check and the ratios to the references.
    assert "Every server sent the same bytes for each event" in result.stdout
    assert "fan-out p99 / floor | server CPU / floor" in result.stdout
    assert "fan-out p99 / starlette | server CPU / starlette" in result.stdout
    for label in ("floor (bare uvloop)", "datastar-py + Starlette (uvicorn)"):
        assert f"| 20 | {label} | 100 % |" in result.stdout
