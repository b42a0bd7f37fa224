"""A chat whose tabs resume after a reconnect, for tests/test_resume.py.

Two rooms, each a registry with a replay log held by the app:

- ``big``: ``ReplayLog(max_events=1000, max_age=300)``;
- ``small``: ``ReplayLog(max_events=5, max_age=1)``, so a short absence is a gap.

With ``FLASK_DATASTAR_REDIS_URL`` set, the lines live in Redis lists and the logs in
Redis Streams (shared by every worker); without it, in this process.

- ``GET /sse?room=R``: registers the stream; a resumed stream gets only the events it
  missed (written by the registry) and a signal ``{"resumed": true, "pid": ...}``; any
  other stream gets the full list (``<ul id="lines">``, an outer morph) and
  ``{"resumed": false, "pid": ...}``.
- ``POST /append?room=R&text=T``: stores the line, broadcasts ``<li>T</li>`` appended to
  ``#lines``; answers the pid.
"""

from __future__ import annotations

import os
import threading

from flask import Flask, request
from markupsafe import escape

from flask_datastar import SSE, FlaskDatastar, Stream
from flask_datastar.replay import ReplayLog

app = Flask(__name__)
app.config.from_prefixed_env()
app.config["DATASTAR_HEARTBEAT"] = 1.0
datastar = FlaskDatastar(app)
bus = datastar.bus(app)
store = getattr(bus, "client", None)

# Held here: a log in this process lives as long as its registry.
rooms = {
    "big": datastar.registry(app, "resume-big"),
    "small": datastar.registry(app, "resume-small"),
}
rooms["big"].attach_replay(ReplayLog(max_events=1000, max_age=300))
rooms["small"].attach_replay(ReplayLog(max_events=5, max_age=1))

_lines: dict[str, list[str]] = {name: [] for name in rooms}
_lock = threading.Lock()


def room() -> str:
    name = request.args.get("room", "big")
    return name if name in rooms else "big"


def lines(name: str) -> list[str]:
    if store is not None:
        return [line.decode() for line in store.lrange(f"resume-test:{name}", 0, -1)]
    with _lock:
        return list(_lines[name])


def register(gen: Stream) -> None:
    rooms[room()].register(gen)


@app.get("/sse")
@datastar.sse(on_connect=register)
def sse(gen: Stream):
    if not gen.resumed:
        items = "".join(f"<li>{escape(line)}</li>" for line in lines(room()))
        gen.patch_elements(f'<ul id="lines">{items}</ul>')
    gen.patch_signals({"resumed": gen.resumed, "pid": os.getpid()})
    yield gen.sleep(None)


@app.post("/append")
def append():
    name, text = room(), request.args["text"]
    if store is not None:
        store.rpush(f"resume-test:{name}", text)
    else:
        with _lock:
            _lines[name].append(text)
    rooms[name].broadcast(
        SSE.patch_elements(f"<li>{escape(text)}</li>", selector="#lines", mode="append")
    )
    return {"pid": os.getpid()}
