"""Registry handles: a registry declared at import, one registry per app behind it.

The layout of an app factory: the extension and the handle are module-level names,
the views live in a blueprint that imports them, and ``create_app()`` may run several
times in one process (as tests do).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Blueprint, Flask, current_app, request

from flask_datastar import SSE, FlaskDatastar, RedisBus, RegistryHandle, SSERegistry, Stream
from flask_datastar.testing import iter_events
from tests.helpers import RedisServer, require_module

datastar = FlaskDatastar()
clients = datastar.registry_handle("clients", linger=0.05)
#: What Datastar's actions send, and the app's CSRF check requires.
DATASTAR = {"Datastar-Request": "true"}

bp = Blueprint("poll", __name__)


@bp.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen: Stream) -> Iterator[object]:
    # Not current_app here: two test-client streams open in one thread share the
    # context stack, so the handler of the first sees the second's app.
    gen.patch_elements('<p id="state">connected</p>')
    yield gen.sleep()


@bp.post("/say")
def say() -> tuple[str, int]:
    text = request.args["text"]
    clients.broadcast(SSE.patch_elements(f'<p id="said">{current_app.name}: {text}</p>'))
    return "", 204


def create_app(name: str) -> Flask:
    app = Flask(name)
    app.config.update(TESTING=True, DATASTAR_HEARTBEAT=0.2)
    datastar.init_app(app)
    app.register_blueprint(bp)
    return app


@pytest.fixture
def apps() -> Iterator[Callable[[str], Flask]]:
    """``apps(name)`` makes an app with :func:`create_app`; their registries are closed after."""
    made: list[Flask] = []

    def make(name: str) -> Flask:
        app = create_app(name)
        made.append(app)
        return app

    yield make
    for app in made:
        clients.for_app(app).close()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_handle_is_each_apps_registry_of_its_name(apps: Callable[[str], Flask]) -> None:
    one, two = apps("one"), apps("two")
    # Bound in init_app: the app's registry of that name is the handle's.
    registry_one = clients.for_app(one)
    assert isinstance(registry_one, SSERegistry) and registry_one.name == "clients"
    assert datastar.registry(one, "clients") is registry_one
    assert registry_one.linger == 0.05
    assert clients.for_app(two) is not registry_one
    assert clients.for_app(one) is registry_one  # the same object on every call
    with one.app_context():
        assert clients.get() is registry_one
        with two.app_context():
            assert clients.get() is clients.for_app(two)
        assert clients.get() is registry_one
    with two.test_request_context("/"):
        assert clients.get() is datastar.registry(two, "clients")


def test_outside_an_app_context_it_says_how_to_fix_it(apps: Callable[[str], Flask]) -> None:
    app = apps("nocontext")
    gen = Stream({})
    calls: list[Callable[[], object]] = [
        clients.get,
        lambda: clients.register(gen),
        lambda: clients.broadcast("event: x\ndata: y\n\n"),
        lambda: clients.send_to("k", "event: x\ndata: y\n\n"),
        lambda: clients.keys(),
        lambda: len(clients),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="needs an application context") as info:
            call()
        assert "for_app(app)" in str(info.value)
    # A thread of one's own, with no context, reaches the registry through for_app.
    got: list[SSERegistry] = []
    thread = threading.Thread(target=lambda: got.append(clients.for_app(app)))
    thread.start()
    thread.join()
    assert got == [datastar.registry(app, "clients")]


def test_streams_registered_through_the_handle_get_their_apps_broadcasts(
    apps: Callable[[str], Flask],
) -> None:
    one, two = apps("one"), apps("two")
    stream_one = iter_events(one.test_client().get("/sse", buffered=False))
    stream_two = iter_events(two.test_client().get("/sse", buffered=False))
    try:
        assert next(stream_one).elements == '<p id="state">connected</p>'
        assert next(stream_two).elements == '<p id="state">connected</p>'
        assert len(clients.for_app(one)) == 1 and len(clients.for_app(two)) == 1

        assert one.test_client().post("/say?text=hi", headers=DATASTAR).status_code == 204
        assert clients.for_app(one).flush()
        assert two.test_client().post("/say?text=ho", headers=DATASTAR).status_code == 204
        assert next(stream_one).elements == '<p id="said">one: hi</p>'
        # Had app one's broadcast reached app two's stream, it would come first.
        assert next(stream_two).elements == '<p id="said">two: ho</p>'
    finally:
        # Streams of the test client hold request contexts: close the newest first.
        stream_two.close()
        stream_one.close()
    # A stream that ended left its registry by itself.
    assert len(clients.for_app(one)) == 0 and len(clients.for_app(two)) == 0


def test_the_handle_keeps_its_registry_alive_between_calls(
    apps: Callable[[str], Flask],
) -> None:
    app = apps("kept")
    registry = clients.for_app(app)
    with app.test_request_context("/"):
        gen = clients.register(Stream({}))
        clients.broadcast("event: x\ndata: y\n\n")  # starts its broadcaster thread
        assert clients.flush()
    assert registry.unregister(gen)  # as the end of the stream does
    kept = weakref.ref(registry)
    del registry, gen
    thread_name = "flask_datastar-broadcaster-clients"
    # Idle, its thread exits after linger: then only the handle holds the registry.
    wait_for(
        lambda: not any(t.name == thread_name for t in threading.enumerate()),
        "the idle broadcaster thread to exit",
    )
    gc.collect()
    assert kept() is not None, "the registry was collected: it would lose its streams"
    assert clients.for_app(app) is kept()
    assert datastar.registry(app, "clients") is kept()


def test_a_discarded_app_is_collected_with_its_registry() -> None:
    # A handle with on_resync: the registry's resync wrapper must not keep the app.
    handle = datastar.registry_handle("resyncing", on_resync=lambda gen: None)
    app = Flask("discarded")
    datastar.init_app(app)
    registry = handle.for_app(app)
    assert registry.on_resync is not None
    gone_app, gone_registry = weakref.ref(app), weakref.ref(registry)
    del app, registry
    gc.collect()
    assert gone_app() is None, "the handle keeps a discarded app alive"
    assert gone_registry() is None


def test_a_handle_declared_after_init_app_binds_on_first_use(
    apps: Callable[[str], Flask],
) -> None:
    app = apps("late")
    late = datastar.registry_handle("late")
    with app.app_context():
        registry = late.get()
    assert registry is datastar.registry(app, "late") is late.for_app(app)
    registry.close()


def test_unregister_needs_no_context_and_finds_the_streams_app(
    apps: Callable[[str], Flask],
) -> None:
    one, two = apps("one"), apps("two")
    gen = Stream({})
    with two.app_context():
        clients.register(gen, key="tab")
    assert gen in clients.for_app(two) and gen not in clients.for_app(one)
    # As in an on_disconnect hook run where there is no context.
    assert clients.unregister(gen) is True
    assert gen not in clients.for_app(two)
    assert clients.unregister(gen) is False


def test_concurrent_first_uses_bind_one_registry() -> None:
    app = Flask("raced")
    datastar.init_app(app)
    handle = datastar.registry_handle("raced")  # after init_app: bound on first use
    got: list[SSERegistry] = []
    barrier = threading.Barrier(8)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def bind() -> None:
        barrier.wait()
        got.append(handle.for_app(app))

    try:
        threads = [threading.Thread(target=bind) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert len({id(registry) for registry in got}) == 1
    assert got[0] is datastar.registry(app, "raced")


def test_a_registry_made_with_other_options_is_an_error_not_a_lost_hook() -> None:
    own = FlaskDatastar()
    app = Flask("mismatch")
    own.init_app(app)
    # Made without on_resync before the handle bound it, and held (else it is collected).
    made = own.registry(app, "alerts")
    handle = own.registry_handle("alerts", on_resync=lambda gen: None)
    with pytest.raises(RuntimeError, match="other options .* than its handle's"):
        handle.for_app(app)
    assert made.on_resync is None
    # Declared before init_app, the handles' own options make the registries.
    other = Flask("declared-first")
    own.init_app(other)
    assert handle.for_app(other).on_resync is not None
    # Two handles of one name with other options clash when an app binds them.
    twin = own.registry_handle("alerts", linger=1)
    with pytest.raises(RuntimeError, match="declare one handle per name"):
        own.init_app(Flask("clash"))
    assert twin.linger == 1


def test_bad_linger_is_refused_at_declaration() -> None:
    with pytest.raises(ValueError, match="'linger' must be a number of seconds"):
        datastar.registry_handle("bad", linger=-1)


def test_on_resync_of_a_handle_runs_in_its_apps_context(redis_server: RedisServer) -> None:
    redis = require_module("redis")
    own = FlaskDatastar()
    seen: list[str] = []
    handle: RegistryHandle = own.registry_handle(
        "resync", on_resync=lambda gen: seen.append(current_app.name)
    )
    one, two = Flask("first"), Flask("second")
    for app in (one, two):
        app.config["DATASTAR_REDIS_URL"] = redis_server.url
        own.init_app(app)
    admin: Any = redis.Redis.from_url(redis_server.url)
    try:
        for app in (one, two):
            with app.app_context():
                handle.register(Stream({}))
        # Each app's bus listener calls its registry's on_resync, from its own thread.
        admin.client_kill_filter(_type="pubsub")
        wait_for(lambda: sorted(seen) == ["first", "second"], "both apps to resync")
    finally:
        admin.close()
        for app in (one, two):
            handle.for_app(app).close()
            bus = own.bus(app)
            assert isinstance(bus, RedisBus)
            bus.close()


def test_current_app_may_stand_for_the_app() -> None:
    # The docs' pattern for registries made on the fly: datastar.registry(current_app, ...).
    own = FlaskDatastar()
    app = Flask("proxied")
    own.init_app(app)
    seen: list[str] = []
    with app.app_context():
        registry = own.registry(
            current_app, "room:1", on_resync=lambda gen: seen.append(current_app.name)
        )
        assert registry is own.registry(app, "room:1")
        handle = own.registry_handle("proxied")
        assert handle.for_app(current_app) is handle.for_app(app)
    assert registry.on_resync is not None
    # The bus calls on_resync from its own thread, where the proxy points at nothing.
    thread = threading.Thread(target=registry.on_resync, args=(Stream({}),))
    thread.start()
    thread.join()
    assert seen == ["proxied"]
