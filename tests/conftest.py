"""Fixtures shared by all test modules; the servers and tools live in ``tests.helpers``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_datastar import FlaskDatastar
from tests.helpers import RedisServer, datastar_js


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options of the concurrency torture test (tests/test_torture.py)."""
    group = parser.getgroup("torture", "the concurrency torture test")
    group.addoption(
        "--torture-seconds",
        type=float,
        default=10.0,
        help="How long each run of tests/test_torture.py attacks the server (default 10).",
    )
    group.addoption(
        "--torture-seed",
        type=int,
        default=None,
        help="Replay tests/test_torture.py with this seed (printed by every run).",
    )
    parser.addoption(
        "--bench",
        action="store_true",
        default=False,
        help="Also run the benchmark smoke test (tests/test_benchmarks.py, marker 'bench';"
        " needs pip install -e '.[bench]'). Opt-in: it starts four servers.",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the opt-in benchmark tests out unless ``--bench`` asks for them."""
    if config.getoption("--bench"):
        return
    opted_in = [item for item in items if item.get_closest_marker("bench") is None]
    if len(opted_in) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in opted_in])
        items[:] = opted_in


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free loopback port, stopped after the test."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def datastar_js_file() -> Path:
    """The Datastar client script for browser tests, downloaded once and cached."""
    return datastar_js()


@pytest.fixture
def app() -> Flask:
    """A fresh Flask app with the extension registered, in testing mode."""
    app = Flask(__name__)
    app.config.update(TESTING=True, DATASTAR_HEARTBEAT=0.2)
    FlaskDatastar(app)
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """The Flask test client of ``app``, sending ``Datastar-Request: true`` as Datastar does."""
    client = app.test_client()
    client.environ_base["HTTP_DATASTAR_REQUEST"] = "true"
    return client
