"""The extension's life cycle: init_app, configuration, errors, several apps."""

from __future__ import annotations

import pytest
from flask import Flask

from flask_datastar import FlaskDatastar, SSERegistry
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
