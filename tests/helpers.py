"""Test infrastructure: real servers on loopback ports, a strict raw HTTP client, tools.

Everything here starts real processes (gunicorn, redis-server) or speaks raw HTTP/1.1 so
the live tests see what a browser would see. Each server is a context manager that stops
its processes on exit, also when the test fails.

A missing tool skips the test on a developer's machine and fails it on CI
(``CI=true``), where a skip would hide that the suite did not run.
"""

from __future__ import annotations

import hashlib
import importlib
import json as jsonlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, NoReturn

import pytest

from flask_datastar.testing import ServerSentEvent, SSEParser

__all__ = [
    "ConnectionClosed",
    "GunicornServer",
    "HeaderDict",
    "ProtocolError",
    "RawHTTPStream",
    "RedisServer",
    "REPO_ROOT",
    "datastar_js",
    "free_port",
    "get_json",
    "make_self_signed_cert",
    "post",
    "process_alive",
    "require_module",
    "require_tool",
    "wait_for",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root, put on ``PYTHONPATH`` of the servers started here."""

# Where each tool or module comes from, for the message that asks to install it.
_DEBIAN_PACKAGES = {
    "redis-server": "redis-server",
    "chromium": "chromium",
    "openssl": "openssl",
}
_PYPI_PACKAGES = {
    "gunicorn": "gunicorn",
    "playwright": "playwright",
    "redis": "redis",
}


def _missing(message: str) -> NoReturn:
    """Fail on CI, where a skipped test would hide a broken setup, and skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_tool(name: str, package: str | None = None) -> str:
    """Return the path of an executable, or skip the test (fail it on CI) without it.

    :param name: The executable, looked up on ``PATH``.
    :param package: The Debian package that provides it, for the message; defaults to a
        known package for ``name`` or to ``name`` itself.
    """
    path = shutil.which(name)
    if path is None:
        package = package or _DEBIAN_PACKAGES.get(name, name)
        _missing(
            f"'{name}' is not on PATH. Install the Debian package '{package}'"
            f" ('apt-get install {package}'), as .ci/run does."
        )
    return path


def require_module(name: str, package: str | None = None) -> ModuleType:
    """Import and return a module, or skip the test (fail it on CI) without it.

    :param name: The module to import, such as ``"playwright.sync_api"``.
    :param package: The PyPI package that provides it, for the message; defaults to a
        known package for the top-level name or to that name itself.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.partition(".")[0]
        package = package or _PYPI_PACKAGES.get(top, top)
        _missing(
            f"Cannot import '{name}' ({exc}). Install the PyPI package '{package}'"
            f" ('python -m pip install -e \".[test]\"' installs all test dependencies)."
        )


def process_alive(pid: int) -> bool:
    """Return whether a process exists and is not a zombie.

    A zombie counts as gone: it runs no code and holds no socket, and an orphan's zombie
    may linger where PID 1 does not reap.

    :param pid: The process id.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The command name in parentheses may contain spaces; the state follows the last ")".
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Return the ids of the living child processes of ``pid``, in ascending order."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry.name))
    return sorted(children)


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM a process, wait up to ``grace`` seconds, then SIGKILL it and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Create a self-signed certificate for 127.0.0.1 with the ``openssl`` tool.

    :param directory: Where to write ``cert.pem`` and ``key.pem``.
    :return: The certificate file and the key file, for :class:`GunicornServer`.
    """
    openssl = require_tool("openssl")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(keyfile), "-out", str(certfile),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return certfile, keyfile


def _gunicorn_no_control_socket() -> list[str]:
    """Return the option that turns off gunicorn's control socket, where it has one.

    Recent gunicorn releases (27 here) listen on ``~/.gunicorn/gunicorn.ctl`` by default:
    servers running side by side, or a restart racing its predecessor, would fight over it.
    """
    try:
        config = importlib.import_module("gunicorn.config")
    except ImportError:
        return []
    for setting in getattr(config, "KNOWN_SETTINGS", ()):
        if "--no-control-socket" in (getattr(setting, "cli", None) or ()):
            return ["--no-control-socket"]
    return []


_READY_MARKER = "GunicornServer: application loaded in worker"

# gunicorn logs "Booting worker" before the worker imports the application, so an app
# that fails to import would look ready. This config file logs a line after the import
# (post_worker_init runs after it), wrapping the hook of the test's own config, if any.
# Passing it explicitly also stops gunicorn from picking up ./gunicorn.conf.py unasked.
_CONFIG_TEMPLATE = """\
# Written by tests.helpers.GunicornServer.
import runpy as _runpy

_config = {config!r}
_settings = _runpy.run_path(_config) if _config else {{}}
globals().update({{k: v for k, v in _settings.items() if not k.startswith("__")}})
_user_post_worker_init = _settings.get("post_worker_init")


def post_worker_init(worker):
    if _user_post_worker_init is not None:
        _user_post_worker_init(worker)
    worker.log.info("{marker} %s", worker.pid)
"""


class GunicornServer:
    """A real gunicorn master with gthread workers on a loopback port.

    ::

        with GunicornServer("tests.live_apps.hello:app", workers=2) as server:
            status, headers, body = post(server.url + "/echo", json={"a": 1})

    The repository root is put first on ``PYTHONPATH`` so ``app_spec`` can name a module
    of the repository. The server's output goes to a temporary log file, removed on exit;
    errors raised here quote it. The server counts as started when every worker has
    imported the application (a ``post_worker_init`` hook logs it) and the port accepts
    connections. A ``gunicorn.conf.py`` in ``cwd`` is not read unless passed as
    ``config``; command line options (``--bind``, ``--workers``, ...) override it.

    :param app_spec: The WSGI application, as ``module:variable``.
    :param workers: Worker processes.
    :param threads: Threads per worker; one open stream holds one thread.
    :param port: The port to bind; a free one when ``None``.
    :param cwd: The working directory of the server; the repository root when ``None``.
    :param env: Variables set over ``os.environ`` for the server.
    :param extra_args: More command line options, placed before ``app_spec``; not
        ``-c``/``--config``, which is ``config``.
    :param config: A gunicorn config file (relative to ``cwd``) whose settings and hooks
        apply, such as ``"gunicorn.conf.py"``.
    :param certfile: A PEM certificate, to serve HTTPS (with ``keyfile``).
    :param keyfile: The certificate's private key.
    :param startup_timeout: Seconds to wait for the port and every worker.
    """

    def __init__(
        self,
        app_spec: str,
        *,
        workers: int = 1,
        threads: int = 4,
        port: int | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        config: str | os.PathLike[str] | None = None,
    ) -> None:
        if (certfile is None) != (keyfile is None):
            raise ValueError("Pass both 'certfile' and 'keyfile' to serve HTTPS, or neither.")
        if any(arg in ("-c", "--config") or arg.startswith("--config=") for arg in extra_args):
            raise ValueError(
                "Pass the gunicorn config file as 'config=', not in 'extra_args': the"
                " server needs its own config file to see when the workers are ready."
            )
        self.app_spec = app_spec
        self.workers = workers
        self.threads = threads
        self.port = port if port is not None else free_port()
        self.cwd = Path(cwd) if cwd is not None else REPO_ROOT
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.certfile = certfile
        self.keyfile = keyfile
        self.startup_timeout = startup_timeout
        self.config = None if config is None else (self.cwd / config).resolve()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        """The base URL, such as ``http://127.0.0.1:40123``, without a trailing slash."""
        scheme = "https" if self.certfile is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _config_file(self) -> Path:
        assert self._log_dir is not None
        path = Path(self._log_dir.name) / "gunicorn_test.conf.py"
        config = None if self.config is None else str(self.config)
        path.write_text(_CONFIG_TEMPLATE.format(config=config, marker=_READY_MARKER))
        return path

    def command(self) -> list[str]:
        """Return the command line that starts the server (once it has been started)."""
        config_file = "" if self._log_dir is None else str(self._config_file())
        tls: list[str] = []
        if self.certfile is not None and self.keyfile is not None:
            tls = ["--certfile", os.fspath(self.certfile), "--keyfile", os.fspath(self.keyfile)]
        return [
            sys.executable, "-m", "gunicorn",
            "-k", "gthread",
            "--workers", str(self.workers),
            "--threads", str(self.threads),
            "--bind", f"127.0.0.1:{self.port}",
            "--graceful-timeout", "2",
            "--log-level", "info",
            "--config", config_file,
            *_gunicorn_no_control_socket(),
            *tls,
            *self.extra_args,
            self.app_spec,
        ]  # fmt: skip

    def _environ(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def log_text(self) -> str:
        """Return everything the server has written to its log, over all its starts."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """Return the process ids of the living workers, in ascending order."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return _children(self.proc.pid)

    def start(self, bind_retry: float = 5.0) -> None:
        """Start the server and wait until its port accepts and every worker is ready.

        :param bind_retry: Seconds during which a start that fails because the port is
            still in use is tried again.
        :raises RuntimeError: The server exited or was not ready in time; the message
            holds its log.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("The server is already running; call 'stop()' first.")
        if self._log_dir is None:
            self._log_dir = tempfile.TemporaryDirectory(prefix="gunicorn-")
            self._log_path = Path(self._log_dir.name) / "gunicorn.log"
        bind_deadline = time.monotonic() + bind_retry
        while True:
            try:
                self._start_once()
                return
            except _PortInUse:
                if time.monotonic() > bind_deadline:
                    raise RuntimeError(
                        f"Port {self.port} stayed in use for {bind_retry} s; another"
                        f" process holds it. Server log:\n{self.log_text()}"
                    ) from None
                time.sleep(0.2)

    def _start_once(self) -> None:
        assert self._log_path is not None
        self._log_offset = len(self.log_text())
        with self._log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self._environ(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            log_now = self.log_text()[self._log_offset :]
            if self.proc.poll() is not None:
                if "Address already in use" in log_now or "Connection in use" in log_now:
                    raise _PortInUse
                raise RuntimeError(
                    f"gunicorn exited with status {self.proc.returncode} while starting"
                    f" {self.app_spec!r}. Server log:\n{self.log_text()}"
                )
            booted = log_now.count("Booting worker")
            ready = log_now.count(_READY_MARKER)
            if booted >= self.workers and ready >= self.workers and _port_accepts(self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"gunicorn did not get {self.workers} worker(s) ready on port"
                    f" {self.port} within {self.startup_timeout} s ({booted} booted,"
                    f" {ready} loaded the application). Server log:\n{self.log_text()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server: SIGTERM, up to 10 s of grace, then SIGKILL; safe to repeat.

        Workers still alive after the master is gone (which happens only when the master
        had to be killed) are killed too, so no process outlives the test.
        """
        if self.proc is None:
            return
        workers = self.worker_pids()
        _terminate(self.proc, grace=10.0)
        for pid in workers:
            if process_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def restart(self) -> None:
        """Stop the server and start it again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its log."""
        self.stop()
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None
            self._log_path = None

    def __enter__(self) -> GunicornServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _PortInUse(Exception):
    """The server exited because its port was taken; the start may be tried again."""


class RedisServer:
    """A real ``redis-server`` on a free loopback port, without persistence.

    ::

        with RedisServer() as redis:
            client = redis_py.Redis.from_url(redis.url)

    :param port: The port to bind; a free one when ``None``.
    :param startup_timeout: Seconds to wait until the server answers ``PING``.
    """

    def __init__(self, port: int | None = None, startup_timeout: float = 10.0) -> None:
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """The URL of database 0, such as ``redis://127.0.0.1:40123/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def log_text(self) -> str:
        """Return everything the server has written to its log."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ping(self, timeout: float = 1.0) -> bool:
        """Return whether the server answers ``PING`` with ``+PONG``.

        :param timeout: Seconds to wait for the connection and the answer.
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                reply = b""
                while not reply.endswith(b"\r\n"):
                    data = sock.recv(64)
                    if not data:
                        return False
                    reply += data
                return reply == b"+PONG\r\n"
        except OSError:
            return False

    def start(self) -> None:
        """Start the server and wait until it answers ``PING``.

        A port left in ``TIME_WAIT`` by the previous run is tried again until the
        startup time runs out.

        :raises RuntimeError: The server exited or did not answer in time; the message
            holds its log.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("The server is already running; call 'stop()' first.")
        executable = require_tool("redis-server")
        offset = len(self.log_text())
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="redis-")
        workdir = Path(self._dir.name)
        command = [
            executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
        ]  # fmt: skip
        deadline = time.monotonic() + self.startup_timeout
        while True:
            with (workdir / "redis.log").open("ab") as log:
                self.proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self.ping(timeout=0.5):
                    return
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not answer PING on port {self.port} within"
                    f" {self.startup_timeout} s. Server log:\n{self.log_text()}"
                )
            in_use = "Address already in use" in self.log_text()[offset:]
            if not in_use or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server exited with status {self.proc.returncode} while"
                    f" starting on port {self.port}. Server log:\n{self.log_text()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server: SIGTERM, up to 10 s of grace, then SIGKILL; safe to repeat."""
        if self.proc is not None:
            _terminate(self.proc, grace=10.0)

    def restart(self) -> None:
        """Stop the server and start it again on the same port, with no data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# The Datastar client for browser tests; see shared/docs/datastar-protocol.md,
# "Loading the client". No registry ships the unmodified 1.0.x bundle.
_STARHTML_REQUIREMENT = "starhtml==0.7.0"
_STARHTML_WHEEL = "starhtml-0.7.0-py3-none-any.whl"
_STARHTML_WHEEL_SHA256 = "3515ac3a21f1be7ce3e724b45440ed2be20d3afcdb60f92f6ebbfaec883d3ea2"
_DATASTAR_MEMBER = "starhtml/static/js/datastar-core.js"
_DATASTAR_SHA256 = "31c8c9efb895beadeba5f73407c3ca60201dee321c5dea56c182817b475bde9f"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flask_datastar-tests"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def datastar_js() -> Path:
    """Return a cached copy of the Datastar client (1.0.1 as shipped in starhtml 0.7.0).

    The first call downloads the ``starhtml`` wheel from PyPI with ``pip download`` (it
    is not installed: it needs Python 3.12), checks the wheel's and the member's sha256
    and extracts ``datastar-core.js`` into ``~/.cache/flask_datastar-tests/``. Later
    calls return the cached file after checking its hash. A failed download skips the
    test (fails it on CI); a hash mismatch always fails it.
    """
    cache = _cache_dir()
    target = cache / "datastar-core-starhtml-0.7.0.js"
    if target.exists() and _sha256(target) == _DATASTAR_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / _STARHTML_WHEEL
    if not wheel.exists() or _sha256(wheel) != _STARHTML_WHEEL_SHA256:
        with tempfile.TemporaryDirectory(dir=cache) as download_dir:
            result = subprocess.run(
                [
                    sys.executable, "-m", "pip", "download", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12",
                    "--disable-pip-version-check", "--dest", download_dir,
                    _STARHTML_REQUIREMENT,
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )  # fmt: skip
            downloaded = Path(download_dir) / _STARHTML_WHEEL
            if result.returncode != 0 or not downloaded.exists():
                _missing(
                    f"Could not download {_STARHTML_REQUIREMENT} from PyPI for the Datastar"
                    f" client; check the network or the pip configuration. pip said:\n"
                    f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
                )
            digest = _sha256(downloaded)
            if digest != _STARHTML_WHEEL_SHA256:
                pytest.fail(
                    f"The downloaded {_STARHTML_WHEEL} has sha256 {digest}, not"
                    f" {_STARHTML_WHEEL_SHA256}. Do not use it; find out what PyPI served.",
                    pytrace=False,
                )
            os.replace(downloaded, wheel)
    with zipfile.ZipFile(wheel) as archive:
        content = archive.read(_DATASTAR_MEMBER)
    digest = hashlib.sha256(content).hexdigest()
    if digest != _DATASTAR_SHA256:
        pytest.fail(
            f"{_DATASTAR_MEMBER} in {wheel} has sha256 {digest}, not {_DATASTAR_SHA256}."
            " Delete the cached wheel to download it again.",
            pytrace=False,
        )
    # Written under a unique name and renamed, so parallel test runs never read half a file.
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    partial.write_bytes(content)
    os.replace(partial, target)
    return target


class ProtocolError(Exception):
    """The server broke HTTP/1.1 framing (status line, headers or chunked encoding)."""


class ConnectionClosed(ConnectionError):
    """The server closed the connection before the response was complete."""


class HeaderDict(Mapping[str, str]):
    """Response headers looked up without regard to case; repeated fields are joined.

    :param fields: The ``(name, value)`` pairs in the order received.
    """

    def __init__(self, fields: Sequence[tuple[str, str]] = ()) -> None:
        self.fields = list(fields)
        """Every field as received, with repeats, for tests that count them."""
        self._values: dict[str, str] = {}
        for name, value in self.fields:
            key = name.lower()
            self._values[key] = f"{self._values[key]}, {value}" if key in self._values else value

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"HeaderDict({self.fields!r})"


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2}) [\x09\x20-\x7e\x80-\xff]*")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_MAX_HEAD = 64 * 1024
_MAX_SIZE_LINE = 32


class RawHTTPStream:
    """A strict HTTP/1.1 client on a raw socket, for reading live event streams.

    Sends one request on connect, reads the status line and headers, then lets the test
    read the body exactly as framed on the wire: a chunked body chunk by chunk with a
    decoder that raises :class:`ProtocolError` on any deviation, so a torn or misaligned
    chunk shows up instead of being smoothed over as a library client would::

        with RawHTTPStream(server.port, "/updates") as stream:
            assert stream.status == 200 and stream.chunked
            first = next(stream.events(timeout=5))

    :param port: The server's port on ``host``.
    :param path: The request target, such as ``"/updates?x=1"``.
    :param method: The request method.
    :param headers: Request headers; ``Host`` and ``Content-Length`` are added unless set.
    :param http_version: ``"HTTP/1.1"``, or ``"HTTP/1.0"`` to get an unframed body.
    :param rcvbuf: ``SO_RCVBUF`` in bytes, set before connecting so the TCP window stays
        small; with a test that does not read, the server's writes soon block.
    :param host: The server's address.
    :param body: A request body.
    :param timeout: Seconds to wait for the connection and the response head.
    :param tls: Speak HTTPS without verifying the certificate (loopback test servers).
    """

    def __init__(
        self,
        port: int,
        path: str,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        http_version: str = "HTTP/1.1",
        rcvbuf: int | None = None,
        *,
        host: str = "127.0.0.1",
        body: bytes | None = None,
        timeout: float = 10.0,
        tls: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.http_version = http_version
        self.timeout = timeout
        self.status = 0
        self.reason = ""
        self.headers = HeaderDict()
        self._buffer = bytearray()
        self._parser = SSEParser()
        self._body_done = True
        self._body_remaining: int | None = None
        self._closed = False
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        """The connected socket, for tests that need lower-level control."""
        try:
            self.request(method, path, headers, body)
        except BaseException:
            self.close()
            raise

    @property
    def chunked(self) -> bool:
        """Whether the response body uses chunked transfer encoding."""
        coding = self.headers.get("Transfer-Encoding", "")
        return coding.rpartition(",")[2].strip().lower() == "chunked"

    @property
    def content_length(self) -> int | None:
        """The ``Content-Length`` of the response, or ``None`` when it has none."""
        value = self.headers.get("Content-Length")
        return None if value is None else int(value)

    @property
    def comments(self) -> int:
        """How many comment lines (heartbeats) :meth:`events` has read so far."""
        return self._parser.comments

    @property
    def parser(self) -> SSEParser:
        """The parser :meth:`events` feeds, for ``last_event_id`` and ``retry``."""
        return self._parser

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        """Send a request on this connection and read the response's status and headers.

        Reusing the connection requires the previous response to be read to its end,
        for a chunked body up to the terminating chunk.

        :param method: The request method.
        :param path: The request target.
        :param headers: Request headers; ``Host`` and ``Content-Length`` are added unless
            set.
        :param body: A request body.
        :raises ProtocolError: The status line or a header line is malformed.
        """
        if not self._body_done:
            raise RuntimeError(
                "The previous response is not read to its end. Call 'read_body()', or"
                " 'read_chunk()' until it returns None, before sending another request."
            )
        fields = dict(headers or {})
        names = {name.lower() for name in fields}
        lines = [f"{method} {path} {self.http_version}"]
        if "host" not in names:
            lines.append(f"Host: {self.host}:{self.port}")
        if body is not None and "content-length" not in names:
            lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{name}: {value}" for name, value in fields.items())
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(head + (body or b""))
        self._parser = SSEParser()
        self._read_head(method)

    def _recv(self, deadline: float, context: str) -> None:
        """Append what the socket has to the buffer, waiting until ``deadline`` at most."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Timed out waiting for {context}.")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"Timed out waiting for {context}.") from None
        except (ConnectionResetError, ssl.SSLEOFError) as exc:
            raise ConnectionClosed(f"The server reset the connection while {context}.") from exc
        if not data:
            raise ConnectionClosed(f"The server closed the connection before {context}.")
        self._buffer += data

    def _read_head(self, method: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end != -1:
                break
            if len(self._buffer) > _MAX_HEAD:
                raise ProtocolError(f"The response head is longer than {_MAX_HEAD} bytes.")
            self._recv(deadline, "the response status line and headers")
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        lines = head.split(b"\r\n")
        for line in lines:
            if b"\r" in line or b"\n" in line:
                raise ProtocolError(f"Response head line {line!r} has a bare CR or LF.")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise ProtocolError(f"Malformed status line {lines[0]!r}.")
        self.status = int(match.group(1))
        self.reason = lines[0].split(b" ", 2)[2].decode("latin-1")
        fields = []
        for line in lines[1:]:
            field_match = _HEADER_LINE.fullmatch(line)
            if field_match is None:
                raise ProtocolError(f"Malformed header line {line!r} (folded or no colon).")
            name, value = field_match.groups()
            fields.append((name.decode("latin-1"), value.decode("latin-1")))
        self.headers = HeaderDict(fields)
        if "Transfer-Encoding" in self.headers and "Content-Length" in self.headers:
            raise ProtocolError("The response has both Transfer-Encoding and Content-Length.")
        if self.content_length is not None and self.content_length < 0:
            raise ProtocolError(f"Negative Content-Length {self.content_length}.")
        no_body = (
            method == "HEAD"
            or self.status in (204, 304)
            or self.status < 200
            or self.content_length == 0
        )
        self._body_done = no_body
        self._body_remaining = None if no_body or self.chunked else self.content_length

    def read_chunk(self, timeout: float = 10.0) -> bytes | None:
        """Return the data of the next chunk, or ``None`` at the terminating chunk.

        Strict: the size line is hex digits (no extensions) ending in exactly CRLF, the
        data is exactly that long and is followed by exactly CRLF, and the terminating
        ``0\\r\\n`` is followed by CRLF (no trailers). After the terminating chunk every
        call returns ``None``.

        :param timeout: Seconds to wait for the whole chunk.
        :raises ProtocolError: The framing deviates; the message shows the bytes.
        :raises ConnectionClosed: The server closed the connection before the
            terminating chunk.
        :raises TimeoutError: The chunk did not arrive in time; what arrived is kept, so
            the call may be repeated.
        """
        if not self.chunked:
            raise RuntimeError("The response is not chunked; use 'read_until_close()'.")
        if self._body_done:
            return None
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._parse_chunk()
            if parsed is not None:
                consumed, data = parsed
                del self._buffer[:consumed]
                if data is None:
                    self._body_done = True
                return data
            context = "the rest of a chunk" if self._buffer else "the next chunk"
            self._recv(deadline, context)

    def _parse_chunk(self) -> tuple[int, bytes | None] | None:
        """Parse one chunk at the start of the buffer without consuming it.

        :return: ``(bytes consumed, data or None for the last chunk)``, or ``None`` when
            more bytes are needed.
        """
        buffer = self._buffer
        line_end = buffer.find(b"\r\n")
        size_line = bytes(buffer if line_end == -1 else buffer[:line_end])
        # Judge what has arrived so far, so a broken size line fails at once.
        pending_cr = line_end == -1 and size_line.endswith(b"\r")
        digits = size_line[:-1] if pending_cr else size_line
        if any(byte not in _HEX for byte in digits) or len(digits) > _MAX_SIZE_LINE:
            raise ProtocolError(
                f"Bad chunk size line {size_line[:40]!r}: expected hex digits and CRLF."
            )
        if line_end == -1:
            return None
        if not digits:
            raise ProtocolError("Empty chunk size line.")
        size = int(digits, 16)
        start = line_end + 2
        end = start + size
        trailer = bytes(buffer[end : end + 2])
        if trailer != b"\r\n"[: len(trailer)]:
            what = "the terminating chunk" if size == 0 else f"a chunk of {size} bytes"
            raise ProtocolError(
                f"Expected CRLF after {what}, got {trailer!r} (chunk data"
                f" {bytes(buffer[start:end])[-40:]!r})."
            )
        if len(trailer) < 2:
            return None
        return end + 2, (bytes(buffer[start:end]) if size else None)

    def read_until_close(self, timeout: float = 10.0) -> bytes:
        """Return the rest of a body that ends when the server closes the connection.

        For HTTP/1.0 responses and others without chunking or ``Content-Length``; the
        connection is closed afterwards.

        :param timeout: Seconds to wait for the whole body.
        :raises TimeoutError: The server did not close the connection in time.
        """
        if self.chunked or self.content_length is not None:
            raise RuntimeError(
                "The response body is framed (chunked or Content-Length); use 'read_body()'."
            )
        return b"".join(self._body_pieces(timeout, per_piece=False))

    def read_body(self, timeout: float = 10.0) -> bytes:
        """Return the rest of the body, however it is framed.

        :param timeout: Seconds to wait for the whole body.
        """
        return b"".join(self._body_pieces(timeout, per_piece=False))

    def _body_pieces(self, timeout: float, per_piece: bool) -> Iterator[bytes]:
        """Yield the body as it arrives, ending where its framing says it ends.

        :param timeout: Seconds for each piece if ``per_piece``, else for the whole body.
        :param per_piece: Whether the timeout restarts for each piece.
        """
        deadline = time.monotonic() + timeout
        if self.chunked:
            while True:
                if per_piece:
                    deadline = time.monotonic() + timeout
                data = self.read_chunk(max(deadline - time.monotonic(), 0.0))
                if data is None:
                    return
                yield data
        while not self._body_done:
            if self._buffer:
                piece = bytes(self._buffer)
                if self._body_remaining is not None:
                    piece = piece[: self._body_remaining]
                    self._body_remaining -= len(piece)
                    self._body_done = self._body_remaining == 0
                del self._buffer[: len(piece)]
                yield piece
                continue
            if per_piece:
                deadline = time.monotonic() + timeout
            try:
                self._recv(deadline, "the rest of the body")
            except ConnectionClosed:
                if self._body_remaining is not None:
                    raise
                self._body_done = True
                # Without framing, the close is the end of the body, and the connection
                # cannot carry another request.
                self.close()

    def events(self, timeout: float = 10.0) -> Iterator[ServerSentEvent]:
        """Yield the events of the body as they arrive, until the body ends.

        :param timeout: Seconds to wait for each piece of the body (each chunk).
        :raises TimeoutError: No piece arrived within ``timeout``.
        """
        for piece in self._body_pieces(timeout, per_piece=True):
            yield from self._parser.feed(piece)

    def shutdown_write(self) -> None:
        """Send FIN, as a browser tab that goes away does, and keep reading possible."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close the connection; safe to repeat."""
        if not self._closed:
            self._closed = True
            self.sock.close()

    def __enter__(self) -> RawHTTPStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def post(
    url: str,
    json: object = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    *,
    body: bytes | None = None,
    method: str = "POST",
    datastar: bool = True,
) -> tuple[int, HeaderDict, bytes]:
    """Send a request with urllib and return its status, headers and body.

    Error statuses are returned, not raised, and redirects are not followed, so tests
    can assert on them. Proxies from the environment are ignored and HTTPS certificates
    are not verified: this talks to loopback test servers only. Like Datastar's actions,
    it sends ``Datastar-Request: true``, which the app's CSRF check requires.

    :param url: The full URL.
    :param json: An object to send as JSON (``Content-Type: application/json``).
    :param headers: Request headers.
    :param timeout: Seconds for the whole exchange.
    :param body: Raw bytes to send instead of ``json``, such as invalid JSON.
    :param method: The request method.
    :param datastar: Send ``Datastar-Request: true``; ``False`` for a request as a
        page of another site could make a browser send.
    """
    request_headers = dict(headers or {})
    if datastar:
        request_headers.setdefault("Datastar-Request", "true")
    data = body
    if json is not None and body is None:
        data = jsonlib.dumps(json).encode()
        request_headers.setdefault("Content-Type", "application/json")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=context),
        _NoRedirect(),
    )
    request = urllib.request.Request(url, data=data, headers=request_headers, method=method)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, HeaderDict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, HeaderDict(error.headers.items()), error.read()


def get_json(server: GunicornServer, path: str) -> Any:
    """GET *path* from *server* and return its JSON body."""
    with urllib.request.urlopen(server.url + path, timeout=10) as rv:
        return jsonlib.loads(rv.read())


def wait_for(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until *check* returns something truthy; return its last value either way."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)

