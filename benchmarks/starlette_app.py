"""The peer for ``fanout.py``: the CQRS demo with datastar-py and Starlette on uvicorn.

The same page, the same events and the same bytes for each event as
``example_app.py``, written the way a datastar-py user writes it on asyncio:

- ``GET /sse`` returns a ``DatastarResponse`` over an async generator. Each
  stream has its own :class:`asyncio.Queue` and its own ticker task, which
  sleeps a second (``asyncio.sleep(1)``) and puts the current content in the
  queue; the generator yields what the queue holds.
- ``POST /click`` counts the click, renders the content once and puts the same
  event in every stream's queue.

The content is rendered with Jinja2 from the example's own template
(``example_app.CONTENT``), once per change as in the example, and the events are
made by ``datastar_py.ServerSentEventGenerator.patch_elements``, which gives the
same text as flask_datastar's (checked at start-up).

Run it with ``python benchmarks/starlette_app.py --port 8991``: uvicorn with uvloop
and httptools, one worker, no access log (gunicorn's default), the open-file
limit raised to its hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jinja2
from datastar_py.sse import DatastarEvent
from datastar_py.sse import ServerSentEventGenerator as SSE
from datastar_py.starlette import DatastarResponse
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Only for the templates' text: the page and the content are the example's.
from example_app import CONTENT, PAGE  # noqa: E402
from flask_datastar.client import DATASTAR_CDN_URL  # noqa: E402

TICK = 1.0

env = jinja2.Environment(autoescape=True)
# The example's template calls these helpers; a datastar-py app would write its own.
env.globals.update(
    sse_get=lambda url: f"@get('{url}')",
    sse_post=lambda url: f"@post('{url}')",
    datastar_script=lambda: Markup(f'<script type="module" src="{DATASTAR_CDN_URL}"></script>'),
)
content_template = env.from_string(CONTENT)
page_template = env.from_string(PAGE)

clicks = 0
last_render: tuple[tuple[str, int], str] = (("", -1), "")
subscribers: set[asyncio.Queue[DatastarEvent]] = set()


def render_content() -> str:
    """Render ``#content`` once per change (time to the second, count), as the example does."""
    global last_render
    state = (time.strftime("%H:%M:%S"), clicks)
    if last_render[0] != state:
        last_render = (state, content_template.render(now=state[0], clicks=state[1]))
    return last_render[1]


async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(page_template.render(content=Markup(render_content())))


async def ticker(queue: asyncio.Queue[DatastarEvent]) -> None:
    while True:
        await asyncio.sleep(TICK)
        queue.put_nowait(SSE.patch_elements(render_content()))


async def sse(request: Request) -> DatastarResponse:
    queue: asyncio.Queue[DatastarEvent] = asyncio.Queue()

    async def events() -> AsyncIterator[DatastarEvent]:
        subscribers.add(queue)
        tick = asyncio.create_task(ticker(queue))
        try:
            yield SSE.patch_elements(render_content())
            while True:
                yield await queue.get()
        finally:
            tick.cancel()
            subscribers.discard(queue)

    return DatastarResponse(events())


async def click(request: Request) -> Response:
    global clicks
    await request.body()
    clicks += 1
    event = SSE.patch_elements(render_content(), selector="#content")
    for queue in subscribers:
        queue.put_nowait(event)
    return Response(status_code=204)


app = Starlette(
    routes=[
        Route("/", index),
        Route("/sse", sse),
        Route("/click", click, methods=["POST"]),
    ]
)


def check_bytes() -> None:
    """Fail at start-up if datastar-py's events differ from flask_datastar's."""
    import example_app
    from flask_datastar import SSE as FlaskSSE

    html = render_content()
    if html != example_app.content_template.render(now=last_render[0][0], clicks=clicks):
        raise SystemExit("The Starlette app's content differs from the example's.")
    for selector in (None, "#content"):
        ours = str(SSE.patch_elements(html, selector=selector))
        if ours != str(FlaskSSE.patch_elements(html, selector=selector)):
            raise SystemExit(f"datastar-py's event (selector={selector!r}) differs: {ours!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The Starlette peer of fanout.py.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8991)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv)
    import uvicorn

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    check_bytes()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        backlog=args.backlog,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=3,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
