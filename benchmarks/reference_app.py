"""The reference for ``fanout.py``: the plain thread-per-stream, queue-per-stream design.

The same page, the same content, the same one-second tick per stream and the
same ``POST /click`` broadcast as ``example_app.py``, written the way a Flask
app streams without flask_datastar's engine: each stream's own server thread
blocks on its own :class:`queue.Queue` and yields whatever arrives, and a
click puts the rendered event into every stream's queue. Under gunicorn
gthread every broadcast wakes one pool thread per open stream.

The content is rendered by ``example_app.render_content`` itself, and the
counter is the example's (``example_app.add_click``), so that both servers do
the same rendering work and send the same bytes; only the way events travel
differs. flask_datastar is
used for the wire format (:class:`~flask_datastar.SSE`) and the template
helpers, not for streams.

Run it like the example: ``gunicorn -k gthread --threads 1100 reference_app:app``
with ``benchmarks/`` and the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

from flask import Flask, Response, render_template_string, stream_with_context

import example_app
from flask_datastar import SSE, SSE_HEADERS, FlaskDatastar

app = Flask(__name__)
app.config.from_prefixed_env()
# Only for the Jinja helpers the shared templates use (sse_post, datastar_url).
FlaskDatastar(app)

TICK = 1.0

subscribers: set[queue.Queue[str]] = set()
subscribers_lock = threading.Lock()


@app.get("/")
def index() -> str:
    return render_template_string(example_app.PAGE, content=example_app.render_content())


@app.get("/sse")
def sse() -> Response:
    events: queue.Queue[str] = queue.Queue()
    with subscribers_lock:
        subscribers.add(events)

    def stream() -> Iterator[str]:
        try:
            next_tick = time.monotonic()
            while True:
                wait = next_tick - time.monotonic()
                if wait <= 0:
                    with example_app.state_lock:
                        tick = SSE.patch_elements(example_app.render_content())
                    yield tick
                    next_tick += TICK
                    continue
                try:
                    event = events.get(timeout=wait)
                except queue.Empty:
                    continue
                yield event
        finally:
            with subscribers_lock:
                subscribers.discard(events)

    return Response(stream_with_context(stream()), headers=SSE_HEADERS)


@app.post("/click")
def click() -> tuple[str, int]:
    with example_app.state_lock:
        example_app.add_click()
        event = SSE.patch_elements(example_app.render_content(), selector="#content")
        with subscribers_lock:
            targets = list(subscribers)
        # Still under the state lock, so the queues receive the states in order.
        for events in targets:
            events.put(event)
    return "", 204
