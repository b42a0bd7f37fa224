"""Who listens: stream identity, delivery by identity and topic, authorisation, revocation.

The unit tests run streams through Flask's test client; the live test runs
``gunicorn -k gthread -w 3`` with a real ``redis-server`` and reads the streams as raw
HTTP, as a browser tab would.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request, session

from flask_datastar import SSE, FlaskDatastar, SSERegistry, Stream, open_streams
from flask_datastar.bus import LocalBus
from flask_datastar.pytest_plugin import StreamFactory
from tests.helpers import ConnectionClosed, GunicornServer, RawHTTPStream, RedisServer, post


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll *condition* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout} s waiting for {what or condition}.")
        time.sleep(0.02)


def make_app() -> tuple[Flask, FlaskDatastar, SSERegistry, list[Any]]:
    """An app whose streams belong to the session's user; topics come from ``?topic=``."""
    app = Flask(__name__)
    app.config.update(TESTING=True, DATASTAR_HEARTBEAT=0.2, SECRET_KEY="test")
    datastar = FlaskDatastar(app)
    clients = datastar.registry(app, "clients")
    loads: list[Any] = []

    @datastar.identity_loader
    def identity() -> Any:
        user = session.get("user")
        loads.append(user)
        return user

    @datastar.authorizer
    def may_listen(identity: Any, topic: str | None) -> bool:
        if topic is None:
            return identity is not None
        return topic != "admin" or identity == "root"

    @app.post("/login/<user>")
    def login(user: str) -> str:
        session["user"] = user
        return ""

    def connect(gen: Stream) -> None:
        clients.register(gen, topics=request.args.getlist("topic"))

    @app.get("/sse")
    @datastar.sse(on_connect=connect)
    def sse(gen: Stream) -> Any:
        gen.patch_signals({"user": gen.identity})
        yield gen.sleep(None)

    @app.get("/own")
    @datastar.sse(authorize=lambda identity: identity == "alice")
    def own(gen: Stream) -> None:
        gen.patch_signals({"own": True})

    return app, datastar, clients, loads


def datastar_client(app: Flask) -> Any:
    """A test client that sends ``Datastar-Request: true``, as Datastar's actions do."""
    client = app.test_client()
    client.environ_base["HTTP_DATASTAR_REQUEST"] = "true"
    return client


def open_as(datastar_stream: StreamFactory, app: Flask, user: str, path: str = "/sse") -> Any:
    client = datastar_client(app)
    client.post(f"/login/{user}")
    reader = datastar_stream(client, path)
    assert reader.status_code == 200
    assert reader.next_event().signals == {"user": user}
    return reader


def test_identity_is_resolved_once_in_the_view_and_reaches_only_its_tabs(
    datastar_stream: StreamFactory,
) -> None:
    app, _, clients, loads = make_app()
    alice1 = open_as(datastar_stream, app, "alice")
    alice2 = open_as(datastar_stream, app, "alice")
    bob = open_as(datastar_stream, app, "bob")
    assert loads == ["alice", "alice", "bob"]
    assert sorted(clients.identities()) == ["alice", "bob"]
    assert [gen.identity for gen in clients.snapshot(identity="alice")] == ["alice", "alice"]

    clients.send_to_identity("alice", SSE.patch_signals({"for": "alice"}))
    clients.broadcast(SSE.patch_signals({"all": 1}))
    assert alice1.next_event().signals == {"for": "alice"}
    assert alice2.next_event().signals == {"for": "alice"}
    # Bob's next event is the broadcast sent after: Alice's never reached him.
    assert bob.next_event().signals == {"all": 1}
    assert alice1.next_event().signals == {"all": 1}
    # Later sends do not ask who the stream belongs to again.
    assert loads == ["alice", "alice", "bob"]
    with pytest.raises(ValueError, match="needs an identity"):
        clients.send_to_identity(None, SSE.patch_signals({"x": 1}))


def test_a_refused_stream_is_a_401_or_403_with_no_event(datastar_stream: StreamFactory) -> None:
    app, _, clients, _ = make_app()
    anonymous = datastar_client(app).get("/sse")
    assert anonymous.status_code == 401
    assert b"event:" not in anonymous.data and b"data:" not in anonymous.data

    client = datastar_client(app)
    client.post("/login/bob")
    # The app-wide authorizer lets Bob open the stream, the view's own check does not.
    refused = client.get("/own")
    assert refused.status_code == 403 and b"event:" not in refused.data
    # A topic he may not join refuses the whole stream, before on_connect registered it.
    admin = client.get("/sse?topic=admin")
    assert admin.status_code == 403 and b"event:" not in admin.data
    assert len(clients) == 0
    wait_for(lambda: not open_streams(), what="the refused streams to be gone")
    # HEAD is checked as GET is (its topics are not: HEAD runs no on_connect).
    assert datastar_client(app).head("/sse").status_code == 401
    assert client.head("/own").status_code == 403

    alice = datastar_client(app)
    alice.post("/login/alice")
    assert alice.get("/own").status_code == 200
    root = open_as(datastar_stream, app, "root", "/sse?topic=admin")
    assert clients.topics(root.stream) == ["admin"]


def test_publish_reaches_the_topic_and_join_checks_it(datastar_stream: StreamFactory) -> None:
    app, _, clients, _ = make_app()
    news = open_as(datastar_stream, app, "alice", "/sse?topic=news")
    other = open_as(datastar_stream, app, "bob")
    clients.publish("news", SSE.patch_signals({"news": 1}))
    clients.broadcast(SSE.patch_signals({"all": 1}))
    assert news.next_event().signals == {"news": 1}
    assert other.next_event().signals == {"all": 1}

    with app.test_request_context():
        with pytest.raises(Exception) as refused:
            clients.join(other.stream, "admin")
    assert getattr(refused.value, "code", None) == 403
    assert clients.topics(other.stream) == []
    clients.join(other.stream, "news")
    clients.leave(news.stream, "news")
    clients.publish("news", SSE.patch_signals({"news": 2}))
    assert other.next_event().signals == {"news": 2}
    assert news.next_event().signals == {"all": 1}


def test_revoke_ends_every_stream_of_an_identity_after_its_notice(
    datastar_stream: StreamFactory,
) -> None:
    app, datastar, clients, _ = make_app()
    alice1 = open_as(datastar_stream, app, "alice")
    alice2 = open_as(datastar_stream, app, "alice", "/sse?topic=news")
    bob = open_as(datastar_stream, app, "bob")
    gens = [alice1.stream, alice2.stream]

    datastar.revoke(app, "alice", event=SSE.patch_signals({"revoked": True}))
    for reader in (alice1, alice2):
        assert reader.next_event().signals == {"revoked": True}
    wait_for(lambda: all(gen.closed for gen in gens), what="Alice's streams to end")
    assert all(gen._abort for gen in gens)  # abruptly: the tab reconnects and is refused
    # They leave their registries when their end has run (on the scheduler, a moment later).
    wait_for(lambda: clients.identities() == ["bob"], what="Alice's streams to leave")
    assert not bob.stream.closed

    # A topic, through a registry; cleanly this time.
    news = open_as(datastar_stream, app, "bob", "/sse?topic=news")
    clients.revoke(topic="news", reconnect=False)
    wait_for(lambda: news.stream.closed, what="the topic's stream to end")
    assert not news.stream._abort and not bob.stream.closed
    with pytest.raises(ValueError, match="exactly one"):
        clients.revoke(identity="bob", topic="news")


def test_identity_topic_and_revocation_cross_a_bus_as_json() -> None:
    bus = LocalBus()
    here, there = SSERegistry("r", bus=bus), SSERegistry("r", bus=bus)
    try:
        mine, theirs, plain = Stream({}), Stream({}), Stream({})
        mine.identity = theirs.identity = ("team", 7)
        here.register(mine, topics=["t"])
        there.register(theirs)
        there.register(plain)
        here.send_to_identity(("team", 7), SSE.patch_signals({"n": 1}))
        here.publish("t", SSE.patch_signals({"n": 2}))
        here.revoke(identity=("team", 7), reconnect=False)
        assert here.flush() and there.flush()
        assert mine.closed and theirs.closed and not plain.closed
        assert b'"n":1' in mine._transport.take()  # type: ignore[union-attr]
        assert plain._transport.take() == b""  # type: ignore[union-attr]
    finally:
        here.close()
        there.close()


def test_an_unhashable_identity_is_refused_with_a_sentence() -> None:
    app = Flask(__name__)
    datastar = FlaskDatastar(app)
    datastar.identity_loader(lambda: {"id": 1})

    @app.get("/sse")
    @datastar.sse
    def sse(gen: Stream) -> None:
        gen.patch_signals({})

    with app.test_request_context("/sse"):
        with pytest.raises(TypeError, match="not hashable"):
            sse()


# --- three gunicorn workers and Redis ----------------------------------------------------

LIVE_APP = """
import os

import redis
from flask import Flask, request

from flask_datastar import SSE, FlaskDatastar

app = Flask(__name__)
app.config.from_prefixed_env()
app.config["DATASTAR_HEARTBEAT"] = 2.0
datastar = FlaskDatastar(app)
store = redis.Redis.from_url(app.config["DATASTAR_REDIS_URL"])
clients = datastar.registry(app, "clients")


@datastar.identity_loader
def identity():
    return request.headers.get("X-User")  # stands for the session or current_user


@datastar.authorizer
def may_listen(identity, topic):
    if identity is None or store.sismember("revoked", identity):
        return False
    return topic != "admin" or identity == "root"


@app.get("/sse")
@datastar.sse(on_connect=lambda gen: clients.register(gen, topics=request.args.getlist("topic")))
def sse(gen):
    gen.patch_signals({"pid": os.getpid(), "user": gen.identity})
    yield gen.sleep(None)


@app.post("/to/<user>")
def to(user):
    clients.send_to_identity(user, SSE.patch_signals({"for": user}))
    return {"pid": os.getpid()}


@app.post("/topic/<topic>")
def topic(topic):
    clients.publish(topic, SSE.patch_signals({"topic": topic}))
    return {"pid": os.getpid()}


@app.post("/revoke/<user>")
def revoke(user):
    store.sadd("revoked", user)  # the state first, then the revocation
    datastar.revoke(app, user, event=SSE.patch_signals({"revoked": user}))
    return {"pid": os.getpid()}
"""


class Tab:
    """One stream read as a browser tab would, with the worker that holds it."""

    def __init__(self, port: int, user: str, path: str = "/sse") -> None:
        self.user = user
        self.stream = RawHTTPStream(port, path, headers={"X-User": user})
        assert self.stream.status == 200, self.stream.status
        self._events = self.stream.events(timeout=20)
        first = self.next()
        assert first["user"] == user
        self.pid = int(first["pid"])

    def next(self) -> Any:
        while True:
            event = next(self._events)
            if event.event == "datastar-patch-signals":
                return event.signals

    def close(self) -> None:
        self.stream.close()


@pytest.mark.live
@pytest.mark.redis
def test_identities_and_revocation_across_three_workers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "identity_app.py").write_text(textwrap.dedent(LIVE_APP))
    tabs: list[Tab] = []
    env = {"FLASK_DATASTAR_REDIS_URL": redis_server.url}
    try:
        with GunicornServer(
            # More threads than tabs: gunicorn may hand most of them to one worker.
            "identity_app:app",
            workers=3,
            threads=60,
            cwd=tmp_path,
            env=env,
        ) as server:
            workers = set(server.worker_pids())
            # Alice's tabs on every worker, Bob's beside them.
            while {tab.pid for tab in tabs if tab.user == "alice"} != workers:
                if len(tabs) >= 50:
                    pytest.fail(f"Alice's {len(tabs)} tabs never reached all of {workers}.")
                tabs.append(Tab(server.port, "alice" if len(tabs) % 3 else "bob"))
            alice = [tab for tab in tabs if tab.user == "alice"]
            bob = [tab for tab in tabs if tab.user == "bob"]
            news = Tab(server.port, "bob", "/sse?topic=news")
            tabs.append(news)

            # A user's events reach that user's tabs only, on every worker.
            assert post(server.url + "/to/alice")[0] == 200
            assert post(server.url + "/topic/news")[0] == 200
            assert [tab.next() for tab in alice] == [{"for": "alice"}] * len(alice)
            assert news.next() == {"topic": "news"}
            assert post(server.url + "/to/bob")[0] == 200
            # Bob's first event since is his own: neither Alice's nor the topic's reached him.
            assert [tab.next() for tab in bob] == [{"for": "bob"}] * len(bob)
            assert news.next() == {"for": "bob"}

            # Refusals: no identity, a topic not allowed.
            with RawHTTPStream(server.port, "/sse") as anonymous:
                assert anonymous.status == 401
                assert b"event:" not in anonymous.read_body()
            with RawHTTPStream(server.port, "/sse?topic=admin", headers={"X-User": "bob"}) as s:
                assert s.status == 403 and b"event:" not in s.read_body()

            # Revocation: every tab of Alice, on every worker, gets the notice and ends.
            ended: dict[int, float] = {}
            notices: dict[int, Any] = {}

            def watch(index: int, tab: Tab) -> None:
                try:
                    notices[index] = tab.next()
                    tab.next()
                except (ConnectionClosed, StopIteration):
                    ended[index] = time.monotonic()

            watchers = [
                threading.Thread(target=watch, args=(i, tab), daemon=True)
                for i, tab in enumerate(alice)
            ]
            for watcher in watchers:
                watcher.start()
            start = time.monotonic()
            assert post(server.url + "/revoke/alice")[0] == 200
            for watcher in watchers:
                watcher.join(20)
            assert notices == {i: {"revoked": "alice"} for i in range(len(alice))}
            assert sorted(ended) == list(range(len(alice))), "some of Alice's tabs stayed open"
            took = max(ended.values()) - start
            print(f"\nrevoke: {len(alice)} tabs on {len(workers)} workers ended in {took:.3f} s")

            # Her tabs reconnect, and are refused: the Datastar client stops there.
            with RawHTTPStream(server.port, "/sse", headers={"X-User": "alice"}) as again:
                assert again.status == 403 and b"event:" not in again.read_body()
            # Bob's tabs stay live.
            assert post(server.url + "/to/bob")[0] == 200
            assert [tab.next() for tab in bob] == [{"for": "bob"}] * len(bob)
            assert json.loads(post(server.url + "/topic/news")[2])["pid"] in workers
            assert news.next() == {"for": "bob"} and news.next() == {"topic": "news"}
    finally:
        for tab in tabs:
            tab.close()
