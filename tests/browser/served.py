"""Serve an example app together with the Datastar client, for the browser tests.

The examples load the client from ``datastar_url()``: the CDN by default, or
``DATASTAR_JS_URL``. The test machines reach no CDN, and a page on one port
loading a module script from another would need CORS, so the test server
serves the client itself, from the same origin as the page. This module wraps
an example's WSGI app in a small middleware that answers one extra path with
the client file and hands every other request to the app untouched (the same
``environ`` and ``start_response``, so the stream's direct socket path stays
available). gunicorn runs it as a factory::

    gunicorn 'tests.browser.served:make("examples.clock:app")'

with ``FLASK_DATASTAR_JS_URL=/_test/datastar.js`` (read by the example's
``app.config.from_prefixed_env()``) and ``FLASK_DATASTAR_TEST_JS_FILE`` naming
the file obtained by :func:`tests.helpers.datastar_js`. The examples
themselves stay free of test code.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["JS_FILE_ENV", "JS_URL", "ServeClient", "make"]

#: The path at which the client is served, and the value of ``DATASTAR_JS_URL``.
JS_URL = "/_test/datastar.js"
#: The environment variable that names the client file on disk.
JS_FILE_ENV = "FLASK_DATASTAR_TEST_JS_FILE"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ServeClient:
    """WSGI middleware answering :data:`JS_URL` with the Datastar client file.

    :param app: the application that gets every other request.
    :param js_file: the client script.
    """

    def __init__(self, app: WSGIApp, js_file: Path) -> None:
        self.app = app
        # Read once: the file is small and the workers serve it on every page load.
        self.body = js_file.read_bytes()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != JS_URL:
            return self.app(environ, start_response)
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/javascript; charset=utf-8"),
                ("Content-Length", str(len(self.body))),
                ("Cache-Control", "max-age=3600"),
            ],
        )
        return [self.body]


def make(app_spec: str) -> ServeClient:
    """Import the app named by *app_spec* (``module:variable``) and wrap it.

    :param app_spec: the example's WSGI app, such as ``"examples.clock:app"``.
    :raises RuntimeError: :data:`JS_FILE_ENV` is not set.
    """
    js_file = os.environ.get(JS_FILE_ENV)
    if not js_file:
        raise RuntimeError(
            f"Set {JS_FILE_ENV} to the Datastar client file (tests.helpers.datastar_js())"
            " to serve an example for the browser tests."
        )
    module, _, name = app_spec.partition(":")
    app = getattr(importlib.import_module(module), name or "app")
    return ServeClient(app, Path(js_file))
