"""The extension's life cycle: init_app, configuration, errors, several apps."""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref

import pytest
from flask import Flask

from flask_datastar import FlaskDatastar, SSERegistry, Stream
from flask_datastar.extension import DEFAULTS


def test_init_app_later_and_defaults() -> None:
    datastar = FlaskDatastar()
    app = Flask(__name__)
    assert "datastar" not in app.extensions
    datastar.init_app(app)
    state = app.extensions["datastar"]
    assert state.extension is datastar
    for key, default in DEFAULTS.items():
        assert app.config[key] == default
    config = datastar.config(app)
    assert config.heartbeat == 15.0
    assert config.max_signals_bytes == 1024 * 1024
    assert config.direct_writes is True
    assert "sse_post" in app.jinja_env.globals and "datastar_url" in app.jinja_env.globals


def test_options_are_defaults_and_config_wins() -> None:
    app = Flask(__name__)
    app.config["DATASTAR_HEARTBEAT"] = 3
    datastar = FlaskDatastar(app, heartbeat=9, max_backlog=2048)
    assert datastar.config(app).heartbeat == 3.0
    assert datastar.config(app).max_backlog == 2048
    assert app.extensions["datastar"].stream_config.heartbeat == 3.0


def test_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASK_DATASTAR_HEARTBEAT", "1")
    monkeypatch.setenv("FLASK_DATASTAR_DIRECT_WRITES", "false")
    app = Flask(__name__)
    app.config.from_prefixed_env()
    datastar = FlaskDatastar(app)
    assert datastar.config(app).heartbeat == 1.0
    assert datastar.config(app).direct_writes is False


def test_double_registration_is_a_clear_error() -> None:
    app = Flask(__name__)
    FlaskDatastar(app)
    with pytest.raises(RuntimeError, match="already been registered on this Flask app"):
        FlaskDatastar(app)


def test_unknown_option() -> None:
    with pytest.raises(TypeError, match="Unknown FlaskDatastar option"):
        FlaskDatastar(heartbeet=1)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("DATASTAR_HEARTBEAT", "soon", "must be a number"),
        ("DATASTAR_HEARTBEAT", -1, "at least 0"),
        ("DATASTAR_MAX_BACKLOG", 10, "at least 1024"),
        ("DATASTAR_DIRECT_WRITES", "maybe", "true or false"),
        ("DATASTAR_MAX_STREAMS", 0, "at least 1"),
    ],
)
def test_bad_config_says_which_key(key: str, value: object, message: str) -> None:
    app = Flask(__name__)
    app.config[key] = value
    with pytest.raises(ValueError, match=f"{key} must") as info:
        FlaskDatastar(app)
    assert message in str(info.value)


def test_not_initialised() -> None:
    datastar = FlaskDatastar()
    with pytest.raises(RuntimeError, match="Did you forget to call 'init_app'"):
        datastar.config(Flask(__name__))


def test_one_instance_several_apps() -> None:
    datastar = FlaskDatastar()
    one, two = Flask("one"), Flask("two")
    one.config["DATASTAR_HEARTBEAT"] = 1
    datastar.init_app(one)
    datastar.init_app(two)
    assert datastar.config(one).heartbeat == 1.0
    assert datastar.config(two).heartbeat == 15.0
    reg_one = datastar.registry(one, "room")
    assert isinstance(reg_one, SSERegistry)
    assert datastar.registry(one, "room") is reg_one
    assert datastar.registry(two, "room") is not reg_one


def test_registry_get_or_create_gives_one_registry_per_name_under_concurrency() -> None:
    app = Flask(__name__)
    datastar = FlaskDatastar(app)
    got: dict[str, list[SSERegistry]] = {}
    previous = sys.getswitchinterval()
    # Switch threads as often as possible, so a check-then-create race shows up.
    sys.setswitchinterval(1e-6)
    try:
        for number in range(100):
            name = f"room-{number}"
            barrier = threading.Barrier(8)
            got[name] = []

            def get(name: str = name, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                got[name].append(datastar.registry(app, name))

            threads = [threading.Thread(target=get) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert {name: len({id(r) for r in registries}) for name, registries in got.items()} == {
        name: 1 for name in got
    }


def test_a_referenced_registry_is_kept_and_an_unused_one_is_collected() -> None:
    app = Flask(__name__)
    datastar = FlaskDatastar(app)
    held = datastar.registry(app, "held", linger=0.05)
    used = datastar.registry(app, "used", linger=0.05)
    tab = used.register(Stream({}))
    used.broadcast("event: x\ndata: y\n\n")  # starts its broadcaster thread
    assert used.flush(5)
    used.unregister(tab)  # as the stream's end does
    collected = weakref.ref(used)
    del used, tab
    deadline = time.monotonic() + 10
    while collected() is not None:  # once its broadcaster thread has gone idle and exited
        assert time.monotonic() < deadline, "the unused registry was never collected"
        gc.collect()
        time.sleep(0.02)
    assert datastar.registry(app, "held") is held
    # A name whose registry was collected gets a new, empty one.
    assert len(datastar.registry(app, "used")) == 0
