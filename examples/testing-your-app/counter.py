"""A counter shared by every tab, the CQRS way: the app that ``test_counter.py`` tests.

Each tab holds one stream (``GET /sse``, the query side); a click is a command
(``POST /click``) that changes the state and broadcasts the new count to every
stream. docs/testing.rst walks through its tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from flask import Flask

from flask_datastar import SSE, FlaskDatastar, Stream

datastar = FlaskDatastar()


def render(count: int) -> str:
    return f'<p id="count">{count}</p>'


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_prefixed_env()
    datastar.init_app(app)
    clients = datastar.registry(app, "counter")
    state = {"count": 0}
    lock = threading.Lock()

    @app.get("/sse")
    @datastar.sse(on_connect=clients.register)
    def sse(gen: Stream) -> Iterator[object]:
        gen.patch_elements(render(state["count"]))
        yield gen.sleep()  # until the tab goes away; broadcasts arrive meanwhile

    @app.post("/click")
    def click() -> tuple[str, int]:
        with lock:  # the tabs get the counts in the order of the clicks
            state["count"] += 1
            clients.broadcast(SSE.patch_elements(render(state["count"])))
        return "", 204

    return app
