"""A page of appended lines whose stream resumes after a reconnect, for test_resume.py.

Two rooms, each a registry with a replay log, held here at module level:

- ``big``: ``ReplayLog(max_events=1000, max_age=300)``, which covers any gap of the test;
- ``small``: ``ReplayLog(max_events=2, max_age=300)``, so that three missed lines are a
  gap older than the log.

Every stream first tells its client to wait 2 s before it reconnects
(``DATASTAR_RETRY``), so that the test can append lines while the tab is away.

- ``GET /?room=R``: the page; an empty ``<ul id="lines">`` and the stream.
- ``GET /sse?room=R``: registers the stream (under the key ``"tabs"``); a stream that
  did not resume gets the full list (an outer morph of ``#lines``), one that resumed
  only what the registry replayed to it. Each connection is recorded: the
  ``Last-Event-ID`` it came with, whether it resumed, whether it got the full state.
- ``POST /append?room=R&text=T``: stores the line and broadcasts ``<li>T</li>``
  appended to ``#lines``; answers how many streams the room had at that moment.
- ``POST /cut?room=R``: ends the room's streams abruptly (``revoke(reconnect=True)``),
  as a network blip would: their tabs reconnect after the retry delay.
- ``GET /state?room=R``: the room's open streams and its connections so far.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from flask import Flask, render_template_string, request
from markupsafe import escape

from flask_datastar import SSE, FlaskDatastar, ReplayLog, Stream

app = Flask(__name__)
app.config.from_prefixed_env()
app.config["DATASTAR_RETRY"] = 2000
datastar = FlaskDatastar(app)

rooms = {
    "big": datastar.registry(app, "resume-big", replay=ReplayLog(max_events=1000, max_age=300)),
    "small": datastar.registry(app, "resume-small", replay=ReplayLog(max_events=2, max_age=300)),
}
_lines: dict[str, list[str]] = {name: [] for name in rooms}
_connections: dict[str, list[dict[str, Any]]] = {name: [] for name in rooms}
_lock = threading.Lock()

PAGE = """\
<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Lines</title>{{ datastar_script() }}</head>
<body>
  <div data-init="@get('/sse?room={{ room }}')"></div>
  <ul id="lines"></ul>
</body>
</html>"""


def room() -> str:
    name = request.args.get("room", "big")
    return name if name in rooms else "big"


def register(gen: Stream) -> None:
    rooms[room()].register(gen, "tabs")


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, room=room())


@app.get("/sse")
@datastar.sse(on_connect=register)
def sse(gen: Stream) -> Iterator[Any]:
    name = room()
    with _lock:
        lines = list(_lines[name])
        _connections[name].append(
            {
                "last_event_id": gen.last_event_id,
                "resumed": gen.resumed,
                "full_state": not gen.resumed,
            }
        )
    if not gen.resumed:
        # A new tab, or one away for longer than the log keeps events.
        items = "".join(f"<li>{escape(line)}</li>" for line in lines)
        gen.patch_elements(f'<ul id="lines">{items}</ul>')
    yield gen.sleep(None)


@app.post("/append")
def append() -> dict[str, int]:
    name, text = room(), request.args["text"]
    with _lock:
        _lines[name].append(text)
    rooms[name].broadcast(
        SSE.patch_elements(f"<li>{escape(text)}</li>", selector="#lines", mode="append")
    )
    return {"open": len(rooms[name])}


@app.post("/cut")
def cut() -> tuple[str, int]:
    rooms[room()].revoke(key="tabs", reconnect=True)
    return "", 204


@app.get("/state")
def state() -> dict[str, Any]:
    name = room()
    with _lock:
        return {"open": len(rooms[name]), "connections": list(_connections[name])}
