"""A page that loads the Datastar client with ``{{ datastar_script() }}`` and goes live.

For the browser test of the client served from the app's own static files. The page
says "offline" until Datastar has loaded, opened ``/live`` and patched it to "live".

    gunicorn "tests.live_apps.client_app:make_app('/tmp/static', 'sha384-...')"
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask, render_template_string

from flask_datastar import FlaskDatastar, Stream

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Client</title>
  {{ datastar_script() }}
</head>
<body data-init="{{ sse_get('/live') }}">
  <p id="status">offline</p>
</body>
</html>"""


def make_app(static_folder: str, integrity: str | None = None) -> Flask:
    """Return the app, serving *static_folder*, whose client has the hash *integrity*.

    :param static_folder: the app's static folder, where ``flask datastar fetch`` writes.
    :param integrity: ``DATASTAR_JS_INTEGRITY``: the hash of the test copy of the client.
    """
    app = Flask(__name__, static_folder=static_folder)
    app.config["DATASTAR_JS_INTEGRITY"] = integrity
    datastar = FlaskDatastar(app)

    @app.get("/")
    def index() -> str:
        return render_template_string(PAGE)

    @app.get("/live")
    @datastar.sse
    def live(gen: Stream) -> Iterator[object]:
        gen.patch_elements('<p id="status">live</p>')
        while True:
            yield gen.sleep(5)

    return app
