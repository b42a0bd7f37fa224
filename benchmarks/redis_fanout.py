"""Fan-out latency across gunicorn workers through Redis, against one worker in-process.

Run it from the repository root::

    python benchmarks/redis_fanout.py              # 200 tabs, 60 broadcasts per setup
    python benchmarks/redis_fanout.py --tabs 50 --broadcasts 20

It starts its own ``redis-server`` (Debian package) and, for each setup in turn,
its own ``gunicorn -k gthread`` serving the small app below, opens the same
number of streams (raw HTTP/1.1 sockets, read by one epoll thread), then sends
broadcasts one at a time, each as a POST on a new connection (so that with
several workers they come from all of them). The latency of one delivery is the
time from just before the POST is sent to the arrival of the event on one
stream; every delivery of every broadcast counts, after a few warm-up ones.

Setups, all in the same run with the same tabs and the same load:

- ``1 worker, in-process``: no bus, the reference;
- ``1 worker, Redis``: the same through Redis (the cost of the hop alone);
- ``3 workers, Redis``: the scaled-out deployment.

It prints p50 / p99 / max per setup and their ratios to the reference. Timing
belongs here, not in the tests; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- the app gunicorn serves (imported by the workers as ``redis_fanout:app``) ---------


def create_app() -> Any:
    """Return the benchmark's Flask app: ``GET /sse`` streams, ``POST /fire?seq=N`` broadcasts."""
    from flask import Flask, request

    from flask_datastar import SSE, FlaskDatastar, Stream

    app = Flask("redis_fanout")
    app.config.from_prefixed_env()  # FLASK_DATASTAR_REDIS_URL, when set
    datastar = FlaskDatastar(app)
    clients = datastar.registry(app, "bench")

    @app.get("/sse")
    @datastar.sse(on_connect=clients.register)
    def sse(gen: Stream) -> Iterator[Any]:
        gen.patch_signals({"pid": os.getpid()})
        yield gen.sleep(None)

    @app.post("/fire")
    def fire() -> tuple[str, int]:
        # ~300 bytes, as in the single-process measurements of the shared docs.
        clients.broadcast(SSE.patch_signals({"seq": int(request.args["seq"]), "pad": "x" * 240}))
        return "", 204

    return app


if os.environ.get("REDIS_FANOUT_APP") == "1":
    app = create_app()


# -- servers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}.")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on port {port} within {timeout} s.")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not on PATH: apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, proc, "redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"


def start_gunicorn(
    workers: int, threads: int, redis_url: str | None, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "REDIS_FANOUT_APP": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("FLASK_DATASTAR_REDIS_URL", None)
    if redis_url:
        env["FLASK_DATASTAR_REDIS_URL"] = redis_url
    command = [
        sys.executable, "-m", "gunicorn", "-k", "gthread",
        "--workers", str(workers), "--threads", str(threads),
        "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "2",
        "--pythonpath", str(Path(__file__).parent), "--config", "/dev/null",
        "redis_fanout:app",
    ]  # fmt: skip
    help_text = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True
    ).stdout
    if "--no-control-socket" in help_text:
        command.insert(-1, "--no-control-socket")
    with log.open("ab") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=out)
    wait_port(port, proc, "gunicorn")
    # Every worker must have imported the app before the tabs connect.
    deadline = time.monotonic() + 30
    while log.read_text(errors="replace").count("Booting worker") < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"gunicorn workers did not boot:\n{log.read_text()}")
        time.sleep(0.05)
    time.sleep(1.0)
    return proc, port


# -- the clients ----------------------------------------------------------------------

SEQ = re.compile(rb'"seq":\s*(\d+)')
PID = re.compile(rb'"pid":\s*(\d+)')


class Tabs:
    """N open streams, read by one epoll thread that notes when each broadcast arrives."""

    def __init__(self, port: int, count: int) -> None:
        self.socks: list[socket.socket] = []
        self.buffers: dict[int, bytes] = {}
        self.pids: dict[int, int] = {}
        self.arrivals: dict[int, list[float]] = {}
        self.lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        request = b"GET /sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            sock.setblocking(False)
            self.socks.append(sock)
            self.buffers[sock.fileno()] = b""
            self.selector.register(sock, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while len(self.pids) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"Only {len(self.pids)} of {count} streams started.")
            time.sleep(0.01)

    def _read(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(0.2):
                now = time.perf_counter()
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(sock)
                    continue
                fd = sock.fileno()
                buffer = self.buffers[fd] + data
                # Events end in a blank line; keep an unfinished one for the next read.
                end = buffer.rfind(b"\n\n")
                done, self.buffers[fd] = buffer[: end + 2], buffer[end + 2 :]
                if fd not in self.pids:
                    match = PID.search(done)
                    if match:
                        self.pids[fd] = int(match.group(1))
                for match in SEQ.finditer(done):
                    with self.lock:
                        self.arrivals.setdefault(int(match.group(1)), []).append(now)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        for sock in self.socks:
            sock.close()
        self.selector.close()


def fire(port: int, seq: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sent = time.perf_counter()
        connection.request("POST", f"/fire?seq={seq}")
        response = connection.getresponse()
        response.read()
        if response.status != 204:
            raise SystemExit(f"POST /fire answered {response.status}.")
        return sent
    finally:
        connection.close()


def measure(
    label: str, workers: int, redis_url: str | None, args: argparse.Namespace, log: Path
) -> dict[str, float]:
    proc, port = start_gunicorn(workers, args.tabs + 16, redis_url, log)
    tabs = None
    try:
        tabs = Tabs(port, args.tabs)
        spread = sorted(
            (list(tabs.pids.values()).count(pid) for pid in set(tabs.pids.values())),
            reverse=True,
        )
        sent: dict[int, float] = {}
        for seq in range(args.broadcasts + args.warmup):
            sent[seq] = fire(port, seq)
            time.sleep(args.interval)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with tabs.lock:
                if all(len(tabs.arrivals.get(s, ())) >= args.tabs for s in sent):
                    break
            time.sleep(0.05)
        latencies = []
        delivered = 0
        with tabs.lock:
            for seq, at in sent.items():
                if seq < args.warmup:
                    continue
                arrivals = tabs.arrivals.get(seq, [])
                delivered += len(arrivals)
                latencies += [(t - at) * 1000 for t in arrivals]
        expected = args.broadcasts * args.tabs
        latencies.sort()
        result = {
            "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "max": latencies[-1],
            "delivered": 100.0 * delivered / expected,
        }
        print(
            f"{label:<24} p50 {result['p50']:7.2f} ms  p99 {result['p99']:7.2f} ms"
            f"  max {result['max']:7.2f} ms  delivered {result['delivered']:5.1f} %"
            f"  streams per worker {spread}",
            flush=True,
        )
        return result
    finally:
        if tabs is not None:
            tabs.close()
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tabs", type=int, default=200, help="open streams (default 200)")
    parser.add_argument("--broadcasts", type=int, default=60, help="measured broadcasts")
    parser.add_argument("--warmup", type=int, default=5, help="broadcasts not measured")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between them")
    parser.add_argument("--workers", type=int, default=3, help="workers of the Redis setup")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="redis_fanout-") as workdir:
        redis_proc, redis_url = start_redis(workdir)
        log = Path(workdir) / "gunicorn.log"
        try:
            print(
                f"{args.tabs} tabs, {args.broadcasts} broadcasts of ~300 bytes,"
                f" one every {args.interval} s; {os.cpu_count()} CPUs",
                flush=True,
            )
            reference = measure("1 worker, in-process", 1, None, args, log)
            hop = measure("1 worker, Redis", 1, redis_url, args, log)
            scaled = measure(f"{args.workers} workers, Redis", args.workers, redis_url, args, log)
        except BaseException:
            if log.exists():
                sys.stderr.write(log.read_text(errors="replace")[-4000:])
            raise
        finally:
            stop(redis_proc)
    print()
    for label, result in (("1 worker, Redis", hop), (f"{args.workers} workers, Redis", scaled)):
        print(
            f"{label} / in-process: p50 x{result['p50'] / reference['p50']:.2f},"
            f" p99 x{result['p99'] / reference['p99']:.2f}"
        )


if __name__ == "__main__":
    main()
