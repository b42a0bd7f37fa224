"""The "poll" blueprint: the page, one stream per tab, and the vote command.

The stream registers in the handle's registry (``on_connect=voters.register``)
and sends the current results; a vote changes the app's poll and broadcasts
the new results to every tab, under the poll's lock so that tabs receive the
states in the order they happened.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import cast

from flask import Blueprint, abort, current_app, render_template_string

from flask_datastar import SSE, Stream

from .extensions import datastar, voters

bp = Blueprint("poll", __name__)

#: The choices, unless the app's ``POLL_OPTIONS`` says otherwise.
OPTIONS = ("Flask", "Django", "FastAPI")


class Poll:
    """The votes of one app, changed under :attr:`lock`.

    :param options: the choices, in the order shown.
    """

    def __init__(self, options: Iterable[str]) -> None:
        self.lock = threading.Lock()
        self.votes = dict.fromkeys(options, 0)

    def render(self) -> str:
        """Return the ``#results`` element (call it under :attr:`lock`)."""
        total = sum(self.votes.values())
        rows = [
            (option, count, round(100 * count / total) if total else 0)
            for option, count in self.votes.items()
        ]
        return render_template_string(RESULTS, rows=rows, total=total)


def current_poll() -> Poll:
    """Return the poll of the app serving the request."""
    return cast(Poll, current_app.extensions["poll"])


def broadcast_results(poll: Poll) -> None:
    """Send *poll*'s results to every tab of this app (call it under the poll's lock)."""
    # A newer result supersedes one still queued for a slow tab.
    voters.broadcast(SSE.patch_elements(poll.render()), coalesce="results")


PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Live poll</title>
  <script type="module" src="{{ datastar_url() }}"></script>
  <style>
    .bar { display: inline-block; height: 0.8em; background: #4a7; vertical-align: middle }
    #results li { margin: 0.3em 0 }
  </style>
</head>
<body data-init="{{ sse_get(url_for('poll.updates')) }}">
  <h1>Which framework?</h1>
  <p>
  {%- for option in options %}
    <button class="vote" data-option="{{ option }}"
            data-on:click="{{ sse_post(url_for('poll.vote', option=option)) }}">
      {{- option -}}
    </button>
  {%- endfor %}
  </p>
  {{ results|safe }}
  <p><button id="reset" data-on:click="{{ sse_post(url_for('admin.reset')) }}">Reset
     (the admin blueprint)</button></p>
</body>
</html>"""

RESULTS = """\
<div id="results">
  <ul>
  {%- for option, count, percent in rows %}
    <li data-option="{{ option }}"><b>{{ option }}</b>: <span class="count">{{ count }}</span>
        <span class="bar" style="width: {{ percent * 3 }}px"></span></li>
  {%- endfor %}
  </ul>
  <p id="total">{{ total }} vote{{ "" if total == 1 else "s" }}</p>
</div>"""


@bp.get("/")
def index() -> str:
    poll = current_poll()
    with poll.lock:
        return render_template_string(PAGE, options=list(poll.votes), results=poll.render())


@bp.get("/updates")
@datastar.sse(on_connect=voters.register)
def updates(gen: Stream) -> Iterator[object]:
    poll = current_poll()
    # Registered before this render: a vote lands either in it or in a broadcast.
    with poll.lock:
        gen.patch_elements(poll.render())
    yield gen.sleep(None)  # the votes speak through it


@bp.post("/vote/<option>")
def vote(option: str) -> tuple[str, int]:
    poll = current_poll()
    with poll.lock:
        if option not in poll.votes:
            abort(404, f"There is no option {option!r} in this poll.")
        poll.votes[option] += 1
        broadcast_results(poll)
    return "", 204
