"""The app the concurrency torture test (``tests/test_torture.py``) attacks under gunicorn.

Every event it sends is tagged so the clients can check order and completeness: a
``datastar-patch-signals`` event (or, for some commands, a multi-line
``datastar-patch-elements`` event carrying the same tag as JSON in ``<p id="tag">``)
whose tag is ``{"t": kind, "s": sender, "q": sequence, "ch": channel, ...}``.

- ``GET /sse?cid=&key=&room=&kind=``: a stream. ``on_connect`` counts it under its client
  id ``cid``, registers it in the ``main`` registry under ``key`` and, with ``room``, in
  that room's current registry, and sends ``{"t": "reg", "cid", "pid"}``. The handler
  then sends ``{"t": "path", "path"}`` and an own tick ``{"t": "own", "q": n}`` (n = 1,
  2, ...) every few hundred milliseconds, now and then a large one (bigger than the
  backlog bound, so the owner has to drain); with ``peer=1``, the handler also writes to
  the other streams of its key, uncaught. ``on_disconnect`` counts the end and keeps
  the close reason. ``kind=slow`` and ``kind=stalled`` shrink the socket's send buffer
  so a client that reads slowly fills it quickly.
- ``POST /bcast?s=&q=[&c=label][&pad=n][&html=1]``: ``main.broadcast`` (coalesced with
  ``c``).
- ``POST /unicast?s=&q=&k=key[&c=label]``: ``main.send_to(key, ...)``.
- ``POST /notify?s=&q=&k=key``: ``main.notify_subscriber(key, ...)``: written in this
  request's thread; answers how many streams were reached.
- ``POST /room?s=&q=&r=room``: the room's registry broadcasts.
- ``POST /recycle?r=room``: the room's registry is closed and a new one takes its name.
- ``POST /close?k=key&reconnect=0|1``: ``gen.close(reconnect=...)`` for the key's streams.
- ``POST /empty``: ``main.broadcast("")``, an empty event (refused with 400 if the
  library refuses it).
- ``POST /final?s=&q=&c=label&k=key&fill=n``: ``n`` plain broadcasts to keep the
  broadcaster busy, then ``broadcast(X, coalesce=label)`` and ``send_to(key, Y,
  coalesce=label)``: X must still reach every stream but the key's, and Y the key's.
- ``GET /stats``: this worker's counters (see :func:`stats`).

Every command answers ``{"pid": worker pid, ...}``. Settings come from the environment:
``FLASK_DATASTAR_*`` (the library's configuration), ``TORTURE_ROOMS`` (how many rooms),
``TORTURE_FD_PAD`` (that many ``/dev/null`` descriptors are opened at start, so client
sockets get descriptor numbers above 1024 with few connections, as in a worker holding
a thousand tabs), ``TORTURE_DEBUG`` (when set, flask_datastar's debug log goes to the
server log).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

from flask import Flask, jsonify, request

from flask_datastar import (
    SSE,
    FlaskDatastar,
    SSERegistry,
    Stream,
    open_streams,
)
from flask_datastar.stream import process_stream_limit

log = logging.getLogger("flask_datastar")
DEBUG = bool(os.environ.get("TORTURE_DEBUG"))

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)

# Held for the life of the worker: only their numbers matter (see the module docstring).
_FD_PAD = [
    os.open(os.devnull, os.O_RDONLY) for _ in range(int(os.environ.get("TORTURE_FD_PAD", "0")))
]
ROOM_NAMES = [f"room{i}" for i in range(int(os.environ.get("TORTURE_ROOMS", "3")))]
SMALL_SNDBUF = 4096
OWN_TICK = 0.3
# Bigger than any DATASTAR_MAX_BACKLOG the test sets: the owner must drain it itself.
OWN_BIG = 80 * 1024

lock = threading.Lock()
connects: collections.Counter[str] = collections.Counter()
disconnects: collections.Counter[str] = collections.Counter()
reasons: dict[str, str] = {}
# on_disconnect before on_connect, or a second on_disconnect: (cid, what) pairs.
anomalies: list[list[str]] = []
max_open = [0]
rooms: dict[str, SSERegistry] = {}
closed_rooms: list[SSERegistry] = []


def _resync(channel: str) -> Any:
    def resync(gen: Stream) -> None:
        # The bus lost messages: the stream gets a mark, so the client knows that
        # events published before it may be missing.
        gen.patch_signals({"t": "resync", "ch": channel})

    return resync


main = datastar.registry(app, "main", on_resync=_resync("main"))


def _new_room(name: str) -> SSERegistry:
    return SSERegistry(name, bus=datastar.bus(app), on_resync=_resync("room"))


for _name in ROOM_NAMES:
    rooms[_name] = _new_room(_name)


def _query(gen: Stream) -> dict[str, str]:
    query = parse_qs(str(gen.environ.get("QUERY_STRING", "")))
    return {name: values[0] for name, values in query.items()}


def tag_event(tag: dict[str, Any], pad: int = 0, html: bool = False) -> str:
    """Return an event carrying *tag*, padded with *pad* bytes of filler."""
    if html:
        lines = "\n".join("<i>" + "x" * 60 + "</i>" for _ in range(pad // 67 + 1))
        return SSE.patch_elements(
            f'<p id="tag">{json.dumps(tag)}</p>\n<div id="pad">\n{lines}\n</div>'
        )
    if pad:
        tag = {**tag, "pad": "x" * pad}
    return SSE.patch_signals(tag)


def connect(gen: Stream) -> None:
    query = _query(gen)
    cid = query.get("cid", "?")
    with lock:
        if connects[cid] or disconnects[cid]:
            anomalies.append([cid, "on_connect ran twice or after on_disconnect"])
        connects[cid] += 1
        max_open[0] = max(max_open[0], len(open_streams()))
    sock = gen.environ.get("gunicorn.socket")
    if query.get("kind") in ("slow", "stalled") and isinstance(sock, socket.socket):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
    main.register(gen, key=query.get("key") or None)
    room = query.get("room")
    if room in rooms:
        with lock:
            registry = rooms[room]
        registry.register(gen)
    gen.patch_signals({"t": "reg", "cid": cid, "pid": os.getpid()})


def disconnect(gen: Stream) -> None:
    cid = _query(gen).get("cid", "?")
    if DEBUG:
        # Names the client, which flask_datastar's own line about the end cannot.
        log.debug(
            "torture: %s (%s) on the %s path ended: %s",
            cid,
            _query(gen).get("kind"),
            gen.path,
            gen.close_reason,
        )
    with lock:
        if connects[cid] != 1 or disconnects[cid]:
            anomalies.append(
                [
                    cid,
                    f"on_disconnect with {connects[cid]} connect(s) and"
                    f" {disconnects[cid]} earlier disconnect(s)",
                ]
            )
        disconnects[cid] += 1
        reasons[cid] = gen.close_reason


@app.get("/sse")
@datastar.sse(on_connect=connect, on_disconnect=disconnect)
def sse(gen: Stream) -> Iterator[Any]:
    gen.patch_signals({"t": "path", "path": gen.path})
    key, peer = request.args.get("key"), request.args.get("peer") == "1"
    n = 0
    while True:
        yield gen.sleep(OWN_TICK)
        n += 1
        big = request.args.get("kind") == "slow" and n % 5 == 0
        gen.patch_signals({"t": "own", "q": n, "pad": "x" * OWN_BIG if big else ""})
        if peer and key:
            # As a chat handler writing to the other tabs of its user: one of them may
            # have left, and its StreamClosed is not this stream's end.
            for other in main.snapshot(key):
                if other is not gen:
                    other.patch_signals({"t": "peer"})


def _tag(kind: str, channel: str) -> dict[str, Any]:
    tag = {"t": kind, "s": request.args["s"], "q": int(request.args["q"]), "ch": channel}
    if request.args.get("c"):
        tag["c"] = request.args["c"]
    return tag


def _answer(**extra: Any) -> Any:
    return jsonify(pid=os.getpid(), **extra)


@app.post("/bcast")
def bcast() -> Any:
    pad = int(request.args.get("pad", "0"))
    html = request.args.get("html") == "1"
    main.broadcast(tag_event(_tag("b", "main"), pad, html), coalesce=request.args.get("c"))
    return _answer()


@app.post("/unicast")
def unicast() -> Any:
    event = tag_event(_tag("u", "main"), html=request.args.get("html") == "1")
    main.send_to(request.args["k"], event, coalesce=request.args.get("c"))
    return _answer()


@app.post("/notify")
def notify() -> Any:
    event = tag_event(_tag("n", "notify"))
    reached = main.notify_subscriber(request.args["k"], lambda gen: gen.send(event))
    return _answer(reached=reached)


@app.post("/room")
def room() -> Any:
    with lock:
        registry = rooms[request.args["r"]]
    registry.broadcast(tag_event(_tag("r", "room")))
    return _answer()


@app.post("/recycle")
def recycle() -> Any:
    name = request.args["r"]
    with lock:
        old = rooms[name]
        rooms[name] = _new_room(name)
        closed_rooms.append(old)
    old.close()
    return _answer()


@app.post("/close")
def close() -> Any:
    reconnect = request.args.get("reconnect") == "1"
    streams = main.snapshot(request.args["k"])
    for gen in streams:
        gen.close(reconnect=reconnect)
    return _answer(closed=len(streams))


@app.post("/empty")
def empty() -> Any:
    try:
        main.broadcast("")
    except (ValueError, TypeError) as e:
        return _answer(refused=str(e)), 400
    return _answer()


@app.post("/final")
def final() -> Any:
    sender, seq = request.args["s"], int(request.args["q"])
    label, key = request.args["c"], request.args["k"]
    for i in range(int(request.args.get("fill", "0"))):
        main.broadcast(tag_event({"t": "b", "s": sender, "q": seq + i, "ch": "main"}))
    seq += int(request.args.get("fill", "0"))
    main.broadcast(
        tag_event({"t": "fx", "s": sender, "q": seq, "ch": "main", "c": label}), coalesce=label
    )
    main.send_to(
        key,
        tag_event({"t": "fy", "s": sender, "q": seq + 1, "ch": "main", "c": label}),
        coalesce=label,
    )
    return _answer()


@app.get("/stats")
def stats() -> Any:
    """This worker's counters: streams open and registered, hooks, threads."""
    with lock:
        live_rooms = dict(rooms)
        old_rooms = list(closed_rooms)
        counts = {
            "connects": dict(connects),
            "disconnects": dict(disconnects),
            "reasons": dict(reasons),
            "anomalies": list(anomalies),
            "max_open": max_open[0],
        }
    return _answer(
        open=len(open_streams()),
        registered=len(main),
        rooms={name: len(registry) for name, registry in live_rooms.items()},
        closed_rooms=sum(len(registry) for registry in old_rooms),
        stream_limit=process_stream_limit(),
        threads=sorted(thread.name for thread in threading.enumerate()),
        **counts,
    )


if DEBUG:
    # A diagnostic (see tests/test_torture.py): flask_datastar's debug log, one line per
    # stream end among others, goes to stderr, which is the gunicorn log.
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s DEBUG %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.DEBUG)
