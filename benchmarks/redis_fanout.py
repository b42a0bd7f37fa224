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

``--capacity`` measures Redis itself instead, for the capacity estimate of
docs/deployment-redis.md: one pipelining client publishes events of ``--payload``
bytes as fast as it can while N connections (as N bus listeners: N worker
processes) are subscribed, first on one ``redis-server``, then on a 3-primary
Redis Cluster (``redis-cli --cluster create``) with one channel per primary and
``SPUBLISH`` / ``SSUBSCRIBE``. It prints publishes/s, deliveries/s (messages
received by all subscribers) and the redis-server CPU time per publish and per
delivery, the number that scales: ``python benchmarks/redis_fanout.py --capacity``.
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


# -- capacity: what one redis-server, and a 3-primary cluster, carry -----------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def start_node(workdir: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    node_dir = Path(workdir) / f"node-{port}"
    node_dir.mkdir()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(node_dir),
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, proc, "redis-server")
    return proc, port


def capacity_run(
    nodes: list[tuple[int, int]],
    channels: list[tuple[str, int]],
    subscribers: int,
    payload_size: int,
    seconds: float,
    sharded: bool,
) -> dict[str, float]:
    """Publish as fast as one pipelining client can while *subscribers* processes listen.

    :param nodes: (pid, port) of each redis-server.
    :param channels: (channel, port of the node that owns it); each subscriber (one
        connection per node, as a bus listener per shard) takes every channel.
    :return: publishes/s, deliveries/s, and redis-server CPU seconds per publish and per
        delivery (all nodes together).
    """
    kind = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
    payload = b"x" * payload_size
    selector = selectors.DefaultSelector()
    received = [0]
    socks = []
    for _ in range(subscribers):
        for _, port in nodes:
            mine = [c.encode() for c, owner in channels if owner == port]
            if not mine:
                continue
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(resp(kind, *mine))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
    stop_reading = threading.Event()

    def read() -> None:
        while not stop_reading.is_set():
            for key, _ in selector.select(0.2):
                try:
                    data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                received[0] += len(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)  # the subscriptions are confirmed
    base = received[0]
    publishers = {port: socket.create_connection(("127.0.0.1", port)) for _, port in nodes}
    command = b"SPUBLISH" if sharded else b"PUBLISH"
    batches = [
        (publishers[port], resp(command, channel.encode(), payload) * 50)
        for channel, port in channels
    ]
    frame = len(resp(b"smessage" if sharded else b"message", channels[0][0].encode(), payload))
    per_publish = subscribers  # every subscriber takes every channel once

    def delivered() -> float:
        return (received[0] - base) / frame

    cpu_before = sum(cpu_seconds(pid) for pid, _ in nodes)
    published = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for sock, batch in batches:
            sock.sendall(batch)
        for sock, _ in batches:
            replies = 0
            while replies < 50:
                replies += sock.recv(1 << 16).count(b"\r\n")
        published += 50 * len(batches)
        # Flow control: at most 20,000 deliveries in flight, so that what is measured is
        # what Redis sustains end to end, not what it can pile up in output buffers.
        while published * per_publish - delivered() > 20_000:
            time.sleep(0.0005)
    while delivered() < published * per_publish and time.monotonic() - started < seconds + 5:
        time.sleep(0.001)
    elapsed = time.monotonic() - started
    cpu = sum(cpu_seconds(pid) for pid, _ in nodes) - cpu_before
    stop_reading.set()
    reader.join()
    done = delivered()
    for sock in [*socks, *publishers.values()]:
        sock.close()
    return {
        "publishes/s": published / elapsed,
        "deliveries/s": done / elapsed,
        "cpu us/publish": cpu / published * 1e6,
        "cpu us/delivery": cpu / max(done, 1) * 1e6,
        "cpu share": cpu / elapsed,
    }


def capacity(args: argparse.Namespace) -> None:
    """Measure Redis pub/sub capacity: one node, then a 3-primary cluster (sharded)."""
    print(
        f"payload {args.payload} bytes, {args.seconds} s per row, one pipelining publisher;"
        f" {os.cpu_count()} CPUs. 'subs' = subscribed processes (bus listeners).",
        flush=True,
    )
    print(
        "| setup | subs | publishes/s | deliveries/s | Redis CPU us/publish | us/delivery |", end=""
    )
    print(" Redis CPU |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="redis_capacity-") as workdir:
        proc, port = start_node(workdir)
        try:
            for subs in args.subscribers:
                row = capacity_run(
                    [(proc.pid, port)],
                    [("flask_datastar:bench", port)],
                    subs,
                    args.payload,
                    args.seconds,
                    sharded=False,
                )
                print_row("1 node", subs, row)
        finally:
            stop(proc)
        procs = [start_node(workdir, "--cluster-enabled", "yes", "--cluster-port",
                            str(free_port())) for _ in range(3)]  # fmt: skip
        try:
            subprocess.run(
                [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{p}" for _, p in procs), "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            time.sleep(2)  # every node sees the cluster as ok
            channels = cluster_channels([p for _, p in procs])
            nodes = [(proc.pid, p) for proc, p in procs]
            for subs in args.subscribers:
                row = capacity_run(nodes, channels, subs, args.payload, args.seconds, True)
                print_row("cluster, 3 primaries", subs, row)
        finally:
            for proc, _ in procs:
                stop(proc)


def cluster_channels(ports: list[int]) -> list[tuple[str, int]]:
    """One registry channel per primary, with the port that owns its slot."""
    import redis

    client = redis.Redis(port=ports[0])
    slots = client.execute_command("CLUSTER", "SLOTS")
    client.close()
    chosen: dict[int, str] = {}
    for index in range(1000):
        channel = f"flask_datastar:room-{index}"
        slot = redis.crc.key_slot(channel.encode())
        owner = next(int(s[2][1]) for s in slots if s[0] <= slot <= s[1])
        chosen.setdefault(owner, channel)
        if len(chosen) == len(ports):
            break
    return [(channel, port) for port, channel in chosen.items()]


def print_row(setup: str, subs: int, row: dict[str, float]) -> None:
    print(
        f"| {setup} | {subs} | {row['publishes/s']:,.0f} | {row['deliveries/s']:,.0f}"
        f" | {row['cpu us/publish']:.1f} | {row['cpu us/delivery']:.2f}"
        f" | {row['cpu share'] * 100:.0f} % |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tabs", type=int, default=200, help="open streams (default 200)")
    parser.add_argument("--broadcasts", type=int, default=60, help="measured broadcasts")
    parser.add_argument("--warmup", type=int, default=5, help="broadcasts not measured")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between them")
    parser.add_argument("--workers", type=int, default=3, help="workers of the Redis setup")
    parser.add_argument(
        "--capacity",
        action="store_true",
        help="measure Redis pub/sub capacity (one node, then a 3-primary cluster) instead",
    )
    parser.add_argument(
        "--subscribers", type=int, nargs="+", default=[1, 10, 50, 200],
        help="subscribed processes per capacity row (default 1 10 50 200)",
    )  # fmt: skip
    parser.add_argument("--payload", type=int, default=500, help="event bytes (capacity)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per capacity row")
    args = parser.parse_args()
    if args.capacity:
        capacity(args)
        return
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
