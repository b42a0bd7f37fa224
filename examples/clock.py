"""A clock pushed by the server: the smallest Datastar stream.

The page opens one stream when it loads (``data-init="@get('/clock')"``).
The view is a generator: ``with_sse()`` hands it the stream (``gen``),
``gen.patch_elements()`` sends HTML that Datastar morphs into the page by the
elements' ids, and ``yield gen.sleep(1)`` pauses. The stream lives until the
tab closes; every tab gets its own.

Run it with Flask's development server or with gunicorn (from the repository
root; ``gunicorn.conf.py`` there sets the gthread worker and the hooks that
end streams cleanly on a restart)::

    python examples/clock.py                         # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py examples.clock:app   # http://127.0.0.1:8989/
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Flask, render_template_string

from flask_datastar import FlaskDatastar, datastar_response, with_sse

app = Flask(__name__)
app.config.from_prefixed_env()  # FLASK_DATASTAR_JS_URL=/static/datastar.js, ...
datastar = FlaskDatastar(app)

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Clock</title>
  {{ datastar_script() }}
</head>
<body data-init="{{ sse_get('/clock') }}">
  <h1>Clock</h1>
  <p>Server time: <strong id="clock">--:--:--</strong></p>
  <p>This tab's stream has sent <span id="ticks">0</span> updates.</p>
</body>
</html>"""


@app.get("/")
def index() -> str:
    return render_template_string(PAGE)


@app.get("/clock")
@datastar_response
def clock() -> Iterator[object]:
    with with_sse() as gen:
        ticks = 0
        while True:
            ticks += 1
            # Two top-level elements in one event: each replaces the element with its id.
            gen.patch_elements(
                f'<strong id="clock">{time.strftime("%H:%M:%S")}</strong>'
                f'<span id="ticks">{ticks}</span>'
            )
            yield gen.sleep(1)


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
