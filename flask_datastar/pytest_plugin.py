"""pytest fixtures for testing flask_datastar applications.

pytest loads this plugin by itself once flask_datastar is installed (its ``pytest11``
entry point); ``-p no:flask_datastar`` turns it off. The fixtures:

``datastar_stream``
    ``datastar_stream(client, "/sse")`` opens a stream with Flask's test client and
    returns a :class:`~flask_datastar.testing.StreamReader`, whose waits have real
    timeouts. Every stream is closed after the test, in any order.
``datastar_live_server``
    ``datastar_live_server("myapp:create_app()")`` runs the application under real
    gunicorn gthread on a free port and returns a
    :class:`~flask_datastar.testing.LiveServer`, stopped after the test.
``datastar_cleanup``
    The :class:`~flask_datastar.testing.Cleanup` behind both: after the test it also
    ends the streams the test left open and stops the broadcaster threads of the
    registries of every app the test used. Request it on its own in tests that open
    streams or broadcast some other way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from .testing import Cleanup, LiveServer, StreamReader

if TYPE_CHECKING:
    from flask.testing import FlaskClient

__all__ = [
    "LiveServerFactory",
    "StreamFactory",
    "datastar_cleanup",
    "datastar_live_server",
    "datastar_stream",
]


class StreamFactory(Protocol):
    """The type of the ``datastar_stream`` fixture, for annotations."""

    def __call__(
        self,
        client: FlaskClient,
        path: str,
        *,
        method: str = ...,
        signals: Mapping[str, Any] | None = ...,
        timeout: float = ...,
        **kwargs: Any,
    ) -> StreamReader: ...


class LiveServerFactory(Protocol):
    """The type of the ``datastar_live_server`` fixture, for annotations."""

    def __call__(
        self,
        app: str,
        *,
        threads: int = ...,
        workers: int = ...,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        pythonpath: Sequence[str] = ...,
        config: str | None = ...,
        args: Sequence[str] = ...,
        startup_timeout: float = ...,
    ) -> LiveServer: ...


@pytest.fixture
def datastar_cleanup() -> Iterator[Cleanup]:
    """End what the test left running: readers, live servers, streams, registries' threads.

    Fails the test's teardown when a stream did not end in time or failed with an error
    that the test never read.
    """
    cleanup = Cleanup()
    yield cleanup
    cleanup.close()


@pytest.fixture
def datastar_stream(datastar_cleanup: Cleanup) -> StreamFactory:
    """Open streams with Flask's test client: ``datastar_stream(client, "/sse")``.

    The arguments are those of :func:`~flask_datastar.testing.open_stream`.
    """
    return datastar_cleanup.open_stream


def _importable_folders(request: pytest.FixtureRequest) -> list[str]:
    """The folders from which the test imports the application, for the server's path."""
    folders = [str(request.config.rootpath)]
    test_file = getattr(request.node, "path", None)
    if isinstance(test_file, Path):
        folders.append(str(test_file.parent))
    # What pytest (or a conftest) put on sys.path, such as a "src" folder; not the
    # interpreter's own folders, which the server has anyway.
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    for entry in sys.path:
        real = os.path.realpath(entry) if entry else ""
        if real and os.path.isdir(real) and not any(real.startswith(p) for p in prefixes):
            folders.append(real)
    return list(dict.fromkeys(folders))


@pytest.fixture
def datastar_live_server(
    request: pytest.FixtureRequest, datastar_cleanup: Cleanup
) -> LiveServerFactory:
    """Run the application under gunicorn gthread: ``datastar_live_server("app:app")``.

    The arguments are those of :class:`~flask_datastar.testing.LiveServer`. The server
    starts in the rootdir of the tests, which comes first on its ``PYTHONPATH`` with the
    folders of the test's own imports, so the application imports as it does in the
    test. It is stopped after the test, with every process of its group.
    """

    def start(app: str, **kwargs: Any) -> LiveServer:
        kwargs.setdefault("cwd", str(request.config.rootpath))
        kwargs["pythonpath"] = [*kwargs.get("pythonpath", ()), *_importable_folders(request)]
        return datastar_cleanup.live_server(app, **kwargs)

    return start
