"""gunicorn settings for example_app.py: ``gunicorn -c gunicorn.conf.py example_app:app``.

Every open stream holds one of a worker's threads for as long as the tab is
open, so threads are sized for the streams plus room for the short POST
commands. One worker, unless FLASK_DATASTAR_REDIS_URL is set: without a bus,
each worker would have its own counter and its own set of tabs.
"""

import os

from flask_datastar.gunicorn import post_worker_init, worker_exit  # noqa: F401

bind = os.environ.get("BIND", "127.0.0.1:8989")
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
threads = int(os.environ.get("GUNICORN_THREADS", "100"))
graceful_timeout = 10
# Under gthread, --timeout does not cut streams; keep the worker heartbeat default.
keepalive = 5
