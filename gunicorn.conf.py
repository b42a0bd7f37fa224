"""gunicorn settings for example_app.py: ``gunicorn -c gunicorn.conf.py example_app:app``.

An open stream holds a socket, not a thread: it gives its thread back at its
handler's first pause, and its steps run on flask_datastar's scheduler (see
docs/deployment.rst, "Where a stream runs"). Threads serve the short requests
(page loads, POST commands) and the few streams that keep one. One worker,
unless FLASK_DATASTAR_REDIS_URL is set: without a bus, each worker would have
its own counter and its own set of tabs.
"""

import os

from flask_datastar.gunicorn import post_worker_init, worker_exit  # noqa: F401

bind = os.environ.get("BIND", "127.0.0.1:8989")
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
graceful_timeout = 10
# Under gthread, --timeout does not cut streams; keep the worker heartbeat default.
keepalive = 5
