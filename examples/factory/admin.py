"""The "admin" blueprint: a command that reaches the poll's tabs through the same handle.

It imports ``voters`` from ``extensions.py`` like the poll blueprint does; a
reset here updates every tab that the poll blueprint's stream registered.
"""

from __future__ import annotations

from flask import Blueprint

from flask_datastar import SSE

from .extensions import voters
from .poll import current_poll

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.post("/reset")
def reset() -> tuple[str, int]:
    poll = current_poll()
    with poll.lock:
        poll.votes = dict.fromkeys(poll.votes, 0)
        voters.broadcast(SSE.patch_elements(poll.render()), coalesce="results")
    return "", 204
