"""The Datastar client: the pinned release, its script tag, and the ``flask datastar`` commands.

Pages load the client, one ES module, with ``{{ datastar_script() }}``. By
default it comes from the official CDN, pinned to :data:`~flask_datastar.DATASTAR_VERSION` and
checked by the browser against :data:`~flask_datastar.DATASTAR_INTEGRITY` (Subresource
Integrity). ``flask datastar fetch`` downloads that release once, on the
developer's machine, checks its hash and writes it into the app's static
folder; from then on ``datastar_script()`` loads it from there, with the same
hash, and the page works with no CDN in reach. Nothing of the client itself is
shipped with this package.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
from flask import Flask, current_app, has_app_context, has_request_context, url_for
from flask.cli import AppGroup
from markupsafe import Markup, escape

__all__ = [
    "DATASTAR_CDN_URL",
    "DATASTAR_INTEGRITY",
    "DATASTAR_VERSION",
    "STATIC_FILENAME",
    "cli",
    "datastar_script",
    "datastar_url",
    "integrity_matches",
    "validate_integrity",
]

#: The Datastar client release this package speaks to.
DATASTAR_VERSION = "1.0.2"
#: The official CDN address of that release.
DATASTAR_CDN_URL = (
    f"https://cdn.jsdelivr.net/gh/starfederation/datastar@v{DATASTAR_VERSION}/bundles/datastar.js"
)
#: The Subresource Integrity hash of that release's ``bundles/datastar.js``
#: (34083 bytes), which the browser checks before running the script.
# Provenance: this machine reaches no CDN, and the Datastar repository snapshot
# available here ends before the v1.0.2 tag, so the digest could not be computed
# from the bytes. It is the sha256 that independent public projects recorded for
# exactly this file at @v1.0.2 / @1.0.2 on jsDelivr (two Nix `fetchurl` pins, which
# Nix enforces on every download, and three vendored copies' manifests), all
# agreeing. `flask datastar fetch` checks the real file against it.
DATASTAR_INTEGRITY = "sha256-KDfYes9u4LqOTmN2WSbCWpjWOIOwL4i+GUqGuB0/0ko="
#: Where ``flask datastar fetch`` writes the client, inside the app's static folder
#: (the version in the name lets browsers cache it for as long as they like).
STATIC_FILENAME = f"datastar/datastar-{DATASTAR_VERSION}.js"

# The digests of Subresource Integrity, strongest last (a browser that finds several
# in one attribute checks only those of the strongest algorithm).
_ALGORITHMS = ("sha256", "sha384", "sha512")
_INTEGRITY_TOKEN = re.compile(r"(sha256|sha384|sha512)-([A-Za-z0-9+/]+={0,2})(?:\?\S*)?\Z")
# A client bundle is tens of kilobytes; anything this large is not one.
_MAX_DOWNLOAD = 4 * 1024 * 1024


def _parse_integrity(value: str, key: str = "DATASTAR_JS_INTEGRITY") -> list[tuple[str, bytes]]:
    """Return the ``(algorithm, digest)`` pairs of an ``integrity`` value.

    :param value: one or more ``sha384-<base64>`` tokens, separated by spaces.
    :param key: the setting or option the value came from, for the error.
    :raises ValueError: a token is not a sha256, sha384 or sha512 digest in base64.
    """
    tokens = value.split()
    pairs = []
    for token in tokens:
        match = _INTEGRITY_TOKEN.match(token)
        digest = None
        if match:
            try:
                digest = base64.b64decode(match.group(2), validate=True)
            except ValueError:
                digest = None
        if match is None or digest is None or len(digest) != hashlib.new(match[1]).digest_size:
            raise ValueError(
                f"{key} must be a Subresource Integrity hash such as"
                f" {DATASTAR_INTEGRITY!r} (sha256, sha384 or sha512, in base64), not {value!r}."
            )
        pairs.append((match.group(1), digest))
    if not pairs:
        raise ValueError(f"{key} is empty; leave it unset (None) or give a hash.")
    return pairs


def validate_integrity(value: str, key: str = "DATASTAR_JS_INTEGRITY") -> str:
    """Return *value* if it is a valid ``integrity`` attribute value.

    :param value: one or more ``sha384-<base64>`` tokens, separated by spaces.
    :param key: the setting or option the value came from, named in the error.
    :raises ValueError: it is not.
    """
    _parse_integrity(value, key)
    return value


def integrity_matches(data: bytes, integrity: str) -> bool:
    """Tell whether *data* matches *integrity* the way a browser decides it.

    Of the hashes in *integrity*, only those of the strongest algorithm count;
    *data* matches when its digest equals one of them.

    :param data: the script's bytes.
    :param integrity: an ``integrity`` attribute value, such as
        :data:`~flask_datastar.DATASTAR_INTEGRITY`.
    :raises ValueError: *integrity* is not a valid value.
    """
    pairs = _parse_integrity(integrity, "integrity")
    strongest = max(_ALGORITHMS.index(algorithm) for algorithm, _ in pairs)
    algorithm = _ALGORITHMS[strongest]
    digest = hashlib.new(algorithm, data).digest()
    return any(digest == expected for name, expected in pairs if name == algorithm)


def _sri(data: bytes, algorithm: str = "sha384") -> str:
    return f"{algorithm}-{base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


def _local_client_path(app: Flask) -> Path | None:
    """Return where ``flask datastar fetch`` writes the client for *app*.

    That is :data:`STATIC_FILENAME` inside the app's static folder, or ``None``
    when the app has none.

    :param app: the Flask app.
    """
    if not app.static_folder:
        return None
    return Path(app.static_folder) / STATIC_FILENAME


def _static_url(app: Flask) -> str:
    if has_request_context() and app.has_static_folder:
        # Honours SCRIPT_NAME (an app mounted under a prefix) and a static host.
        return url_for("static", filename=STATIC_FILENAME)
    return f"{app.static_url_path}/{STATIC_FILENAME}"


def _integrity_setting(config: Any) -> str | None:
    value = config.get("DATASTAR_JS_INTEGRITY") or None
    if value is None:
        return None
    return validate_integrity(str(value))


def _resolve() -> tuple[str, str | None]:
    """Return the client's address and the integrity hash to check it with (or ``None``)."""
    if not has_app_context():
        return DATASTAR_CDN_URL, DATASTAR_INTEGRITY
    app = current_app
    # Read on every call, not once in init_app: datastar_url() works without the
    # extension, and tests and apps change these two after start-up.
    url = app.config.get("DATASTAR_JS_URL") or None
    integrity = _integrity_setting(app.config)
    if url:
        # Some other file: only the app knows its hash.
        return str(url), integrity
    local = _local_client_path(app)
    if local is not None and local.is_file():
        return _static_url(app), integrity or DATASTAR_INTEGRITY
    return DATASTAR_CDN_URL, integrity or DATASTAR_INTEGRITY


def datastar_url() -> str:
    """Return the address of the Datastar client script, the one :func:`datastar_script` loads.

    Inside an application context it is, in order: ``DATASTAR_JS_URL`` when
    set; the app's own copy (``/static/datastar/datastar-1.0.2.js``) when
    ``flask datastar fetch`` has written it into the static folder; otherwise
    the official CDN address of the pinned release (:data:`~flask_datastar.DATASTAR_CDN_URL`).
    Outside one it is the CDN address.
    """
    return _resolve()[0]


def datastar_script(*, nonce: str | None = None) -> Markup:
    """Return the ``<script type="module">`` element that loads the Datastar client.

    Its address is :func:`datastar_url`'s. For the CDN and for the app's own
    copy it carries ``integrity`` (:data:`~flask_datastar.DATASTAR_INTEGRITY`, or
    ``DATASTAR_JS_INTEGRITY`` when set) and ``crossorigin="anonymous"``, so the
    browser refuses a file that is not the pinned release. For an address set
    with ``DATASTAR_JS_URL`` it carries ``integrity`` only when
    ``DATASTAR_JS_INTEGRITY`` is set. A Jinja global: ``{{ datastar_script() }}``.

    :param nonce: a Content Security Policy nonce for the element.
    :raises ValueError: ``DATASTAR_JS_INTEGRITY`` is not a valid hash.
    """
    url, integrity = _resolve()
    attributes = [("type", "module"), ("src", url)]
    if integrity:
        attributes.append(("integrity", integrity))
    attributes.append(("crossorigin", "anonymous"))
    if nonce:
        attributes.append(("nonce", nonce))
    rendered = " ".join(f'{name}="{escape(value)}"' for name, value in attributes)
    return Markup(f"<script {rendered}></script>")


# -- the `flask datastar` commands ---------------------------------------------------------

cli = AppGroup(
    "datastar",
    help=f"Serve the Datastar client (release {DATASTAR_VERSION}) from the app's static files.",
)


def _expected_integrity(option: str | None) -> str:
    if option:
        try:
            return validate_integrity(option, "--integrity")
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--integrity") from None
    return _integrity_setting(current_app.config) or DATASTAR_INTEGRITY


def _target() -> Path:
    target = _local_client_path(current_app)
    if target is None:
        raise click.ClickException(
            "The app has no static folder, so 'flask datastar fetch' has nowhere to write the"
            " client. Give Flask a 'static_folder', or serve the file yourself and set"
            " DATASTAR_JS_URL and DATASTAR_JS_INTEGRITY."
        )
    return target


def _download(url: str, timeout: float) -> bytes:
    if not url.startswith(("https://", "http://", "file:")):
        raise click.ClickException(f"--url must be an https://, http:// or file: URL, not {url!r}.")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data: bytes = response.read(_MAX_DOWNLOAD + 1)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise click.ClickException(
            f"Could not download the Datastar client from {url}: {reason}. Check the network"
            " connection, or pass --url with a mirror that serves the same file."
        ) from None
    if len(data) > _MAX_DOWNLOAD:
        raise click.ClickException(
            f"{url} sent more than {_MAX_DOWNLOAD} bytes, which is no Datastar client;"
            " nothing was written. Check the address."
        )
    return data


@cli.command("fetch")
@click.option(
    "--url",
    default=DATASTAR_CDN_URL,
    show_default=True,
    help="Where to download the client from, such as a mirror of the CDN.",
)
@click.option(
    "--integrity",
    default=None,
    help="The hash the file must have. Default: DATASTAR_JS_INTEGRITY, else the pinned one.",
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the server.")
def fetch_command(url: str, integrity: str | None, timeout: float) -> None:
    """Download the pinned Datastar client, check its hash and write it into the static folder.

    Nothing is written unless the file's hash matches. Afterwards
    {{ datastar_script() }} loads the client from the app's own static files.
    """
    expected = _expected_integrity(integrity)
    target = _target()
    if target.is_file() and integrity_matches(target.read_bytes(), expected):
        click.echo(f"{target} is already there and matches {expected}; nothing to do.")
        return
    data = _download(url, timeout)
    if not integrity_matches(data, expected):
        raise click.ClickException(
            f"The file from {url} ({len(data)} bytes, {_sri(data)}) does not match the"
            f" expected hash {expected}; nothing was written. A mirror must serve Datastar"
            f" {DATASTAR_VERSION}'s bundles/datastar.js unchanged; if you meant another"
            " build, pass its hash with --integrity and set DATASTAR_JS_INTEGRITY to it."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed over it, so a page never loads half a file.
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".datastar-", suffix=".js")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    click.echo(
        f"Wrote {target} ({len(data)} bytes, matching {expected}).\n"
        f"{{{{ datastar_script() }}}} now loads it from {_static_url(current_app)}."
    )


@cli.command("check")
def check_command() -> None:
    """Say where pages load the Datastar client from, and check the app's own copy.

    Fails when the copy in the static folder is missing or does not match its hash.
    """
    url, integrity = _resolve()
    if current_app.config.get("DATASTAR_JS_URL"):
        click.echo(
            f"DATASTAR_JS_URL is set: pages load the client from {url}"
            f" ({'integrity ' + integrity if integrity else 'no integrity hash'})."
        )
        return
    target = _target()
    expected = integrity or DATASTAR_INTEGRITY
    if not target.is_file():
        raise click.ClickException(
            f"There is no {target}: pages load the client from {url}, which needs the"
            " network. Run 'flask datastar fetch' to serve it from the app's static files."
        )
    data = target.read_bytes()
    if not integrity_matches(data, expected):
        raise click.ClickException(
            f"{target} ({len(data)} bytes, {_sri(data)}) does not match {expected}, so"
            " browsers will refuse to run it. Run 'flask datastar fetch' to replace it."
        )
    click.echo(f"{target} matches {expected}; pages load it from {url}.")
