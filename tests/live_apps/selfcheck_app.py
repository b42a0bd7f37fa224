"""A Flask app for the live self-check test (tests/test_selfcheck.py).

With ``SELFCHECK_TRAPS=1`` it falls into several traps at once: a 90 s
heartbeat, a ``DATASTAR_JS_URL`` pointing at a static file that does not
exist, a middleware named like a compressor around ``app.wsgi_app``, and an
inner middleware that wraps ``start_response``. Without it, it is a clean app.

- ``GET /sse``: sends ``{"pid": <worker pid>}``, then nothing of its own.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from flask_datastar import FlaskDatastar

app = Flask(__name__)
app.config.from_prefixed_env()
TRAPS = os.environ.get("SELFCHECK_TRAPS") == "1"
if TRAPS:
    app.config.update(DATASTAR_HEARTBEAT=90, DATASTAR_JS_URL="/static/datastar/missing.js")
datastar = FlaskDatastar(app)


@app.get("/sse")
@datastar.sse
def sse(gen: Any) -> Any:
    gen.patch_signals({"pid": os.getpid()})
    yield gen.sleep(None)


class TimingMiddleware:
    """Wraps start_response and changes nothing (as many monitoring middlewares do)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        def timed_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            return start_response(status, headers, exc_info)

        return self.app(environ, timed_start_response)


class GzipMiddleware:
    """Named like a compressor; passes everything through, start_response included."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


if TRAPS:
    app.wsgi_app = GzipMiddleware(TimingMiddleware(app.wsgi_app))  # type: ignore[method-assign]
