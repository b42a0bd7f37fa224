"""Request guards: the cross-site request forgery (CSRF) check of state-changing requests.

A command of a Datastar page is a ``POST`` (``PUT``, ``PATCH``, ``DELETE``) sent by
the client's ``fetch`` with a ``Datastar-Request: true`` header. A page of another
site can make a browser send a form, or a ``fetch`` of a CORS "simple" type
(``text/plain``, a form encoding), with the user's cookies and no preflight; it
cannot add a header of its own without a CORS preflight, which the app does not
answer. So a state-changing request passes when:

1. it carries ``Datastar-Request: true``;
2. the browser's ``Sec-Fetch-Site`` header, when present, says ``same-origin`` or
   ``none`` (a ``same-site`` or ``cross-site`` request passes only if its
   ``Origin`` is in ``DATASTAR_TRUSTED_ORIGINS``);
3. without ``Sec-Fetch-Site`` (older browsers), the ``Origin`` header, when
   present, is the app's own origin (scheme, host and port as
   :attr:`flask.Request.host_url` gives them) or a trusted one.

``Sec-Fetch-Site`` decides alone where the browser sends it: the browser sets it
and no page can change it, whereas the app's own origin is reconstructed from
the request and is wrong behind a proxy that Flask is not told about.

:class:`~flask_datastar.FlaskDatastar` checks every state-changing request of the
app before its view runs (``DATASTAR_CSRF = True``), or only those whose view calls
:func:`~flask_datastar.read_signals` (``DATASTAR_CSRF = "signals"``), except the
views and blueprints marked with :func:`csrf_exempt` or named in
``DATASTAR_CSRF_EXEMPT``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from flask import Blueprint, current_app, request
from werkzeug.exceptions import Forbidden

__all__ = [
    "STATE_CHANGING_METHODS",
    "CSRFError",
    "check_csrf",
    "csrf_exempt",
    "csrf_failure",
    "parse_csrf_mode",
    "parse_names",
    "parse_origins",
]

log = logging.getLogger(__name__)

#: The methods the check applies to.
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

CSRFMode = Literal["all", "signals", "off"]

# Set once a request has been checked (or found exempt), so that read_signals()
# after the before_request check does not check again.
_CHECKED_KEY = "flask_datastar.csrf_checked"
# The attribute csrf_exempt() sets on a view function or a blueprint.
_EXEMPT_ATTRIBUTE = "_datastar_csrf_exempt"

_DEFAULT_PORTS = {"http": 80, "https": 443}

T = TypeVar("T")


class CSRFError(Forbidden):
    """A state-changing request that may come from another site's page: a 403.

    Its ``description`` says what the request lacked. Register an error
    handler for it (``@app.errorhandler(CSRFError)``) to answer in your own way.
    """


def csrf_exempt(view: T) -> T:
    """Exempt a view function, or every view of a blueprint, from the CSRF check.

    ::

        @app.post("/webhooks/stripe")
        @datastar.csrf_exempt
        def stripe_webhook(): ...

        datastar.csrf_exempt(api_blueprint)

    Use it for requests that no Datastar page sends: a webhook authenticated by
    its signature, an API authenticated by a token in a header, a classic HTML
    form protected by Flask-WTF's token. The view must then protect itself.

    :param view: a view function or a :class:`flask.Blueprint`.
    :raises TypeError: *view* is neither.
    """
    if not (callable(view) or isinstance(view, Blueprint)):
        raise TypeError(
            f"'csrf_exempt' takes a view function or a Blueprint, not {type(view).__name__}."
        )
    setattr(view, _EXEMPT_ATTRIBUTE, True)
    return view


def parse_csrf_mode(value: Any, key: str = "DATASTAR_CSRF") -> CSRFMode:
    """Read ``DATASTAR_CSRF``: ``True`` or ``"all"``, ``"signals"``, ``False`` or ``"off"``.

    :param value: the configured value (strings from the environment are accepted).
    :param key: the configuration key, for the message.
    :raises ValueError: the value is none of those.
    """
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"all", "1", "true", "yes", "on"}:
            return "all"
        if lowered == "signals":
            return "signals"
        if lowered in {"off", "0", "false", "no", ""}:
            return "off"
    elif value is None or isinstance(value, (bool, int)):
        return "all" if value else "off"
    raise ValueError(
        f"{key} must be True (check every state-changing request), 'signals' (only those"
        f" that read signals) or False (no check), not {value!r}."
    )


def _words(value: Any, key: str) -> list[str]:
    # A string from the environment holds several names separated by commas or spaces.
    if value is None:
        return []
    if isinstance(value, str):
        return value.replace(",", " ").split()
    if isinstance(value, Iterable):
        words = list(value)
        for word in words:
            if not isinstance(word, str):
                raise ValueError(f"{key} must hold strings, not {word!r}.")
        return words
    raise ValueError(f"{key} must be a list of strings, not {value!r}.")


def parse_names(value: Any, key: str = "DATASTAR_CSRF_EXEMPT") -> frozenset[str]:
    """Read ``DATASTAR_CSRF_EXEMPT``: endpoint and blueprint names.

    :param value: a list of names, or one string of names separated by commas or spaces.
    :param key: the configuration key, for the message.
    :raises ValueError: the value is not a list of strings.
    """
    return frozenset(_words(value, key))


def parse_origins(value: Any, key: str = "DATASTAR_TRUSTED_ORIGINS") -> frozenset[str]:
    """Read ``DATASTAR_TRUSTED_ORIGINS``: origins such as ``"https://admin.example.com"``.

    :param value: a list of origins, or one string of origins separated by commas or spaces.
    :param key: the configuration key, for the message.
    :raises ValueError: an entry is not an ``http`` or ``https`` origin.
    """
    origins = set()
    for word in _words(value, key):
        origin = normalize_origin(word)
        if origin is None:
            raise ValueError(
                f"{key} holds {word!r}, which is not an origin: write the scheme, the host"
                " and the port if it is not the default, such as 'https://app.example.com'"
                " or 'http://localhost:5000', with no path."
            )
        origins.add(origin)
    return frozenset(origins)


def normalize_origin(value: str) -> str | None:
    """Return *value* as ``scheme://host[:port]`` in lower case, or ``None`` if it is no origin.

    The default port of the scheme is dropped, as browsers do in ``Origin``.
    ``"null"``, the ``Origin`` of sandboxed frames and ``file:`` pages, is no origin.

    :param value: an ``Origin`` header, a configured origin or ``scheme://host``.
    """
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if (
        scheme not in _DEFAULT_PORTS
        or not host
        or parts.path not in {"", "/"}
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        return None
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address keeps its brackets
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def csrf_failure(trusted_origins: frozenset[str] = frozenset()) -> str | None:
    """Return why the current request may come from another site's page, or ``None``.

    Applies the checks of this module's description to the request's headers,
    whatever its method.

    :param trusted_origins: other origins whose pages may send commands.
    """
    if request.headers.get("Datastar-Request", "").strip().lower() != "true":
        return (
            "The request has no 'Datastar-Request: true' header, which Datastar's actions"
            " send: a cross-site page cannot send it without CORS. Send commands with"
            " Datastar's @post() (or add the header to your own fetch), or exempt this view"
            " with 'datastar.csrf_exempt' if it protects itself."
        )
    origin_header = request.headers.get("Origin")
    origin = None if origin_header is None else normalize_origin(origin_header)
    trusted = origin is not None and origin in trusted_origins
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        if site.strip().lower() in {"same-origin", "none"} or trusted:
            return None
        return (
            f"The browser sent this request from a page of another origin (Sec-Fetch-Site:"
            f" {site}, Origin: {origin_header or 'none'}). Add that page's origin to"
            " DATASTAR_TRUSTED_ORIGINS if it may send commands to this app."
        )
    if origin_header is None or trusted:
        return None
    own = normalize_origin(f"{request.scheme}://{request.host}")
    if origin is not None and origin == own:
        return None
    return (
        f"The request's Origin ({origin_header}) is not this app's origin ({own}) nor one"
        " of DATASTAR_TRUSTED_ORIGINS. Add it there if that page may send commands; behind"
        " a proxy, apply werkzeug's ProxyFix so that Flask sees the scheme and host the"
        " browser used."
    )


def _exempt(names: frozenset[str], from_signals: bool) -> bool:
    endpoint = request.endpoint
    if endpoint is None:
        # Before a view: none will run, the 404 or 405 follows. From read_signals: some
        # code reads signals all the same (an error handler), so it is checked.
        return not from_signals
    if endpoint in names or any(name in names for name in request.blueprints):
        return True
    app = current_app
    if getattr(app.view_functions.get(endpoint), _EXEMPT_ATTRIBUTE, False):
        return True
    return any(
        getattr(app.blueprints.get(name), _EXEMPT_ATTRIBUTE, False) for name in request.blueprints
    )


def check_csrf(*, from_signals: bool = False) -> None:
    """Refuse the current request with :exc:`CSRFError` if it may come from another site.

    Only state-changing methods (``POST``, ``PUT``, ``PATCH``, ``DELETE``) are
    checked, each request once, with the settings the app runs with (the
    defaults if the extension is not registered on it); exempt views and
    blueprints are not. The extension calls it before every view;
    :func:`~flask_datastar.read_signals` calls it with *from_signals*.

    :param from_signals: called by ``read_signals``: the check also applies
        with ``DATASTAR_CSRF = "signals"``.
    :raises CSRFError: the request failed the check; its description says why.
    """
    if request.method not in STATE_CHANGING_METHODS or request.environ.get(_CHECKED_KEY):
        return
    state = current_app.extensions.get("datastar")
    if state is not None:
        config = state.config
        mode, trusted, exempt = config.csrf, config.trusted_origins, config.csrf_exempt
    else:
        settings = current_app.config
        mode = parse_csrf_mode(settings.get("DATASTAR_CSRF", True))
        trusted = parse_origins(settings.get("DATASTAR_TRUSTED_ORIGINS"))
        exempt = parse_names(settings.get("DATASTAR_CSRF_EXEMPT"))
    if mode == "off" or (mode == "signals" and not from_signals):
        return
    request.environ[_CHECKED_KEY] = True
    if _exempt(exempt, from_signals):
        return
    reason = csrf_failure(trusted)
    if reason is not None:
        log.info("Refused %s %s: %s", request.method, request.path, reason)
        raise CSRFError(reason)
