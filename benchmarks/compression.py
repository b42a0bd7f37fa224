"""What compressed streams give and cost: ratio on the demo's stream, memory, CPU, fan-out.

Four measurements, each printed as a markdown table (``--json FILE`` keeps every value):

1. **ratio**: the demo (``example_app.py``) under gunicorn for ``--seconds`` with a
   click every second; one stream per encoding open at the same time (identity,
   gzip, br, zstd), each decoded as it arrives. Reported: wire bytes / decoded
   bytes, per encoding, as flask_datastar sends them (context kept, one flush per
   event). Then the identity stream's capture is compressed again offline with
   other windows, and with no context kept (each event compressed alone).
2. **memory**: the RSS that 1,000 compressors add to a fresh process once each has
   compressed 40 events of the capture, per stream, per encoding and window.
3. **cpu**: microseconds to compress one event of the capture (with its flush).
4. **fanout**: ``--streams`` raw clients on one gunicorn worker, ``--rate`` clicks per
   second for ``--duration`` seconds, once per encoding: fan-out latency (POST sent to
   event decoded at each client), server CPU and worker RSS per stream.

::

    python benchmarks/compression.py                       # all four, ~3 minutes
    python benchmarks/compression.py --only ratio,memory,cpu --seconds 20
    python benchmarks/compression.py --only fanout --streams 1000 --duration 10
    python benchmarks/compression.py --only fanout --streams 1000 --encodings identity,zstd --runs 4

Linux only (``/proc``); needs gunicorn, zstandard and brotli (``pip install -e
".[test]"``), and uses the servers and the raw client of ``tests/helpers.py``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import brotli  # noqa: E402
import zstandard  # noqa: E402

from flask_datastar.compression import make_encoder  # noqa: E402
from tests.helpers import GunicornServer, RawHTTPStream, post  # noqa: E402

ENCODINGS = ["gzip", "br", "zstd"]
SSE_PATH = "/sse?datastar=%7B%7D"
COUNT_RE = re.compile(rb"Button clicks: <strong>(\d+)</strong>")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def decompressor(encoding: str) -> Callable[[bytes], bytes]:
    """Return a function that decodes the next piece of a stream in *encoding*."""
    if encoding == "gzip":
        return zlib.decompressobj(wbits=31).decompress
    if encoding == "br":
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress  # type: ignore[no-any-return]
    return lambda data: data


def table(title: str, head: list[str], rows: list[list[Any]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


# -- 1. ratio --------------------------------------------------------------------------


def measure_ratio(seconds: float) -> dict[str, Any]:
    """Stream the demo to one client per encoding at once; return sizes and the capture."""
    streams: dict[str, RawHTTPStream] = {}
    wire = dict.fromkeys(["identity", *ENCODINGS], 0)
    decoded = dict.fromkeys(wire, 0)
    capture: list[bytes] = []
    with GunicornServer("example_app:app", threads=16) as server:
        for encoding in wire:
            headers = {"Accept-Encoding": encoding, "Datastar-Request": "true"}
            streams[encoding] = RawHTTPStream(server.port, SSE_PATH, headers=headers)
            got = streams[encoding].headers.get("Content-Encoding", "identity")
            assert got == encoding, f"asked for {encoding}, got {got}"
        decoders = {encoding: decompressor(encoding) for encoding in wire}
        stop = time.monotonic() + seconds

        def read(encoding: str) -> None:
            while time.monotonic() < stop:
                try:
                    chunk = streams[encoding].read_chunk(timeout=1)
                except TimeoutError:
                    continue
                assert chunk is not None
                wire[encoding] += len(chunk)
                data = decoders[encoding](chunk)
                decoded[encoding] += len(data)
                if encoding == "identity":
                    capture.append(data)

        readers = [threading.Thread(target=read, args=(e,)) for e in wire]
        for reader in readers:
            reader.start()
        while time.monotonic() < stop:
            post(server.url + "/click", json={})
            time.sleep(1)
        for reader in readers:
            reader.join()
        for stream in streams.values():
            stream.close()
    return {"wire": wire, "decoded": decoded, "capture": capture}


def offline_ratio(capture: list[bytes], encoding: str, bits: int, context: bool) -> float:
    raw = sum(map(len, capture))
    if context:
        encoder = make_encoder(encoding, bits)
        return sum(len(encoder.compress(event)) for event in capture) / raw
    return sum(len(make_encoder(encoding, bits).compress(event)) for event in capture) / raw


# -- 2. memory -------------------------------------------------------------------------

_MEMORY_CHILD = """
import gc, json, sys
from flask_datastar.compression import make_encoder
capture = [bytes(e, "latin-1") for e in json.load(sys.stdin)]
encoding, bits, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
for event in capture: make_encoder(encoding, bits).compress(event)  # libraries loaded
gc.collect(); before = rss()
encoders = [make_encoder(encoding, bits) for _ in range(count)]
for encoder in encoders:
    for event in capture:
        encoder.compress(event)
gc.collect()
print((rss() - before) / count)
"""


def measure_memory(capture: list[bytes], encoding: str, bits: int, count: int = 1000) -> float:
    """Bytes of RSS one compressor adds, averaged over *count* in a fresh process."""
    events = json.dumps([event.decode("latin-1") for event in capture[:40]])
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, encoding, str(bits), str(count)],
        input=events,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    return float(result.stdout)


# -- 3. cpu ----------------------------------------------------------------------------


def measure_cpu(capture: list[bytes], encoding: str, bits: int, rounds: int = 20) -> float:
    """Microseconds of CPU per event compressed (and flushed)."""
    start = time.process_time()
    for _ in range(rounds):
        encoder = make_encoder(encoding, bits)
        for event in capture:
            encoder.compress(event)
    return (time.process_time() - start) / (rounds * len(capture)) * 1e6


# -- 4. fan-out ------------------------------------------------------------------------


class Client:
    """One raw stream on a non-blocking socket: chunked framing, decoding, click counts."""

    def __init__(self, port: int, encoding: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        accept = "" if encoding == "identity" else f"Accept-Encoding: {encoding}\r\n"
        self.sock.sendall(
            f"GET {SSE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nDatastar-Request: true\r\n"
            f"{accept}\r\n".encode()
        )
        self.sock.setblocking(False)
        self.raw = bytearray()
        self.head = False
        self.decode = decompressor(encoding)
        self.text = b""
        self.best = -1
        self.arrivals: dict[int, float] = {}
        self.chunks = 0

    def on_readable(self) -> None:
        data = self.sock.recv(262144)
        now = time.time()
        if not data:
            raise ConnectionError("the server closed a stream")
        self.raw += data
        if not self.head:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            del self.raw[: end + 4]
            self.head = True
        body = bytearray()
        while True:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                break
            size = int(self.raw[:line_end], 16)
            if len(self.raw) < line_end + 2 + size + 2:
                break
            body += self.raw[line_end + 2 : line_end + 2 + size]
            del self.raw[: line_end + 4 + size]
            self.chunks += 1
        if body:
            self.text = (self.text + self.decode(bytes(body)))[-4096:]
            for match in COUNT_RE.finditer(self.text):
                count = int(match.group(1))
                if count > self.best:
                    for k in range(self.best + 1, count + 1):
                        self.arrivals.setdefault(k, now)
                    self.best = count


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def measure_fanout(encoding: str, streams: int, rate: float, duration: float) -> dict[str, Any]:
    """Open *streams* clients, click at *rate* for *duration* s; return the numbers."""
    # All the clients come from 127.0.0.1: no fair share here.
    env = {"FLASK_DATASTAR_MAX_STREAMS": str(streams + 5), "FLASK_DATASTAR_CLIENT_SHARE": "1"}
    with GunicornServer("example_app:app", threads=streams + 20, env=env) as server:
        [pid] = server.worker_pids()
        post(server.url + "/click", json={})
        rss_idle = rss_bytes(pid)
        selector = selectors.DefaultSelector()
        clients = []
        for _ in range(streams):
            client = Client(server.port, encoding)
            selector.register(client.sock, selectors.EVENT_READ, client)
            clients.append(client)

        def pump(until: Callable[[], bool], deadline: float) -> None:
            while not until() and time.monotonic() < deadline:
                for key, _ in selector.select(0.05):
                    key.data.on_readable()

        pump(lambda: all(c.best >= 0 for c in clients), time.monotonic() + 60)
        base = max(c.best for c in clients)
        sent: dict[int, float] = {}
        stop = threading.Event()

        def clicker() -> None:
            k = base
            next_at = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            headers = {"Datastar-Request": "true", "Content-Type": "application/json"}
            while not stop.is_set():
                k += 1
                sent[k] = time.time()
                connection.request("POST", "/click", body=b"{}", headers=headers)
                connection.getresponse().read()
                next_at += 1 / rate
                time.sleep(max(0.0, next_at - time.monotonic()))

        thread = threading.Thread(target=clicker)
        cpu_start, wall_start = cpu_seconds(pid), time.monotonic()
        chunks_start = sum(c.chunks for c in clients)
        thread.start()
        pump(lambda: False, time.monotonic() + duration)
        stop.set()
        thread.join()
        cpu_used = cpu_seconds(pid) - cpu_start
        cpu = cpu_used / (time.monotonic() - wall_start)
        delivered = sum(c.chunks for c in clients) - chunks_start
        rss = rss_bytes(pid)
        last = max(sent)
        pump(lambda: all(c.best >= last for c in clients), time.monotonic() + 5)
        latencies = [
            (client.arrivals[k] - t) * 1000
            for k, t in sent.items()
            for client in clients
            if k in client.arrivals
        ]
        expected = len(sent) * len(clients)
        for client in clients:
            client.sock.close()
    latencies.sort()
    return {
        "encoding": encoding,
        "streams": streams,
        "clicks": len(sent),
        "delivery_pct": 100 * len(latencies) / expected,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "server_cpu_pct": 100 * cpu,
        # Server CPU per chunk a client received (an event, or a few written together).
        "server_us_per_chunk": 1e6 * cpu_used / max(delivered, 1),
        "rss_per_stream_kb": (rss - rss_idle) / streams / 1024,
    }


# -- main ------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="ratio,memory,cpu,fanout")
    parser.add_argument("--seconds", type=float, default=60, help="length of the capture")
    parser.add_argument("--streams", type=int, default=200, help="fan-out: open streams")
    parser.add_argument("--rate", type=float, default=10, help="fan-out: clicks per second")
    parser.add_argument("--duration", type=float, default=10, help="fan-out: seconds")
    parser.add_argument(
        "--encodings",
        default="identity,gzip,zstd,br",
        help="fan-out: the encodings to run, identity (the reference) first",
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="fan-out: rounds of all the encodings (medians)"
    )
    parser.add_argument("--json", help="write every value to this file")
    args = parser.parse_args()
    only = set(args.only.split(","))
    fanout_encodings = args.encodings.split(",")
    if fanout_encodings[0] != "identity":
        parser.error("--encodings: the first must be identity, the reference of the ratios")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, Any] = {}

    if only & {"ratio", "memory", "cpu"}:
        print(f"capturing the demo's stream for {args.seconds:.0f} s ...", file=sys.stderr)
        ratio = measure_ratio(args.seconds)
        capture = ratio.pop("capture")
        events = [event for event in capture if len(event) > 10]  # ticks and clicks only
    if "ratio" in only:
        wire, decoded = ratio["wire"], ratio["decoded"]
        results["ratio_live"] = {e: wire[e] / decoded[e] for e in ENCODINGS}
        table(
            f"Ratio on the wire: the demo for {args.seconds:.0f} s, a click a second,"
            f" {len(events)} events, {decoded['identity']} bytes",
            ["encoding", "decoded bytes", "wire bytes", "wire / decoded"],
            [[e, decoded[e], wire[e], f"{100 * wire[e] / decoded[e]:.2f} %"] for e in ENCODINGS],
        )
        rows, offline = [], {}
        for encoding in ENCODINGS:
            row: list[Any] = [encoding]
            for bits in (10, 12, 14):
                value = offline_ratio(events, encoding, bits, context=True)
                offline[f"{encoding}/{1 << bits}"] = value
                row.append(f"{100 * value:.2f} %")
            value = offline_ratio(events, encoding, 12, context=False)
            offline[f"{encoding}/no-context"] = value
            rows.append([*row, f"{100 * value:.2f} %"])
        results["ratio_offline"] = offline
        table(
            "Ratio offline on the same capture, one flush per event",
            ["encoding", "1 KiB window", "4 KiB (default)", "16 KiB", "no context kept"],
            rows,
        )
    if "memory" in only:
        rows, memory = [], {}
        for encoding in ENCODINGS:
            row = [encoding]
            for bits in (12, 14):
                value = measure_memory(events, encoding, bits)
                memory[f"{encoding}/{1 << bits}"] = value
                row.append(f"{value / 1024:.1f} KiB")
            rows.append(row)
        results["memory_per_stream"] = memory
        table("Memory per stream (RSS of 1,000 compressors)", ["encoding", "4 KiB", "16 KiB"], rows)
    if "cpu" in only:
        cpu = {e: measure_cpu(events, e, 12) for e in ENCODINGS}
        results["cpu_us_per_event"] = cpu
        table(
            f"CPU per event (mean {statistics.mean(map(len, events)):.0f} bytes)",
            ["encoding", "µs per event"],
            [[e, f"{cpu[e]:.1f}"] for e in ENCODINGS],
        )
    if "fanout" in only:
        rounds = []
        for number in range(args.runs):
            runs = []
            for encoding in fanout_encodings:
                print(
                    f"fan-out {number + 1}/{args.runs}: {args.streams} streams, {encoding} ...",
                    file=sys.stderr,
                )
                runs.append(measure_fanout(encoding, args.streams, args.rate, args.duration))
            base = runs[0]
            for r in runs:  # each ratio against the identity run of the same round
                r["cpu_x"] = r["server_cpu_pct"] / base["server_cpu_pct"]
                r["p99_x"] = r["p99_ms"] / base["p99_ms"]
            rounds.append(runs)
            table(
                f"Fan-out, round {number + 1}: {args.streams} streams, {args.rate:g} clicks/s"
                f" for {args.duration:g} s, one gunicorn worker (direct path)",
                [
                    "encoding",
                    "delivery",
                    "p50",
                    "p99",
                    "server CPU",
                    "µs / chunk",
                    "RSS / stream",
                    "CPU x",
                    "p99 x",
                ],
                [
                    [
                        r["encoding"],
                        f"{r['delivery_pct']:.1f} %",
                        f"{r['p50_ms']:.1f} ms",
                        f"{r['p99_ms']:.1f} ms",
                        f"{r['server_cpu_pct']:.0f} %",
                        f"{r['server_us_per_chunk']:.0f}",
                        f"{r['rss_per_stream_kb']:.0f} KiB",
                        f"{r['cpu_x']:.2f}",
                        f"{r['p99_x']:.2f}",
                    ]
                    for r in runs
                ],
            )
        results["fanout"] = rounds[0] if len(rounds) == 1 else rounds
        if len(rounds) > 1:
            rows = []
            for i, encoding in enumerate(fanout_encodings[1:], 1):
                cpu_x = [runs[i]["cpu_x"] for runs in rounds]
                p99_x = [runs[i]["p99_x"] for runs in rounds]
                rss = [
                    runs[i]["rss_per_stream_kb"] - runs[0]["rss_per_stream_kb"] for runs in rounds
                ]
                rows.append(
                    [
                        encoding,
                        f"{statistics.median(cpu_x):.2f} ({', '.join(f'{x:.2f}' for x in cpu_x)})",
                        f"{statistics.median(p99_x):.2f} ({', '.join(f'{x:.2f}' for x in p99_x)})",
                        f"{statistics.median(rss):+.0f} KiB",
                    ]
                )
            table(
                f"Fan-out over {len(rounds)} rounds: medians of the ratios to identity"
                " in the same round",
                [
                    "encoding",
                    "CPU x (each round)",
                    "p99 x (each round)",
                    "RSS / stream vs identity",
                ],
                rows,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
