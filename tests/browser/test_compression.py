"""Chromium renders a compressed stream, over plain HTTP and over TLS.

Chromium decides what it offers in ``Accept-Encoding``: the stream shows what its
request carried, and the tests check it and that the stream was compressed with what
the server negotiated from it, then that its events and a broadcast render. Found here
(Chromium from Debian): ``gzip, deflate`` to a plain-HTTP site, ``gzip, deflate, br,
zstd`` over HTTPS and to localhost (which counts as secure, even over plain HTTP).
Over plain HTTP the stream takes the direct socket path; gunicorn's TLS takes the
queue path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask, render_template_string, request

from flask_datastar import SSE, FlaskDatastar, Stream
from flask_datastar.compression import parse_accept_encoding
from tests.helpers import GunicornServer, make_self_signed_cert, require_tool

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from tests.browser.conftest import Tabs

pytestmark = [pytest.mark.browser, pytest.mark.live]

# -- the app ------------------------------------------------------------------------------

app = Flask(__name__)
app.config.from_prefixed_env()  # DATASTAR_JS_URL from the browser tests' server
datastar = FlaskDatastar(app)
clients = datastar.registry(app, "compression-browser")
clicks = [0]

PAGE = """\
<!doctype html>
<html><head><meta charset="utf-8">{{ datastar_script() }}</head>
<body data-init="{{ sse_get('/sse') }}">
  <p id="offered">?</p><p id="path">?</p>
  <button id="click" data-on:click="{{ sse_post('/click') }}">click</button>
  {{ content|safe }}
</body></html>"""


def content() -> str:
    # A fat morph: the same region re-rendered whole, what compression is for.
    rows = "".join(f"<li>row {i} of the list, unchanged</li>" for i in range(40))
    return f'<div id="content"><p id="count">{clicks[0]}</p><ul>{rows}</ul></div>'


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, content=content())


@app.get("/sse")
@datastar.sse(on_connect=clients.register)
def sse(gen: Stream) -> Iterator[object]:
    offered = escape(request.headers.get("Accept-Encoding", ""))
    gen.patch_elements(f'<p id="offered">{offered}</p><p id="path">{gen.path}</p>')
    gen.patch_elements(content())
    yield gen.sleep()


@app.post("/click")
def click() -> tuple[str, int]:
    clicks[0] += 1
    clients.broadcast(SSE.patch_elements(content()))
    return "", 204


APP = f"{__name__}:app"

# -- the tests ----------------------------------------------------------------------------

#: A name that is not "localhost" for Chromium, mapped to the loopback address: Chromium
#: offers brotli and zstd only over HTTPS and to localhost (127.0.0.0/8 included), so a
#: plain-HTTP site elsewhere is seen only under such a name. No traffic leaves loopback.
PLAIN_HOST = "plain-http.test"


def open_page(tabs: Tabs, url: str, browser: Browser | None = None) -> tuple[Page, str]:
    """Open *url* in a tab that accepts self-signed certificates; return it and the
    ``Content-Encoding`` of its stream's response.

    :param browser: another browser than the session's.
    """
    from tests.browser.conftest import _READY_SCRIPT, TIMEOUT

    context = (browser or tabs.browser).new_context(
        viewport=tabs.viewport, ignore_https_errors=True
    )
    context.set_default_timeout(TIMEOUT * 1000)
    context.add_init_script(_READY_SCRIPT)
    tabs.contexts.append(context)
    page = context.new_page()
    page.on("pageerror", lambda error: tabs.errors.append(str(error)))
    with page.expect_response(lambda response: "/sse" in response.url) as stream:
        page.goto(url)
    page.wait_for_function("window.__datastarReady === true")
    tabs.pages.append(page)
    return page, stream.value.headers.get("content-encoding", "")


def check_renders(page: Page, expect: Any) -> set[str]:
    """Wait for the stream's events and a broadcast; return the codings Chromium offered."""
    expect(page.locator("#offered")).not_to_have_text("?")
    before = int(str(page.text_content("#count")))
    page.click("#click")
    expect(page.locator("#count")).to_have_text(str(before + 1))
    expect(page.locator("#content li")).to_have_count(40)
    offered = parse_accept_encoding(page.text_content("#offered"))
    return {name for name, quality in offered.items() if quality}


@pytest.fixture(scope="module")
def http_server(serve: Callable[..., GunicornServer]) -> GunicornServer:
    return serve(APP)


@pytest.fixture
def plain_http_browser(tabs: Tabs) -> Iterator[Browser]:
    """A second Chromium that resolves :data:`PLAIN_HOST` to 127.0.0.1."""
    from tests.browser.conftest import CHROMIUM_ARGS

    rules = f"--host-resolver-rules=MAP {PLAIN_HOST} 127.0.0.1"
    browser = tabs.browser.browser_type.launch(
        executable_path=require_tool("chromium"), args=[*CHROMIUM_ARGS, rules]
    )
    try:
        yield browser
    finally:
        tabs.close()  # its contexts, before the browser goes
        browser.close()


def test_chromium_offers_gzip_to_a_plain_http_site_and_decodes_it(
    tabs: Tabs, http_server: GunicornServer, expect: Any, plain_http_browser: Browser
) -> None:
    url = f"http://{PLAIN_HOST}:{http_server.port}/"
    page, encoding = open_page(tabs, url, plain_http_browser)
    assert check_renders(page, expect) == {"gzip", "deflate"}
    assert encoding == "gzip"
    assert page.text_content("#path") == "direct"


def test_chromium_offers_zstd_to_localhost_over_http(
    tabs: Tabs, http_server: GunicornServer, expect: Any
) -> None:
    page, encoding = open_page(tabs, http_server.url + "/")
    assert {"gzip", "br", "zstd"} <= check_renders(page, expect)
    assert encoding == "zstd"  # the server's first choice
    assert page.text_content("#path") == "direct"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


def test_chromium_offers_zstd_and_brotli_over_tls_and_decodes_it(
    tabs: Tabs,
    serve: Callable[..., GunicornServer],
    expect: Any,
    tls_files: tuple[Path, Path],
) -> None:
    certfile, keyfile = tls_files
    server = serve(APP, certfile=certfile, keyfile=keyfile)
    page, encoding = open_page(tabs, server.url + "/")
    assert {"gzip", "br", "zstd"} <= check_renders(page, expect)
    assert encoding == "zstd"
    assert page.text_content("#path") == "queue"  # TLS at gunicorn: the portable path


def test_brotli_when_the_server_prefers_it(
    tabs: Tabs,
    serve: Callable[..., GunicornServer],
    expect: Any,
    tls_files: tuple[Path, Path],
) -> None:
    certfile, keyfile = tls_files
    server = serve(
        APP, certfile=certfile, keyfile=keyfile, env={"FLASK_DATASTAR_COMPRESSION": "br,gzip"}
    )
    page, encoding = open_page(tabs, server.url + "/")
    check_renders(page, expect)
    assert encoding == "br"
