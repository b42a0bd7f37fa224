"""A plain WSGI application for testing the test helpers against a real gunicorn.

It does not import flask_datastar, so a broken package cannot break the helpers' tests.

- ``/``: ``hello`` (or ``$HELLO_GREETING``) with a ``Content-Length``.
- ``/pid``: the id of the worker process that answered.
- ``/events?count=N``: ``N`` Server-Sent Events (``count`` absent: endless, one every
  0.05 s), each preceded by a comment, as a chunked stream.
- ``/echo``: the request body back, with its ``Content-Type``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _events(count: int | None) -> Iterator[bytes]:
    number = 0
    while count is None or number < count:
        yield b": tick\n\n"
        yield f"event: test\nid: {number}\ndata: n {number}\n\n".encode()
        number += 1
        if count is None:
            time.sleep(0.05)


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Serve the routes listed in the module docstring."""
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        body = os.environ.get("HELLO_GREETING", "hello").encode()
        length = str(len(body))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", length)])
        return [body]
    if path == "/pid":
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    if path == "/events":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        count = int(query["count"][0]) if "count" in query else None
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return _events(count)
    if path == "/echo":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size)
        content_type = environ.get("CONTENT_TYPE", "application/octet-stream")
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]
