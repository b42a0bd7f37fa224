"""A test app that passes one hostile string through every flask_datastar helper.

Each button sends :data:`HOSTILE` through one helper; the browser test checks that
the page shows it as text and that nothing in it ran. Every payload that would run
sets ``window.__pwned``, opens an ``alert`` or POSTs ``/pwned`` (a Datastar
expression), so execution is visible. ``/raw`` is the control: it sends the same
string *unescaped*, and the test checks that this one is caught, proving the
detectors work.
"""

from __future__ import annotations

import json
import threading
from urllib.parse import unquote

from flask import Flask, render_template_string, request
from markupsafe import escape

from flask_datastar import SSE, DatastarResponse, FlaskDatastar, read_signals, sse_post

#: One string with a way out of every context the helpers write into.
HOSTILE = (
    "\"'` </script><script>window.__pwned = 'script'; alert('script')</script>"
    " <img src=x onerror=\"window.__pwned = 'img'; alert('img')\">"
    " <svg onload=\"window.__pwned = 'svg'\"></svg>"
    " '); window.__pwned = 'js-single'; ('"
    " \"); window.__pwned = 'js-double'; (\""
    " ${window.__pwned = 'template'}"
    " $__pwned = 'signal'; @post('/pwned')"
    " &amp; &lt;b&gt; &#x27; \\' \\u0027 \\x3c"
    " \u2028\u2029 -->"
    "\nsecond line"
)
#: The same without what a URL cannot keep as it is: the parser drops line breaks,
#: ``#`` starts the fragment and ``%`` starts an escape.
HOSTILE_URL_PART = HOSTILE.replace("\n", " ").replace("#", "").replace("%", "")

app = Flask(__name__)
app.config.from_prefixed_env()
datastar = FlaskDatastar(app)
pwned_lock = threading.Lock()
pwned_requests = 0

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Hostile strings</title>
  <script type="module" src="{{ datastar_url() }}"></script>
</head>
<body data-signals="{msg: ''}">
  <button id="text" data-on:click="{{ sse_post('/text') }}">patch_elements</button>
  <button id="signal" data-on:click="{{ sse_post('/signal') }}">patch_signals</button>
  <button id="console" data-on:click="{{ sse_post('/console') }}">console_log</button>
  <button id="redirect" data-on:click="{{ sse_post('/redirect') }}">redirect</button>
  <button id="url" data-on:click="{{ url_action }}">sse_post URL</button>
  <button id="payload" data-on:click="{{ payload_action }}">sse_post payload</button>
  <button id="raw" data-on:click="{{ sse_post('/raw') }}">control: unescaped</button>
  <p id="out"></p>
  <p id="signal-out" data-text="$msg"></p>
  <input id="signal-in" data-bind:msg>
  <p id="echo"></p>
  <p id="payload-ok"></p>
</body>
</html>"""

LANDING = """\
<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Landing</title></head>
<body><p id="landed">{{ query }}</p></body></html>"""


@app.get("/")
def index() -> str:
    return render_template_string(
        PAGE,
        url_action=sse_post("/echo?" + HOSTILE_URL_PART),
        payload_action=sse_post("/payload", payload={"q": HOSTILE, HOSTILE: "key"}),
    )


@app.post("/text")
def text() -> DatastarResponse:
    return DatastarResponse(SSE.patch_elements(f'<p id="out">{escape(HOSTILE)}</p>'))


@app.post("/signal")
def signal() -> DatastarResponse:
    return DatastarResponse(SSE.patch_signals({"msg": HOSTILE}))


@app.post("/console")
def console() -> DatastarResponse:
    return DatastarResponse(SSE.console_log(HOSTILE))


@app.post("/redirect")
def redirect() -> DatastarResponse:
    return DatastarResponse(SSE.redirect("/landing?" + HOSTILE_URL_PART))


@app.get("/landing")
def landing() -> str:
    return render_template_string(LANDING, query=unquote(request.query_string.decode("ascii")))


@app.post("/echo")
def echo() -> DatastarResponse:
    # The client re-serialises the query (URLSearchParams): compare the parsed pairs.
    pairs = json.dumps(list(request.args.items(multi=True)), ensure_ascii=False)
    return DatastarResponse(SSE.patch_elements(f'<p id="echo">{escape(pairs)}</p>'))


@app.post("/payload")
def payload() -> DatastarResponse:
    signals = read_signals()
    ok = signals == {"q": HOSTILE, HOSTILE: "key"}
    return DatastarResponse(
        SSE.patch_elements(
            f'<p id="echo">{escape(signals.get("q", ""))}</p><p id="payload-ok">{ok}</p>'
        )
    )


@app.post("/raw")
def raw() -> DatastarResponse:
    return DatastarResponse(SSE.patch_elements(f'<p id="out">{HOSTILE}</p>'))


@app.post("/pwned")
def pwned() -> tuple[str, int]:
    global pwned_requests
    with pwned_lock:
        pwned_requests += 1
    return "", 204


@app.get("/pwned")
def pwned_count() -> str:
    return str(pwned_requests)
