"""The CSRF check of state-changing requests, and signals read only from JSON bodies.

In process with Flask's test client, then live: example_app.py and examples/chat.py
under real gunicorn, attacked with the requests a cross-site page can make a browser
send without a preflight.
"""

from __future__ import annotations

import html
import json
import re
import urllib.request
from typing import Any

import pytest
from flask import Blueprint, Flask, request
from flask.testing import FlaskClient

from flask_datastar import CSRFError, FlaskDatastar, csrf_exempt, read_signals
from tests.helpers import GunicornServer, post

OWN = "http://localhost"
EVIL = "https://evil.example"
DATASTAR = {"Datastar-Request": "true"}

# What a cross-site page can send without a preflight: a form (three encodings) or a
# fetch of a "simple" type, and a JSON body, which the app reads as signals.
SIMPLE_BODIES = [
    pytest.param("text/plain", b'{"step": 5}', id="text-plain"),
    pytest.param("application/x-www-form-urlencoded", b"step=5", id="urlencoded"),
    pytest.param("multipart/form-data; boundary=x", b"--x--\r\n", id="multipart"),
    pytest.param("application/json", b'{"step": 5}', id="json"),
]
# Headers of browsers: a modern one (Sec-Fetch-Site and Origin), an old one (Origin
# only), and none (a client that sends neither).
CROSS_SITE = [
    pytest.param({"Sec-Fetch-Site": "cross-site", "Origin": EVIL}, id="modern-browser"),
    pytest.param({"Origin": EVIL}, id="origin-only"),
    pytest.param({}, id="no-origin"),
]


def make_app(**config: Any) -> tuple[Flask, FlaskDatastar, dict[str, int]]:
    """An app with a counter, changed by commands that do and do not read signals."""
    app = Flask(__name__)
    app.config.update(TESTING=True, **config)
    datastar = FlaskDatastar(app)
    state = {"count": 0}

    @app.route("/click", methods=["POST", "PUT", "PATCH", "DELETE"])
    def click() -> tuple[str, int]:
        state["count"] += 1
        return "", 204

    @app.post("/add")
    def add() -> dict[str, Any]:
        signals = read_signals()
        state["count"] += int(signals.get("step", 1))
        return {"signals": signals, "form": request.form.to_dict()}

    @app.post("/hook")
    @datastar.csrf_exempt
    def hook() -> tuple[str, int]:
        state["count"] += 1
        return "", 204

    @app.post("/hook-signals")
    @csrf_exempt
    def hook_signals() -> dict[str, Any]:
        return read_signals()

    @app.post("/named")
    def named() -> tuple[str, int]:
        state["count"] += 1
        return "", 204

    api = Blueprint("api", __name__)

    @api.post("/api/click")
    def api_click() -> tuple[str, int]:
        state["count"] += 1
        return "", 204

    app.register_blueprint(api)
    return app, datastar, state


@pytest.fixture
def app_state() -> tuple[Flask, FlaskDatastar, dict[str, int]]:
    return make_app()


@pytest.fixture
def client(app_state: tuple[Flask, FlaskDatastar, dict[str, int]]) -> FlaskClient:
    return app_state[0].test_client()


def message(rv: Any) -> str:
    """The text of an error page, unescaped."""
    return html.unescape(rv.get_data(as_text=True))


def count(app_state: tuple[Flask, FlaskDatastar, dict[str, int]]) -> int:
    return app_state[2]["count"]


# -- in process ----------------------------------------------------------------------------


@pytest.mark.parametrize("headers", CROSS_SITE)
@pytest.mark.parametrize(("content_type", "body"), SIMPLE_BODIES)
@pytest.mark.parametrize("path", ["/click", "/add"])
def test_a_post_without_the_header_is_refused_and_changes_nothing(
    app_state: Any,
    client: FlaskClient,
    headers: dict[str, str],
    content_type: str,
    body: bytes,
    path: str,
) -> None:
    rv = client.post(path, data=body, headers={**headers, "Content-Type": content_type})
    assert rv.status_code == 403
    text = message(rv)
    assert "no 'Datastar-Request: true' header" in text
    assert "a cross-site page cannot send it without CORS" in text
    assert count(app_state) == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_every_state_changing_method_is_checked(
    app_state: Any, client: FlaskClient, method: str
) -> None:
    assert client.open("/click", method=method).status_code == 403
    assert count(app_state) == 0
    assert client.open("/click", method=method, headers=DATASTAR).status_code == 204
    assert count(app_state) == 1


def test_get_is_not_checked(client: FlaskClient) -> None:
    assert client.get("/click").status_code == 405  # the route has no GET: not a 403


def test_an_unknown_url_is_a_404_not_a_403(client: FlaskClient) -> None:
    assert client.post("/nowhere").status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-browser-headers"),
        pytest.param({"Sec-Fetch-Site": "same-origin", "Origin": OWN}, id="same-origin"),
        pytest.param({"Sec-Fetch-Site": "none"}, id="user-initiated"),
        pytest.param({"Origin": OWN}, id="own-origin"),
        pytest.param({"Origin": "http://localhost:80"}, id="own-origin-default-port"),
        pytest.param({"Origin": "HTTP://LOCALHOST"}, id="own-origin-upper-case"),
        # The browser's word wins over the origin the app reconstructs (a proxy
        # without ProxyFix makes the app see http where the browser used https).
        pytest.param(
            {"Sec-Fetch-Site": "same-origin", "Origin": "https://localhost"}, id="behind-proxy"
        ),
    ],
)
def test_a_datastar_request_from_the_own_page_passes(
    app_state: Any, client: FlaskClient, headers: dict[str, str]
) -> None:
    rv = client.post("/add", json={"step": 2}, headers={**DATASTAR, **headers})
    assert rv.status_code == 200
    assert rv.json == {"signals": {"step": 2}, "form": {}}
    assert count(app_state) == 2


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Sec-Fetch-Site": "cross-site", "Origin": EVIL}, "Sec-Fetch-Site: cross-site"),
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://sub.localhost"}, "same-site"),
        ({"Sec-Fetch-Site": "cross-site"}, "Origin: none"),
        ({"Origin": EVIL}, "Origin (https://evil.example) is not this app's origin"),
        ({"Origin": "null"}, "Origin (null)"),
        ({"Origin": "http://localhost:5000"}, "(http://localhost)"),
        ({"Origin": "https://localhost"}, "ProxyFix"),
    ],
)
def test_the_header_from_another_origin_is_refused(
    app_state: Any, client: FlaskClient, headers: dict[str, str], reason: str
) -> None:
    rv = client.post("/click", headers={**DATASTAR, **headers})
    assert rv.status_code == 403
    assert reason in message(rv)
    assert "DATASTAR_TRUSTED_ORIGINS" in message(rv)
    assert count(app_state) == 0


@pytest.mark.parametrize("site", ["same-site", "cross-site", None])
def test_trusted_origins_may_send_commands(site: str | None) -> None:
    app_state = make_app(DATASTAR_TRUSTED_ORIGINS=["https://admin.example:8443/"])
    client = app_state[0].test_client()
    headers = {**DATASTAR, "Origin": "https://ADMIN.example:8443"}
    if site is not None:
        headers["Sec-Fetch-Site"] = site
    assert client.post("/click", headers=headers).status_code == 204
    headers["Origin"] = "https://admin.example"  # another port is another origin
    assert client.post("/click", headers=headers).status_code == 403
    assert count(app_state) == 1


def test_exempt_views_and_blueprints_are_not_checked() -> None:
    app_state = make_app(DATASTAR_CSRF_EXEMPT="named, api")
    client = app_state[0].test_client()
    cross = {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}
    for path in ["/hook", "/named", "/api/click"]:
        assert client.post(path, headers=cross).status_code == 204, path
    assert client.post("/click", headers=cross).status_code == 403
    # An exempt view may read signals: read_signals does not check again.
    rv = client.post("/hook-signals", json={"a": 1}, headers=cross)
    assert (rv.status_code, rv.json) == (200, {"a": 1})
    assert count(app_state) == 3


def test_a_blueprint_marked_exempt_is_not_checked() -> None:
    app = Flask(__name__)
    datastar = FlaskDatastar(app)
    webhooks = datastar.csrf_exempt(Blueprint("webhooks", __name__))

    @webhooks.post("/stripe")
    def stripe() -> str:
        return "ok"

    app.register_blueprint(webhooks)
    assert app.test_client().post("/stripe", data="x").status_code == 200


def test_signals_mode_checks_only_the_views_that_read_signals() -> None:
    app_state = make_app(DATASTAR_CSRF="signals")
    client = app_state[0].test_client()
    assert client.post("/click").status_code == 204
    rv = client.post("/add", json={"step": 5})
    assert rv.status_code == 403
    assert "Datastar-Request" in message(rv)
    assert count(app_state) == 1
    assert client.post("/add", json={"step": 5}, headers=DATASTAR).status_code == 200
    assert count(app_state) == 6


@pytest.mark.parametrize("off", [False, "off", "false"])
def test_the_check_can_be_turned_off(off: object) -> None:
    app_state = make_app(DATASTAR_CSRF=off)
    client = app_state[0].test_client()
    assert client.post("/click", headers={"Origin": EVIL}).status_code == 204
    assert client.post("/add", json={"step": 2}).status_code == 200
    assert count(app_state) == 3


def test_read_signals_checks_without_the_extension() -> None:
    app = Flask(__name__)

    @app.post("/add")
    def add() -> dict[str, Any]:
        return read_signals()

    client = app.test_client()
    assert client.post("/add", json={"a": 1}).status_code == 403
    assert client.post("/add", json={"a": 1}, headers=DATASTAR).json == {"a": 1}


def test_the_refusal_is_a_csrf_error_the_app_can_handle() -> None:
    app, _, _ = make_app()

    @app.errorhandler(CSRFError)
    def refused(error: CSRFError) -> tuple[dict[str, str], int]:
        return {"error": str(error.description)}, 403

    rv = app.test_client().post("/click")
    assert rv.status_code == 403
    assert rv.json is not None and "Datastar-Request" in rv.json["error"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("DATASTAR_CSRF", "sometimes", "DATASTAR_CSRF must be True"),
        ("DATASTAR_TRUSTED_ORIGINS", ["evil.example"], "not an origin"),
        ("DATASTAR_TRUSTED_ORIGINS", ["https://a.example/path"], "not an origin"),
        ("DATASTAR_TRUSTED_ORIGINS", ["ftp://a.example"], "not an origin"),
        ("DATASTAR_CSRF_EXEMPT", [1], "must hold strings"),
    ],
)
def test_bad_settings_fail_at_start_up(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_app(**{key: value})


def test_settings_from_the_environment_are_read() -> None:
    app, datastar, _ = make_app(
        DATASTAR_CSRF="signals",
        DATASTAR_TRUSTED_ORIGINS="https://a.example, http://[::1]:8000",
        DATASTAR_CSRF_EXEMPT="x y",
    )
    config = datastar.config(app)
    assert config.csrf == "signals"
    assert config.trusted_origins == {"https://a.example", "http://[::1]:8000"}
    assert config.csrf_exempt == {"x", "y"}
    assert make_app()[1].config(make_app()[0]).csrf == "all"


# -- signals only from application/json -------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/octet-stream"])
def test_a_body_that_is_not_json_is_a_415(
    app_state: Any, client: FlaskClient, content_type: str | None
) -> None:
    headers = dict(DATASTAR)
    if content_type is not None:
        headers["Content-Type"] = content_type
    rv = client.post("/add", data=b'{"step": 5}', headers=headers)
    assert rv.status_code == 415
    text = message(rv)
    assert "read only from an 'application/json' body" in text
    assert count(app_state) == 0


@pytest.mark.parametrize("content_type", ["text/plain", None])
def test_an_empty_body_of_any_type_has_no_signals(
    client: FlaskClient, content_type: str | None
) -> None:
    headers = dict(DATASTAR)
    if content_type is not None:
        headers["Content-Type"] = content_type
    rv = client.post("/add", data=b"", headers=headers)
    assert (rv.status_code, rv.json) == (200, {"signals": {}, "form": {}})


@pytest.mark.parametrize("kind", ["urlencoded", "multipart"])
def test_a_datastar_form_post_passes_and_its_fields_are_in_request_form(
    app_state: Any, client: FlaskClient, kind: str
) -> None:
    # What Datastar's @post(url, {contentType: 'form'}) sends: the form's encoding and
    # the same Datastar-Request header as every action.
    data: Any = {"step": "3"}
    rv = client.post(
        "/add",
        data=data,
        content_type="multipart/form-data" if kind == "multipart" else None,
        headers={**DATASTAR, "Sec-Fetch-Site": "same-origin", "Origin": OWN},
    )
    assert rv.status_code == 200
    assert rv.json == {"signals": {}, "form": {"step": "3"}}
    assert count(app_state) == 1


# -- live, under gunicorn ------------------------------------------------------------------

CLICKS = re.compile(r"Button clicks: <strong>(\d+)</strong>")


def page(url: str) -> str:
    with urllib.request.urlopen(url + "/", timeout=10) as rv:
        return str(rv.read().decode())


@pytest.mark.live
def test_live_cross_site_posts_change_nothing_in_example_app_and_chat() -> None:
    with (
        GunicornServer("example_app:app", threads=4, config="gunicorn.conf.py") as app,
        GunicornServer("examples.chat:app", threads=4, config="gunicorn.conf.py") as chat,
    ):
        before = CLICKS.search(page(app.url))
        assert before is not None
        message = json.dumps({"author": "mallory", "text": "pwned"}).encode()
        for name, data in [("click", b""), ("say", message)]:
            url = app.url + "/click" if name == "click" else chat.url + "/say"
            for content_type in [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/json",
            ]:
                for headers in [{"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}, {}]:
                    status, _, body = post(
                        url,
                        body=data,
                        headers={**headers, "Content-Type": content_type},
                        datastar=False,
                    )
                    assert status == 403, (url, content_type, headers, body)
                    assert b"Datastar-Request" in body
            # With the header but from another site's page: refused too.
            status, _, body = post(
                url,
                body=data,
                headers={
                    **DATASTAR,
                    "Origin": EVIL,
                    "Sec-Fetch-Site": "cross-site",
                    "Content-Type": "application/json",
                },
            )
            assert status == 403, body
        assert CLICKS.search(page(app.url)).group(1) == before.group(1)  # type: ignore[union-attr]
        assert "pwned" not in page(chat.url)
        # The own page's requests, as Datastar's fetch sends them, still work.
        own = {**DATASTAR, "Sec-Fetch-Site": "same-origin"}
        assert post(app.url + "/click", json={}, headers=own)[0] == 204
        after = CLICKS.search(page(app.url))
        assert after is not None and int(after.group(1)) == int(before.group(1)) + 1
        status, _, _ = post(
            chat.url + "/say",
            json={"author": "ada", "text": "hello"},
            headers={**own, "Origin": chat.url},
        )
        assert status == 200
        assert "hello" in page(chat.url)
