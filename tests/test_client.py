"""The Datastar client: the pinned release, ``datastar_script()`` and ``flask datastar``.

The commands download from a real HTTP server on 127.0.0.1 started by the test (the
test machines reach no CDN); what it serves stands in for the client, with its hash
given to the command, since only the bytes and their hash matter to it.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, render_template_string
from markupsafe import Markup

import flask_datastar
from flask_datastar import (
    DATASTAR_CDN_URL,
    DATASTAR_INTEGRITY,
    DATASTAR_VERSION,
    FlaskDatastar,
    actions,
    client,
    datastar_script,
    datastar_url,
)
from tests.helpers import free_port

LOCAL_URL = f"/static/datastar/datastar-{DATASTAR_VERSION}.js"
CLIENT_BYTES = b"// a stand-in for the Datastar client\nexport const ready = true;\n"


def sri(data: bytes, algorithm: str = "sha384") -> str:
    """The Subresource Integrity value of *data*, computed here independently."""
    return f"{algorithm}-{base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


class FileServer:
    """A real HTTP server on 127.0.0.1 serving fixed bytes per path, counting requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        files, requests = self.files, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/javascript")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    with FileServer() as server:
        server.files["/datastar.js"] = CLIENT_BYTES
        yield server


@pytest.fixture
def static_app(tmp_path: Path) -> Flask:
    """An app with the extension and a static folder of its own (empty)."""
    app = Flask(__name__, static_folder=str(tmp_path / "static"))
    app.config.update(TESTING=True)
    FlaskDatastar(app)
    return app


def local_copy(app: Flask) -> Path:
    assert app.static_folder is not None
    return Path(app.static_folder) / "datastar" / f"datastar-{DATASTAR_VERSION}.js"


# -- the pinned release -----------------------------------------------------------------


def test_old_names_stay_importable_from_actions_and_the_package() -> None:
    assert actions.DATASTAR_VERSION is client.DATASTAR_VERSION == "1.0.2"
    assert actions.DATASTAR_CDN_URL is client.DATASTAR_CDN_URL is flask_datastar.DATASTAR_CDN_URL
    assert actions.datastar_url is client.datastar_url is flask_datastar.datastar_url


def test_the_pinned_release_and_its_hash() -> None:
    assert DATASTAR_CDN_URL == (
        "https://cdn.jsdelivr.net/gh/starfederation/datastar@v1.0.2/bundles/datastar.js"
    )
    algorithm, _, digest = DATASTAR_INTEGRITY.partition("-")
    assert algorithm in {"sha256", "sha384", "sha512"}
    assert len(base64.b64decode(digest, validate=True)) == hashlib.new(algorithm).digest_size
    assert client.validate_integrity(DATASTAR_INTEGRITY) == DATASTAR_INTEGRITY


def test_integrity_matches_as_a_browser_decides() -> None:
    data = b"export {}"
    assert client.integrity_matches(data, sri(data))
    assert client.integrity_matches(data, sri(data, "sha256"))
    assert not client.integrity_matches(data + b" ", sri(data))
    # Several hashes: any one of the strongest algorithm will do ...
    assert client.integrity_matches(data, f"{sri(b'other')} {sri(data)}")
    # ... and a weaker algorithm's hash is ignored when a stronger one is given.
    assert not client.integrity_matches(data, f"{sri(data, 'sha256')} {sri(b'other')}")


@pytest.mark.parametrize(
    "value",
    [
        "sha1-" + base64.b64encode(hashlib.sha1(b"x").digest()).decode(),
        "sha384-not base64!",
        "sha384-" + base64.b64encode(b"too short").decode(),
        "md5-abc=",
        "   ",
    ],
)
def test_a_wrong_integrity_setting_fails_at_start_up(value: str) -> None:
    app = Flask(__name__)
    app.config["DATASTAR_JS_INTEGRITY"] = value
    with pytest.raises(ValueError, match="DATASTAR_JS_INTEGRITY must be|DATASTAR_JS_INTEGRITY is"):
        FlaskDatastar(app)


# -- datastar_script() -------------------------------------------------------------------


def test_script_outside_an_app_loads_the_pinned_release_from_the_cdn() -> None:
    script = datastar_script()
    assert isinstance(script, Markup)
    assert script == (
        f'<script type="module" src="{DATASTAR_CDN_URL}" integrity="{DATASTAR_INTEGRITY}"'
        ' crossorigin="anonymous"></script>'
    )
    assert datastar_url() == DATASTAR_CDN_URL


def test_script_is_a_jinja_global_and_uses_the_cdn_without_a_local_copy(
    static_app: Flask,
) -> None:
    with static_app.test_request_context():
        rendered = render_template_string("{{ datastar_script() }}")
        assert rendered == datastar_script()
        assert f'src="{DATASTAR_CDN_URL}"' in rendered
        assert f'integrity="{DATASTAR_INTEGRITY}"' in rendered
        assert render_template_string("{{ datastar_url() }}") == DATASTAR_CDN_URL


def test_script_loads_the_apps_own_copy_once_fetched(static_app: Flask) -> None:
    target = local_copy(static_app)
    target.parent.mkdir(parents=True)
    target.write_bytes(CLIENT_BYTES)
    expected = (
        f'<script type="module" src="{LOCAL_URL}" integrity="{DATASTAR_INTEGRITY}"'
        ' crossorigin="anonymous"></script>'
    )
    with static_app.app_context():  # a CLI command or a task: no request
        assert datastar_script() == expected
        assert datastar_url() == LOCAL_URL
    with static_app.test_request_context():
        assert render_template_string("{{ datastar_script() }}") == expected
        # The file is really served where the tag points.
        response = static_app.test_client().get(LOCAL_URL)
        assert response.data == CLIENT_BYTES
        response.close()
    # Mounted under a prefix: the address follows, as url_for does.
    with static_app.test_request_context(base_url="http://localhost/app/"):
        assert datastar_url() == "/app" + LOCAL_URL
    target.unlink()
    with static_app.app_context():
        assert datastar_url() == DATASTAR_CDN_URL


def test_script_with_the_apps_own_hash(static_app: Flask) -> None:
    local_copy(static_app).parent.mkdir(parents=True)
    local_copy(static_app).write_bytes(CLIENT_BYTES)
    static_app.config["DATASTAR_JS_INTEGRITY"] = sri(CLIENT_BYTES)
    with static_app.app_context():
        assert f'src="{LOCAL_URL}" integrity="{sri(CLIENT_BYTES)}"' in datastar_script()


def test_js_url_wins_and_carries_a_hash_only_when_one_is_set(static_app: Flask) -> None:
    local_copy(static_app).parent.mkdir(parents=True)
    local_copy(static_app).write_bytes(CLIENT_BYTES)
    # Read on every call, not once at start-up.
    static_app.config["DATASTAR_JS_URL"] = '/js/datastar.js?v="1"&x=<2>'
    with static_app.app_context():
        assert datastar_script() == (
            '<script type="module" src="/js/datastar.js?v=&#34;1&#34;&amp;x=&lt;2&gt;"'
            ' crossorigin="anonymous"></script>'
        )
        static_app.config["DATASTAR_JS_INTEGRITY"] = sri(CLIENT_BYTES)
        assert datastar_script(nonce="n0nce") == (
            '<script type="module" src="/js/datastar.js?v=&#34;1&#34;&amp;x=&lt;2&gt;"'
            f' integrity="{sri(CLIENT_BYTES)}" crossorigin="anonymous" nonce="n0nce"></script>'
        )


def test_the_integrity_setting_is_an_option_and_in_the_config(tmp_path: Path) -> None:
    app = Flask(__name__, static_folder=str(tmp_path))
    datastar = FlaskDatastar(app, js_integrity=sri(CLIENT_BYTES))
    assert app.config["DATASTAR_JS_INTEGRITY"] == sri(CLIENT_BYTES)
    assert datastar.config(app).js_integrity == sri(CLIENT_BYTES)
    with app.app_context():
        assert f'integrity="{sri(CLIENT_BYTES)}"' in datastar_script()


# -- flask datastar fetch / check --------------------------------------------------------


def test_fetch_downloads_checks_and_writes_into_the_static_folder(
    static_app: Flask, file_server: FileServer
) -> None:
    runner = static_app.test_cli_runner()
    check = runner.invoke(args=["datastar", "check"])
    assert check.exit_code == 1
    assert "Run 'flask datastar fetch'" in check.output

    url = file_server.url + "/datastar.js"
    args = ["datastar", "fetch", "--url", url, "--integrity", sri(CLIENT_BYTES)]
    result = runner.invoke(args=args)
    assert result.exit_code == 0, result.output
    assert local_copy(static_app).read_bytes() == CLIENT_BYTES
    assert f"now loads it from {LOCAL_URL}" in result.output
    assert file_server.requests == ["/datastar.js"]

    # Already there and matching: nothing is downloaded again.
    again = runner.invoke(args=args)
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output
    assert file_server.requests == ["/datastar.js"]

    # The app's hash setting is what the command and the page both use.
    static_app.config["DATASTAR_JS_INTEGRITY"] = sri(CLIENT_BYTES)
    check = runner.invoke(args=["datastar", "check"])
    assert check.exit_code == 0, check.output
    assert f"matches {sri(CLIENT_BYTES)}" in check.output


def test_fetch_checks_against_the_pinned_hash_by_default_and_refuses_a_mismatch(
    static_app: Flask, file_server: FileServer
) -> None:
    target = local_copy(static_app)
    result = static_app.test_cli_runner().invoke(
        args=["datastar", "fetch", "--url", file_server.url + "/datastar.js"]
    )
    assert result.exit_code == 1
    assert "does not match the expected hash" in result.output
    assert DATASTAR_INTEGRITY in result.output
    assert sri(CLIENT_BYTES) in result.output  # what it got, to compare
    assert "nothing was written" in result.output
    assert not target.exists()
    if target.parent.exists():
        assert list(target.parent.iterdir()) == []  # no temporary file left behind


def test_fetch_never_replaces_a_file_with_one_that_does_not_match(
    static_app: Flask, file_server: FileServer
) -> None:
    target = local_copy(static_app)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"// an older copy")
    file_server.files["/datastar.js"] = CLIENT_BYTES + b"// tampered on the way\n"
    result = static_app.test_cli_runner().invoke(
        args=[
            "datastar",
            "fetch",
            "--url",
            file_server.url + "/datastar.js",
            "--integrity",
            sri(CLIENT_BYTES),
        ]
    )
    assert result.exit_code == 1
    assert "nothing was written" in result.output
    assert target.read_bytes() == b"// an older copy"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_check_fails_on_a_tampered_copy(static_app: Flask) -> None:
    target = local_copy(static_app)
    target.parent.mkdir(parents=True)
    target.write_bytes(CLIENT_BYTES + b"//")
    static_app.config["DATASTAR_JS_INTEGRITY"] = sri(CLIENT_BYTES)
    result = static_app.test_cli_runner().invoke(args=["datastar", "check"])
    assert result.exit_code == 1
    assert "does not match" in result.output
    assert "browsers will refuse to run it" in result.output


def test_check_with_js_url_reports_it(static_app: Flask) -> None:
    static_app.config["DATASTAR_JS_URL"] = "/js/datastar.js"
    result = static_app.test_cli_runner().invoke(args=["datastar", "check"])
    assert result.exit_code == 0
    assert "DATASTAR_JS_URL is set: pages load the client from /js/datastar.js" in result.output


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://127.0.0.1:{free_port()}/datastar.js", "Could not download the Datastar client"),
        ("ftp://example.invalid/datastar.js", "--url must be an https://"),
    ],
)
def test_fetch_explains_a_failed_download(static_app: Flask, url: str, message: str) -> None:
    result = static_app.test_cli_runner().invoke(
        args=["datastar", "fetch", "--url", url, "--timeout", "5"]
    )
    assert result.exit_code == 1
    assert message in result.output
    assert not local_copy(static_app).exists()


def test_fetch_refuses_a_download_that_is_no_client(
    static_app: Flask, file_server: FileServer
) -> None:
    file_server.files["/huge.js"] = b"x" * (4 * 1024 * 1024 + 1)
    result = static_app.test_cli_runner().invoke(
        args=["datastar", "fetch", "--url", file_server.url + "/huge.js"]
    )
    assert result.exit_code == 1
    assert "which is no Datastar client" in result.output
    assert not local_copy(static_app).exists()


def test_fetch_refuses_a_malformed_hash_option(static_app: Flask) -> None:
    result = static_app.test_cli_runner().invoke(
        args=["datastar", "fetch", "--integrity", "sha384-nope"]
    )
    assert result.exit_code == 2
    assert "--integrity must be a Subresource Integrity hash" in result.output


def test_fetch_needs_a_static_folder(file_server: FileServer) -> None:
    app = Flask(__name__, static_folder=None)
    FlaskDatastar(app)
    result = app.test_cli_runner().invoke(
        args=["datastar", "fetch", "--url", file_server.url + "/datastar.js"]
    )
    assert result.exit_code == 1
    assert "The app has no static folder" in result.output
    with app.app_context():
        assert datastar_url() == DATASTAR_CDN_URL
