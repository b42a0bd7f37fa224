"""The pytest plugin, as a user's own test run sees it.

Each test runs pytest in a subprocess (pytester) in a folder that holds only a user's
files: nothing of this repository's conftest is there, only the installed plugin, found
through its ``pytest11`` entry point.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import flask_datastar

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "testing-your-app"


def declared_entry_points() -> list[str]:
    return [ep.value for ep in entry_points(group="pytest11") if ep.name == "flask_datastar"]


def test_the_plugin_is_a_pytest11_entry_point() -> None:
    assert declared_entry_points() == ["flask_datastar.pytest_plugin"], (
        "The installed flask_datastar declares no pytest11 entry point: its metadata"
        " predates setup.cfg's. Install it again: pip install -e '.[test]'."
    )


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An empty project folder whose pytest runs import this flask_datastar."""
    package_root = str(Path(flask_datastar.__file__).resolve().parent.parent)
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, *inherited])))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    for name in ("counter.py", "test_counter.py"):
        (pytester.path / name).write_text((EXAMPLE / name).read_text(encoding="utf-8"))
    return pytester


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run pytest in *project*, with the plugin as a user gets it: from its entry point.

    An install older than the entry point (test_the_plugin_is_a_pytest11_entry_point
    fails then) gets the plugin by name, so these tests still check the fixtures.
    """
    plugin = [] if declared_entry_points() else ["-p", "flask_datastar.pytest_plugin"]
    return project.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "error", *plugin, *args, timeout=120
    )


@pytest.mark.live
def test_the_documented_example_passes_with_only_the_plugin(user_project: pytest.Pytester) -> None:
    # docs/testing.rst shows these files; this is the run a user makes of them.
    result = run(user_project, "test_counter.py")
    result.assert_outcomes(passed=3)


USER_TESTS = """
import os
import sys
import threading

import pytest
from flask import Flask

from flask_datastar import SSE, FlaskDatastar, open_streams

seen = {}


def make_app():
    app = Flask(__name__)
    app.config.update(TESTING=True, DATASTAR_HEARTBEAT=0)
    datastar = FlaskDatastar(app)
    clients = datastar.registry(app, "room")

    @app.get("/sse")
    @datastar.sse(on_connect=clients.register)
    def sse(gen):
        gen.patch_elements('<p id="a">0</p>')
        yield gen.sleep()

    @app.post("/say")
    def say():
        clients.broadcast(SSE.patch_signals({"said": 1}))
        return "", 204

    @app.get("/fails")
    @datastar.sse
    def fails(gen):
        yield gen.sleep(0)
        raise LookupError("the handler failed")

    return app, clients


def datastar_threads():
    # The scheduler's timer and pool serve the whole process: not a stream's or a
    # registry's thread, they stay.
    process_wide = ("flask_datastar-scheduler", "flask_datastar-step")
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("flask_datastar") and not t.name.startswith(process_wide)
    ]


def test_leave_everything_open(datastar_stream, datastar_live_server):
    app, clients = make_app()
    client = app.test_client()
    readers = [datastar_stream(client, "/sse") for _ in range(3)]
    for reader in readers:
        assert reader.next_event(timeout=2).elements == '<p id="a">0</p>'
    assert client.post("/say", headers={"Datastar-Request": "true"}).status_code == 204
    for reader in readers:
        assert reader.next_event(timeout=2).signals == {"said": 1}
    with pytest.raises(TimeoutError):
        readers[0].next_event(timeout=0.1)
    server = datastar_live_server("counter:create_app()", threads=4)
    live = server.stream("/sse")
    assert live.next_event().elements == '<p id="count">0</p>'
    assert datastar_threads()
    seen.update(readers=[*readers, live], clients=clients, pgid=server.process.pid)


def test_the_fixtures_closed_everything():
    assert all(reader.ended for reader in seen["readers"])
    assert len(seen["clients"]) == 0
    assert not open_streams()
    assert not datastar_threads()
    with pytest.raises(ProcessLookupError):
        os.killpg(seen["pgid"], 0)


def test_a_stream_that_failed_unread(datastar_stream):
    app, _ = make_app()
    reader = datastar_stream(app.test_client(), "/fails")
    assert reader.wait_ended()


def test_cleanup_alone(datastar_cleanup):
    app, clients = make_app()
    app.test_client().post("/say", headers={"Datastar-Request": "true"})
    assert "flask_datastar-broadcaster-room" in datastar_threads()


def test_no_registry_thread_left():
    assert not datastar_threads()


def test_without_gunicorn(datastar_live_server, monkeypatch):
    monkeypatch.setitem(sys.modules, "gunicorn", None)
    with pytest.raises(RuntimeError, match="pip install 'flask_datastar.gunicorn.'"):
        datastar_live_server("counter:create_app()")
"""


@pytest.mark.live
def test_the_fixtures_leave_nothing_behind(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_fixtures=USER_TESTS)
    result = run(user_project, "test_fixtures.py")
    result.assert_outcomes(passed=6, errors=1)
    # A stream whose error the test never read fails the test's teardown, with the error.
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_a_stream_that_failed_unread*",
            "*RuntimeError: The stream '/fails' failed: LookupError('the handler failed')",
        ]
    )
