"""A live poll laid out as an app factory with blueprints.

The layout a larger Flask app has::

    examples/factory/
        __init__.py     create_app(): config, init_app, blueprints, per-app state
        extensions.py   datastar = FlaskDatastar() and the registry handle, at import
        poll.py         the "poll" blueprint: the page, the stream, the vote command
        admin.py        the "admin" blueprint: a reset command for the same tabs
        wsgi.py         app = create_app(), for servers that want a module-level app

There is no app at import time, so the registry of open tabs cannot be a
module-level ``datastar.registry(app, "poll")``. ``extensions.py`` declares a
handle instead, ``voters = datastar.registry_handle("poll")``; both
blueprints import it, and each call on it goes to the registry of the app
that serves the request. Every app made by ``create_app()`` (two in one
test process, say) has its own registry and its own poll.

Try it with two tabs: a vote in one shows in both at once, and so does a
reset from the other blueprint. Run it from the repository root::

    flask --app examples.factory run                              # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py 'examples.factory:create_app()'   # http://127.0.0.1:8989/
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from . import admin, poll
from .extensions import datastar


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Make the poll app.

    :param config: settings applied after the ``FLASK_*`` environment
        variables, such as ``{"POLL_OPTIONS": ["tea", "coffee"]}``.
    """
    app = Flask(__name__)
    app.config.from_prefixed_env()
    if config is not None:
        app.config.update(config)
    # Creates the app's registry of every handle declared so far: "poll" here.
    datastar.init_app(app)
    # The state belongs to the app, like its registry: two apps, two polls.
    app.extensions["poll"] = poll.Poll(app.config.get("POLL_OPTIONS", poll.OPTIONS))
    app.register_blueprint(poll.bp)
    app.register_blueprint(admin.bp)
    return app
