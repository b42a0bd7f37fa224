"""A form validated on the server: the errors are patched back next to the fields.

The inputs are bound to signals; submitting the form (``data-on:submit``, which
Datastar keeps from reloading the page) POSTs them as JSON. The view reads them
with ``read_signals()``, validates them (including a check that needs server
state: an email that is already taken), and answers with one
``datastar-patch-elements`` event that replaces every error message by its id,
empty ones included, so fixed fields lose their message. When all is well the
form is replaced by a welcome message.

Run it with Flask's development server or with gunicorn (from the repository root)::

    python examples/forms.py                         # http://127.0.0.1:5000/
    gunicorn -c gunicorn.conf.py examples.forms:app   # http://127.0.0.1:8989/
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from flask import Flask, render_template_string
from markupsafe import Markup

from flask_datastar import SSE, DatastarResponse, FlaskDatastar, read_signals

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)

FIELDS = ("email", "age", "password")
# Signed-up emails, in memory: one process, one set (see redis_cqrs.py for several).
accounts: set[str] = set()
accounts_lock = threading.Lock()

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Sign up</title>
  {{ datastar_script() }}
  <style>.error { color: #b00020 } label { display: block; margin: 0.5em 0 }</style>
</head>
<body>
  <h1>Sign up</h1>
  <form id="signup" data-signals="{email: '', age: '', password: ''}"
        data-on:submit="{{ sse_post('/signup') }}">
    <label>Email <input id="email" data-bind:email autocomplete="off"></label>
    {{ error("email") }}
    <label>Age <input id="age" data-bind:age inputmode="numeric"></label>
    {{ error("age") }}
    <label>Password <input id="password" type="password" data-bind:password></label>
    {{ error("password") }}
    <button id="submit">Sign up</button>
  </form>
</body>
</html>"""

ERROR = '<p id="{{ field }}-error" class="error" role="alert">{{ message }}</p>'
WELCOME = '<div id="signup"><p id="welcome">Welcome, {{ email }}! Check your inbox.</p></div>'


def render_error(field: str, message: str = "") -> Markup:
    # Markup: the page template inserts it as HTML (the message itself was escaped).
    return Markup(render_template_string(ERROR, field=field, message=message))


def validate(signals: dict[str, Any]) -> dict[str, str]:
    """Return a message for each invalid field (none when all are valid)."""
    errors = {}
    email = str(signals.get("email", "")).strip()
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
        errors["email"] = "Enter an email address like name@example.com."
    elif email.lower() in accounts:
        errors["email"] = f"{email} already has an account."
    age = str(signals.get("age", "")).strip()
    if not age.isdigit():
        errors["age"] = "Enter your age in years, as a number."
    elif not 13 <= int(age) <= 130:
        errors["age"] = "You must be 13 or older to sign up."
    if len(str(signals.get("password", ""))) < 8:
        errors["password"] = "Use at least 8 characters."
    return errors


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, error=render_error)


@app.post("/signup")
def signup() -> DatastarResponse:
    signals = read_signals()
    with accounts_lock:
        errors = validate(signals)
        if not errors:
            email = str(signals["email"]).strip()
            accounts.add(email.lower())
            return DatastarResponse(
                SSE.patch_elements(render_template_string(WELCOME, email=email))
            )
    return DatastarResponse(
        SSE.patch_elements("\n".join(render_error(f, errors.get(f, "")) for f in FIELDS))
    )


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
