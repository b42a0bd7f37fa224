"""The documentation builds cleanly, and what it states is checked against the code.

- ``docs/`` builds with Sphinx in nitpicky mode, warnings as errors, offline;
- the tutorial includes every example of the gallery;
- the configuration page documents exactly the keys of ``DEFAULTS``, with their
  defaults;
- the API reference documents every public name of the package and its modules;
- the examples of the testing page (``docs/testing.rst`` includes them from this
  file) run.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

import flask_datastar
from flask_datastar import SSE, DatastarResponse, FlaskDatastar, Stream, read_signals
from flask_datastar.extension import DEFAULTS
from flask_datastar.testing import iter_events, parse_events
from tests.helpers import REPO_ROOT, require_module

DOCS = REPO_ROOT / "docs"
MODULES = [
    "sse",
    "stream",
    "scheduler",
    "registry",
    "replay",
    "compression",
    "metrics",
    "selfcheck",
    "bus",
    "transport",
    "signals",
    "gunicorn",
    "testing",
]


# -- the build ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the HTML documentation once for this module and return the output folder."""
    for module, package in (("sphinx", "sphinx"), ("myst_parser", "myst-parser")):
        # Found, not imported: importing Sphinx here would bring its warnings into
        # this process, which runs with filterwarnings=error.
        if importlib.util.find_spec(module) is None:
            require_module(module, package)
    out = tmp_path_factory.mktemp("docs")
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-n",
        "-q",
        "-b",
        "html",
        "-d",
        str(out / "doctrees"),
        str(DOCS),
        str(out / "html"),
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            "The documentation does not build cleanly; run\n  python "
            + " ".join(command[1:])
            + f"\nto see it. Sphinx said:\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    return out / "html"


def test_docs_build_without_warnings(built_docs: Path) -> None:
    pages = {path.stem for path in built_docs.glob("*.html")}
    expected = {"index", "quickstart", "tutorial", "concepts", "config", "deployment"}
    expected |= {"testing", "datastar-py", "api", "changes"}
    assert expected <= pages


def test_deployment_page_includes_the_redis_text(built_docs: Path) -> None:
    source = (DOCS / "deployment-redis.md").read_text(encoding="utf-8")
    title = source.splitlines()[0].lstrip("# ").strip()
    html = (built_docs / "deployment.html").read_text(encoding="utf-8")
    assert title.replace(":", "") in re.sub(r"<[^>]+>|:", "", html)


@pytest.mark.parametrize(
    "example", sorted(path.name for path in (REPO_ROOT / "examples").glob("[!_]*.py"))
)
def test_tutorial_walks_through_every_example(example: str) -> None:
    # The tutorial shows the examples' code by including the files themselves.
    tutorial = (DOCS / "tutorial.rst").read_text(encoding="utf-8")
    assert f".. literalinclude:: ../examples/{example}" in tutorial


# -- the configuration page -------------------------------------------------------------


def documented_settings() -> dict[str, str]:
    """Return the ``.. data:: DATASTAR_*`` entries of the configuration page and their
    ``:value:`` option, as written."""
    text = (DOCS / "config.rst").read_text(encoding="utf-8")
    entries = re.findall(r"^\.\. data:: (\S+)\n((?:   :\w+:.*\n)*)", text, flags=re.MULTILINE)
    settings = {}
    for name, options in entries:
        value = re.search(r"^   :value: (.*)$", options, flags=re.MULTILINE)
        assert value is not None, f"{name} in docs/config.rst has no ':value:' (its default)."
        settings[name] = value.group(1).strip()
    return settings


def test_configuration_page_lists_exactly_the_known_keys() -> None:
    assert list(documented_settings()) == list(DEFAULTS)


@pytest.mark.parametrize("key", list(DEFAULTS))
def test_configuration_page_gives_each_default(key: str) -> None:
    written = documented_settings().get(key)
    assert written is not None, f"docs/config.rst does not document {key}."
    value = ast.literal_eval(written)
    assert value == DEFAULTS[key]
    assert type(value) is type(DEFAULTS[key])


# -- the API reference ----------------------------------------------------------------


def inventory(html: Path) -> dict[str, str]:
    """Read the object inventory that Sphinx wrote: ``{name: "domain:role"}``."""
    data = (html / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    names = {}
    for line in zlib.decompress(data[header_end:]).decode("utf-8").splitlines():
        match = re.match(r"(.+?)\s+(\S+)\s+(-?\d+)\s+(\S*)\s+(.*)", line)
        if match:
            names[match.group(1)] = match.group(2)
    return names


def public_names() -> list[tuple[str, str]]:
    names = [("flask_datastar", name) for name in flask_datastar.__all__]
    for module in MODULES:
        imported = importlib.import_module(f"flask_datastar.{module}")
        names.extend((imported.__name__, name) for name in imported.__all__)
    return names


@pytest.mark.parametrize(("module", "name"), public_names())
def test_api_reference_documents_every_public_name(
    built_docs: Path, module: str, name: str
) -> None:
    documented = inventory(built_docs)
    assert module in documented
    obj = getattr(importlib.import_module(module), name)
    # A name that the package re-exports is documented once, under flask_datastar.
    reexported = getattr(flask_datastar, name, None) is obj
    assert f"{module}.{name}" in documented or (
        reexported and f"flask_datastar.{name}" in documented
    ), f"docs/api.rst documents neither {module}.{name} nor flask_datastar.{name}."


# -- the examples of the testing page ---------------------------------------------------
# docs/testing.rst includes these functions; keep them short and readable.

datastar = FlaskDatastar()
counter = {"clicks": 0}


def create_app() -> Flask:
    app = Flask(__name__)
    datastar.init_app(app)
    clients = datastar.registry(app, "counter")

    @app.get("/sse")
    @datastar.sse(on_connect=clients.register)
    def sse(gen: Stream) -> Iterator[object]:
        gen.patch_elements(f'<p id="clicks">{counter["clicks"]}</p>')
        yield gen.sleep()

    @app.post("/click")
    def click() -> tuple[str, int]:
        counter["clicks"] += 1
        clients.broadcast(SSE.patch_elements(f'<p id="clicks">{counter["clicks"]}</p>'))
        return "", 204

    @app.post("/greet")
    def greet() -> DatastarResponse:
        name = read_signals().get("name") or "stranger"
        return DatastarResponse(SSE.patch_signals({"greeting": f"Hello, {name}!"}))

    return app


@pytest.fixture
def app() -> Iterator[Flask]:
    counter["clicks"] = 0
    app = create_app()
    app.config["TESTING"] = True
    yield app
    datastar.registry(app, "counter").close()  # stops its broadcaster thread


def test_greet_patches_a_signal(client: FlaskClient) -> None:
    response = client.post("/greet", json={"name": "Ada"})
    (event,) = parse_events(response.data)
    assert event.event == "datastar-patch-signals"
    assert event.signals == {"greeting": "Hello, Ada!"}


def test_a_click_reaches_the_open_stream(client: FlaskClient) -> None:
    response = client.get("/sse", buffered=False)
    events = iter_events(response, limit=2)
    assert next(events).elements == '<p id="clicks">0</p>'
    client.post("/click")
    assert next(events).elements == '<p id="clicks">1</p>'
    events.close()  # closes the response: the stream ends, as when a tab goes away
