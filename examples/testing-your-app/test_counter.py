"""Tests of ``counter.py`` with the fixtures of flask_datastar's pytest plugin only.

In-process with Flask's test client (``datastar_stream``), and end to end under real
gunicorn (``datastar_live_server``). Every stream, registry thread and server is
closed by the fixtures, whatever the test does.
"""

from __future__ import annotations

import pytest
from counter import create_app, datastar
from flask.testing import FlaskClient

from flask_datastar.pytest_plugin import LiveServerFactory, StreamFactory


@pytest.fixture
def client() -> FlaskClient:
    app = create_app()
    app.config["TESTING"] = True
    client = app.test_client()
    # Datastar's actions send this header, and the app's CSRF check requires it.
    client.environ_base["HTTP_DATASTAR_REQUEST"] = "true"
    return client


def test_a_click_reaches_every_tab(client: FlaskClient, datastar_stream: StreamFactory) -> None:
    first = datastar_stream(client, "/sse")
    second = datastar_stream(client, "/sse")
    assert first.next_event(timeout=2).elements == '<p id="count">0</p>'
    assert second.next_event(timeout=2).elements == '<p id="count">0</p>'

    assert client.post("/click").status_code == 204
    assert first.next_event(timeout=2).elements == '<p id="count">1</p>'
    assert second.next_event(timeout=2).elements == '<p id="count">1</p>'

    # Streams close in any order: here the first one opened goes first.
    first.close()
    clients = datastar.registry(client.application, "counter")
    assert len(clients) == 1  # the closed stream left the registry by itself
    client.post("/click")
    assert second.next_event(timeout=2).elements == '<p id="count">2</p>'
    # The second stream is left open: the fixture closes it after the test.


def test_no_click_no_event(client: FlaskClient, datastar_stream: StreamFactory) -> None:
    tab = datastar_stream(client, "/sse")
    tab.next_event(timeout=2)
    # A real timeout, whether the app sends heartbeats (every 15 s here) or not.
    with pytest.raises(TimeoutError):
        tab.next_event(timeout=0.2)


def test_under_gunicorn(datastar_live_server: LiveServerFactory) -> None:
    server = datastar_live_server("counter:create_app()", threads=8)
    first = server.stream("/sse")
    second = server.stream("/sse")
    assert first.headers["content-type"].startswith("text/event-stream")
    assert first.next_event(timeout=5).elements == '<p id="count">0</p>'
    assert second.next_event(timeout=5).elements == '<p id="count">0</p>'

    assert server.post("/click").status == 204
    assert first.next_event(timeout=5).elements == '<p id="count">1</p>'
    assert second.next_event(timeout=5).elements == '<p id="count">1</p>'

    first.close()  # the tab goes away; the other one still gets the clicks
    assert server.post("/click").status == 204
    assert second.next_event(timeout=5).elements == '<p id="count">2</p>'
