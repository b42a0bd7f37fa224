"""Fan-out benchmark: flask_datastar's engine against the plain thread-per-stream design.

Starts ``example_app:app`` (flask_datastar) and ``reference_app:app`` (each
stream's thread blocks on its own ``queue.Queue``) under the same gunicorn
settings (``-k gthread -w 1``, threads for every stream plus spare ones), one
fresh server per measurement, opens N raw SSE clients on one asyncio loop,
sends ``POST /click`` at a fixed rate from a separate process, and reports for
each server and N: fan-out latency, delivery, POST latency, server CPU and
memory per open stream, then the ratios, and a scenario with stalled clients.

::

    python benchmarks/fanout.py                              # the full run (N=100,500,1000)
    python benchmarks/fanout.py --streams 50 --duration 3 --stalled 0   # a quick check
    python benchmarks/fanout.py --json results.json

See ``benchmarks/README.md`` for what each column means. Linux only (it reads
``/proc``); needs the project's dependencies and gunicorn
(``pip install -e ".[gunicorn]"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from _client import (  # noqa: E402
    COUNT_RE,
    SSEClient,
    StalledClient,
    count_ended,
    request_bytes,
)

HOST = "127.0.0.1"
SSE_PATH = "/sse?datastar=%7B%7D"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ServerKind:
    """A server to measure: the app, its gunicorn config file and its environment."""

    name: str
    label: str
    app: str
    config: str | None
    env: dict[str, str] = field(default_factory=dict)


SERVERS = {
    "flask_datastar": ServerKind(
        "flask_datastar", "flask_datastar", "example_app:app", "gunicorn.conf.py"
    ),
    # The same app with the direct-write path switched off: the portable queue path.
    "flask_datastar-queue": ServerKind(
        "flask_datastar-queue",
        "flask_datastar (queue path)",
        "example_app:app",
        "gunicorn.conf.py",
        {"FLASK_DATASTAR_DIRECT_WRITES": "false"},
    ),
    "reference": ServerKind(
        "reference", "reference (thread per stream)", "reference_app:app", None
    ),
}


# -- servers ------------------------------------------------------------------------


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry.name))
    return sorted(children)


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds used so far by process *pid* (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Return the resident set size of process *pid*."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def machine_cpu() -> tuple[float, float]:
    """Return (busy, total) jiffies of the whole machine, from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, already counted in user
    return total - idle, total


def _gunicorn_flags() -> list[str]:
    """Return ``--no-control-socket`` where gunicorn has a control socket (27 and later)."""
    from gunicorn import config

    for setting in getattr(config, "KNOWN_SETTINGS", ()):
        if "--no-control-socket" in (getattr(setting, "cli", None) or ()):
            return ["--no-control-socket"]
    return []


class Server:
    """One gunicorn master with one gthread worker, stopped on exit whatever happens.

    :param kind: the app to serve.
    :param threads: the worker's threads (one per open stream, plus spare ones).
    :param env: more environment variables for the server.
    :param log_dir: where the server's log file goes.
    """

    def __init__(self, kind: ServerKind, threads: int, env: dict[str, str], log_dir: Path) -> None:
        self.kind = kind
        self.threads = threads
        self.env = {**kind.env, **env}
        self.port = free_port()
        self.log_path = log_dir / f"{kind.name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self, config: Path) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn",
            "-k", "gthread", "--workers", "1", "--threads", str(self.threads),
            # gthread refuses connections past worker_connections (default 1000) and keeps
            # POST connections alive only below it: leave room above the threads.
            "--worker-connections", str(self.threads + 200),
            "--backlog", "4096",
            "--bind", f"{HOST}:{self.port}",
            "--keep-alive", "5", "--graceful-timeout", "3",
            "--log-level", "warning",
            "--config", str(config),
            *_gunicorn_flags(),
            self.kind.app,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until its worker answers ``GET /``."""
        if self.kind.config is not None:
            config = REPO_ROOT / self.kind.config
        else:
            # An explicit empty config, or gunicorn would read ./gunicorn.conf.py.
            config = self.log_path.with_suffix(".conf.py")
            config.write_text("# No settings: everything is on the command line.\n")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        paths = [REPO_ROOT, BENCH_DIR, *filter(None, env.get("PYTHONPATH", "").split(":"))]
        env["PYTHONPATH"] = os.pathsep.join(map(str, paths))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(config),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C reaches only this script, which stops it.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn for {self.kind.app} exited with status {self.proc.returncode}."
                    f" Its log:\n{self.log_tail()}"
                )
            workers = _children(self.proc.pid)
            if len(workers) == 1:
                try:
                    with urllib.request.urlopen(self.url + "/", timeout=2) as response:
                        if response.status == 200:
                            self.worker = workers[0]
                            return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"gunicorn for {self.kind.app} was not ready after {timeout} s. Its log:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL to its process group after a grace time."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
        # The group is the master's own session: the worker goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.proc = None

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def current_count(server: Server) -> int:
    """Read the click counter from the page."""
    status, page = http_request(server.url + "/")
    match = COUNT_RE.search(page)
    if status != 200 or match is None:
        raise RuntimeError(f"GET / on {server.kind.app} did not show the click counter.")
    return int(match.group(1))


def warm_up(server: Server) -> None:
    """Load everything a measured run uses (templates, broadcaster, socket watcher).

    So the memory measured with no stream open already holds the fixed costs.
    """
    for _ in range(3):
        http_request(server.url + "/")
        status, _ = http_request(server.url + "/click", "POST", b"{}")
        if status != 204:
            raise RuntimeError(f"POST /click on {server.kind.app} answered {status}, not 204.")
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(request_bytes(HOST, server.port, SSE_PATH))
        received = b""
        while b"\n\n" not in received.partition(b"\r\n\r\n")[2]:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError(f"GET /sse on {server.kind.app} ended before its first event.")
            received += data
    time.sleep(0.5)


# -- one measurement ------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted *values*; ``None`` when empty."""
    if not values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(values)))
    return values[rank - 1]


def ms(value: float | None) -> float | None:
    """Seconds to milliseconds, rounded for the report."""
    return None if value is None else round(value * 1000, 2)


@dataclass
class Options:
    """The command line settings every measurement uses."""

    duration: float
    rate: float
    drain: float
    connect_concurrency: int
    extra_threads: int
    warmup: float
    stall_lead: float
    env: dict[str, str]
    log_dir: Path


async def _open_clients(port: int, n: int, concurrency: int) -> list[SSEClient]:
    clients = [SSEClient(HOST, port, SSE_PATH) for _ in range(n)]
    gate = asyncio.Semaphore(concurrency)

    async def open_one(client: SSEClient) -> None:
        async with gate:
            await client.connect()
            # Holding the gate until the first event paces the server's thread creation.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client.first_event.wait(), 30)

    await asyncio.gather(*(open_one(client) for client in clients))
    return clients


async def _clicker(port: int, rate: float, count: int, start_at: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH_DIR / "_client.py"), "click",
        "--host", HOST, "--port", str(port), "--rate", str(rate),
        "--count", str(count), "--start-at", repr(start_at),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"The clicker exited with status {proc.returncode}.")
    result: dict[str, Any] = json.loads(out)
    return result


async def measure(server: Server, n: int, stalled: int, opts: Options) -> dict[str, Any]:
    """Open *n* streams (and *stalled* stalled ones), click for the duration, and measure."""
    pid = server.worker
    base = current_count(server)
    rss_empty = rss_bytes(pid)
    clients: list[SSEClient] = []
    stallers: list[StalledClient] = []
    try:
        # The stalled clients come first, so they have backed up by the time the window opens.
        for _ in range(stalled):
            stallers.append(StalledClient(HOST, server.port, SSE_PATH))
        connect_started = time.monotonic()
        clients = await _open_clients(server.port, n, opts.connect_concurrency)
        connect_time = time.monotonic() - connect_started
        not_open = [c for c in clients if c.max_count < 0]
        if not_open:
            reasons = sorted({c.error or "no first event in 30 s" for c in not_open})
            raise RuntimeError(
                f"{len(not_open)} of {n} streams did not open on {server.kind.app}: {reasons[:3]}."
                f" Server log:\n{server.log_tail()}"
            )
        await asyncio.sleep(1.0)

        # Clicks start `lead` seconds before the measurement window: a steady state, and
        # stalled clients whose buffers are full by the time it opens.
        lead = max(opts.warmup, opts.stall_lead if stalled else 0.0)
        lead_clicks = round(lead * opts.rate)
        clicks = lead_clicks + round(opts.duration * opts.rate)
        start_at = time.time() + 0.5
        clicker = asyncio.ensure_future(_clicker(server.port, opts.rate, clicks, start_at))
        await asyncio.sleep(max(0.0, start_at + lead_clicks / opts.rate - time.time()))
        cpu0, client0, machine0 = cpu_seconds(pid), time.process_time(), machine_cpu()
        events0, wall0 = sum(c.events for c in clients), time.monotonic()
        await asyncio.sleep(opts.duration)
        cpu1, client1, machine1 = cpu_seconds(pid), time.process_time(), machine_cpu()
        events1, wall1 = sum(c.events for c in clients), time.monotonic()
        rss_full = rss_bytes(pid)
        threads = len(os.listdir(f"/proc/{pid}/task"))
        click = await clicker

        all_sends: list[float] = click["sends"]
        final = base + len(all_sends)
        deadline = time.monotonic() + opts.drain
        while time.monotonic() < deadline:
            if all(c.max_count >= final or c.sock is None for c in clients):
                break
            await asyncio.sleep(0.05)

        stalled_ended = count_ended(stallers, 2.0) if stallers else 0
    finally:
        for client in clients:
            client.close()
        for staller in stallers:
            staller.close()

    # The k-th click sent (in send order) is the one after which the counter can first
    # reach base + k; a client that shows base + k or more has the state of that click.
    sends = all_sends[lead_clicks:]
    base += min(lead_clicks, len(all_sends))
    latencies: list[float] = []
    seen_latencies: list[float] = []
    lags: list[float] = []
    per_click: list[list[float]] = [[] for _ in sends]
    delivered = missed = exact = 0
    for client in clients:
        arrivals = client.arrivals
        j = 0
        for i, sent in enumerate(sends):
            target = base + i + 1
            while j < len(arrivals) and arrivals[j][0] < target:
                j += 1
            if j == len(arrivals):
                missed += len(sends) - i
                break
            count, arrived, seen = arrivals[j]
            delivered += 1
            exact += count == target
            latencies.append(arrived - sent)
            seen_latencies.append(seen - sent)
            per_click[i].append(arrived - sent)
        # Only the window's arrivals: opening the streams keeps the client busy.
        lags.extend(seen - arrived for count, arrived, seen in arrivals if count > base)
    latencies.sort()
    seen_latencies.sort()
    lags.sort()
    post = sorted(click["latencies"][lead_clicks:])
    window = wall1 - wall0
    expected = n * len(sends)
    errors = sorted({c.error for c in clients if c.error})
    return {
        "server": server.kind.name,
        "streams": n,
        "stalled": stalled,
        "threads": server.threads,
        "clicks": len(sends),
        "click_errors": click["errors"],
        "clicker_lateness_ms": ms(click["lateness"]),
        "delivery_pct": 100.0 * delivered / expected if expected else None,
        "undelivered": missed,
        "coalesced_pct": 100.0 * (delivered - exact) / delivered if delivered else None,
        "fanout_ms": {
            "p50": ms(percentile(latencies, 50)),
            "p99": ms(percentile(latencies, 99)),
            "max": ms(latencies[-1] if latencies else None),
        },
        "fanout_seen_ms": {
            "p50": ms(percentile(seen_latencies, 50)),
            "p99": ms(percentile(seen_latencies, 99)),
            "max": ms(seen_latencies[-1] if seen_latencies else None),
        },
        "client_lag_ms": {"p50": ms(percentile(lags, 50)), "p99": ms(percentile(lags, 99))},
        "post_ms": {"p50": ms(percentile(post, 50)), "p99": ms(percentile(post, 99))},
        "server_cpu_pct": round(100 * (cpu1 - cpu0) / window, 1),
        "client_cpu_pct": round(100 * (client1 - client0) / window, 1),
        "clicker_cpu_pct": round(100 * click["cpu"] / window, 1),
        "machine_cpu_pct": round(
            100 * (os.cpu_count() or 1) * (machine1[0] - machine0[0]) / (machine1[1] - machine0[1]),
            1,
        ),
        "rss_empty_kb": rss_empty // 1024,
        "rss_full_kb": rss_full // 1024,
        "kb_per_stream": round((rss_full - rss_empty) / 1024 / (n + stalled), 1),
        "worker_threads": threads,
        "events_per_s": round((events1 - events0) / window),
        "kernel_timestamps": all(c.timestamps > 0 for c in clients),
        "connect_s": round(connect_time, 2),
        "client_errors": len([c for c in clients if c.error]),
        "client_error_reasons": errors[:5],
        "stalled_ended": stalled_ended,
        # Per click of the window: seconds since the window opened, then the p50 and the
        # max of its fan-out in ms (a slow click shows up here, not only in the p99).
        "per_click": [
            [round(sent - sends[0], 2), ms(percentile(sorted(lat), 50)), ms(max(lat))]
            for sent, lat in zip(sends, per_click, strict=True)
            if lat
        ],
    }


def run_one(kind: ServerKind, n: int, stalled: int, opts: Options) -> dict[str, Any]:
    """Measure *kind* with *n* streams on a fresh server."""
    threads = n + stalled + opts.extra_threads
    env = dict(opts.env)
    # flask_datastar's gunicorn hook keeps a tenth of the threads for other requests and
    # refuses streams past the rest (503); here the spare threads are --extra-threads.
    env.setdefault("FLASK_DATASTAR_MAX_STREAMS", str(n + stalled + 5))
    with Server(kind, threads, env, opts.log_dir) as server:
        warm_up(server)
        return asyncio.run(measure(server, n, stalled, opts))


# -- report ---------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if digits == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _ratio(reference: float | None, ours: float | None) -> str:
    if reference is None or ours is None or ours <= 0:
        return "-"
    ratio = reference / ours
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _delivery(run: dict[str, Any]) -> str:
    pct = run["delivery_pct"]
    if pct is None:
        return "-"
    return "100 %" if run["undelivered"] == 0 else f"{pct:.2f} %"


def markdown(results: dict[str, Any]) -> str:
    """Render the results as markdown tables for the README."""
    runs = results["runs"]
    cfg = results["config"]
    lines = [
        f"One gunicorn gthread worker per server, {cfg['rate']:g} clicks/s for"
        f" {cfg['duration']:g} s plus a 1 s tick per stream; {results['machine']['cpus']}"
        f" CPUs, Python {results['machine']['python']}, gunicorn {results['machine']['gunicorn']}.",
        "",
        "| N | server | delivery | fan-out p50 / p99 / max (ms) | POST p50 / p99 (ms)"
        " | server CPU (% of a core) | memory / stream (KB) | client CPU / lag p99 (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = {name: i for i, name in enumerate(cfg["servers"])}
    for run in sorted(runs, key=lambda r: (r["streams"], order.get(r["server"], 99))):
        if run["stalled"]:
            continue
        fan, post, lag = run["fanout_ms"], run["post_ms"], run["client_lag_ms"]
        lines.append(
            f"| {run['streams']} | {SERVERS[run['server']].label} | {_delivery(run)}"
            f" | {_fmt(fan['p50'])} / {_fmt(fan['p99'])} / {_fmt(fan['max'])}"
            f" | {_fmt(post['p50'])} / {_fmt(post['p99'])}"
            f" | {_fmt(run['server_cpu_pct'], 0)} % | {_fmt(run['kb_per_stream'])}"
            f" | {_fmt(run['client_cpu_pct'], 0)} % / {_fmt(lag['p99'])} |"
        )
    if not all(run["kernel_timestamps"] for run in runs):
        lines += [
            "",
            "Kernel receive timestamps were not available on some streams: their fan-out"
            " includes the client's own delay.",
        ]
    plain = [r for r in runs if not r["stalled"]]
    by = {(r["server"], r["streams"]): r for r in plain}
    ours = cfg["servers"][0]
    others = [s for s in cfg["servers"] if s != ours]
    for other in others:
        lines += [
            "",
            f"Ratios ({SERVERS[other].label} / {SERVERS[ours].label}; higher is better for"
            f" {ours}):",
            "",
            "| N | fan-out p50 | fan-out p99 | fan-out max | POST p50 | server CPU"
            " | memory / stream |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in cfg["streams"]:
            a, b = by.get((other, n)), by.get((ours, n))
            if a is None or b is None:
                continue
            lines.append(
                f"| {n} | {_ratio(a['fanout_ms']['p50'], b['fanout_ms']['p50'])}"
                f" | {_ratio(a['fanout_ms']['p99'], b['fanout_ms']['p99'])}"
                f" | {_ratio(a['fanout_ms']['max'], b['fanout_ms']['max'])}"
                f" | {_ratio(a['post_ms']['p50'], b['post_ms']['p50'])}"
                f" | {_ratio(a['server_cpu_pct'], b['server_cpu_pct'])}"
                f" | {_ratio(a['kb_per_stream'], b['kb_per_stream'])} |"
            )
    stall_runs = [r for r in runs if r["stalled"]]
    if stall_runs:
        lines += [
            "",
            f"Stalled clients: N={cfg['stall_streams']} streams, then the same with"
            f" {cfg['stalled']} more clients that never read (4 KiB receive buffer, 1448-byte"
            f" segments), connected {cfg['stall_lead']:g} s of clicks before the window:",
            "",
            "| server | fan-out p50 / p99 without (ms) | with (ms) | p99 change"
            " | delivery with | server CPU without / with | stalled streams ended by the server |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for run in stall_runs:
            base = by.get((run["server"], run["streams"])) or run.get("baseline")
            if base is None:
                continue
            change = "-"
            if base["fanout_ms"]["p99"] and run["fanout_ms"]["p99"] is not None:
                change = f"{100 * (run['fanout_ms']['p99'] / base['fanout_ms']['p99'] - 1):+.0f} %"
            lines.append(
                f"| {SERVERS[run['server']].label}"
                f" | {_fmt(base['fanout_ms']['p50'])} / {_fmt(base['fanout_ms']['p99'])}"
                f" | {_fmt(run['fanout_ms']['p50'])} / {_fmt(run['fanout_ms']['p99'])}"
                f" | {change} | {_delivery(run)}"
                f" | {_fmt(base['server_cpu_pct'], 0)} % / {_fmt(run['server_cpu_pct'], 0)} %"
                f" | {run['stalled_ended']} of {run['stalled']} |"
            )
    lines += targets(results)
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[str]:
    """The issue's targets for flask_datastar at N=1000, as measured (no judgement added)."""
    runs = [r for r in results["runs"] if r["server"] == "flask_datastar"]
    plain = {r["streams"]: r for r in runs if not r["stalled"]}
    big = plain.get(1000)
    if big is None:
        return []
    small = plain.get(min(plain))
    rows = [
        ("100 % delivery", _delivery(big), big["undelivered"] == 0),
        ("fan-out p99 < 50 ms", f"{_fmt(big['fanout_ms']['p99'])} ms",
         (big["fanout_ms"]["p99"] or math.inf) < 50),
        ("server CPU < 35 % of one core", f"{_fmt(big['server_cpu_pct'], 0)} %",
         big["server_cpu_pct"] < 35),
        ("<= 40 KB per stream", f"{_fmt(big['kb_per_stream'])} KB", big["kb_per_stream"] <= 40),
    ]  # fmt: skip
    if small is not None and small is not big and small["post_ms"]["p50"]:
        ratio = big["post_ms"]["p50"] / small["post_ms"]["p50"]
        rows.append((f"POST p50 within 2x of N={small['streams']}", f"{ratio:.2f}x", ratio <= 2))
    for run in runs:
        if run["stalled"]:
            base = plain.get(run["streams"]) or run.get("baseline")
            if base and base["fanout_ms"]["p99"] and run["fanout_ms"]["p99"] is not None:
                change = 100 * (run["fanout_ms"]["p99"] / base["fanout_ms"]["p99"] - 1)
                rows.append(
                    (f"{run['stalled']} stalled clients change p99 by <= 10 %",
                     f"{change:+.0f} %", abs(change) <= 10)
                )  # fmt: skip
    header = "Targets of the issue (flask_datastar at N=1000"
    if any(run["stalled"] for run in runs):
        header += f"; stalled clients at N={results['config']['stall_streams']}"
    lines = ["", header + "):", "", "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'no'} |" for name, value, ok in rows]
    return lines


# -- main -----------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, not {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive numbers separated by commas")
    return values


def _server_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [name for name in names if name not in SERVERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown server(s) {unknown}; choose among {', '.join(SERVERS)}"
        )
    return names


def _env_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark: flask_datastar against thread-per-stream queues.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--streams",
        type=_int_list,
        default=[100, 500, 1000],
        help="open streams per measurement, comma separated",
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of clicking per measurement"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="clicks per second")
    parser.add_argument(
        "--servers",
        type=_server_list,
        default=["flask_datastar", "reference"],
        help=f"servers to measure, the first is the one compared; among {', '.join(SERVERS)}",
    )
    parser.add_argument(
        "--stalled",
        type=int,
        default=20,
        help="clients that never read, in the stalled scenario (0: skip it)",
    )
    parser.add_argument(
        "--stall-streams", type=int, default=500, help="open streams in the stalled scenario"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of clicks before each measurement window"
    )
    parser.add_argument(
        "--stall-lead",
        type=float,
        default=15.0,
        help="seconds of clicks before the window in the stalled scenario",
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=5.0,
        help="seconds to wait after the last click for late deliveries",
    )
    parser.add_argument(
        "--extra-threads",
        type=int,
        default=20,
        help="gunicorn threads beyond one per stream, for the POSTs",
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=50, help="streams being opened at the same time"
    )
    parser.add_argument(
        "--env",
        type=_env_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for both servers, e.g. FLASK_DATASTAR_HEARTBEAT=5",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the servers' logs (their directory is printed)",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0:
        parser.error("--duration and --rate must be positive.")
    if args.stalled < 0:
        parser.error("--stalled must be 0 or more.")
    return args


def raise_file_limit(needed: int) -> int:
    """Raise this process's open-file limit to its hard limit (servers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SystemExit(
            f"The open-file limit is {soft}, and this run needs about {needed}. Raise the"
            f" hard limit ('ulimit -Hn {needed}' as root, or LimitNOFILE in systemd) or pass"
            " smaller --streams."
        )
    return int(soft)


def _versions() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "gunicorn": version("gunicorn"),
        "flask": version("flask"),
        "kernel": platform.release(),
    }


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so every server is stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("This benchmark reads /proc and needs Linux.")
    if importlib.util.find_spec("gunicorn") is None:
        raise SystemExit(
            "gunicorn is not installed; install it with 'pip install -e \".[gunicorn]\"'."
        )
    biggest = max([*args.streams, args.stall_streams + args.stalled])
    limit = raise_file_limit(2 * biggest + 200)
    log_dir = Path(tempfile.mkdtemp(prefix="fanout-"))
    opts = Options(
        duration=args.duration,
        rate=args.rate,
        drain=args.drain,
        connect_concurrency=args.connect_concurrency,
        extra_threads=args.extra_threads,
        warmup=args.warmup,
        stall_lead=args.stall_lead,
        env=dict(args.env),
        log_dir=log_dir,
    )
    results: dict[str, Any] = {
        "config": {
            "streams": args.streams,
            "duration": args.duration,
            "rate": args.rate,
            "servers": args.servers,
            "stalled": args.stalled,
            "stall_streams": args.stall_streams,
            "warmup": args.warmup,
            "stall_lead": args.stall_lead,
            "drain": args.drain,
            "extra_threads": args.extra_threads,
            "env": opts.env,
            "open_file_limit": limit,
        },
        "machine": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [],
    }
    plan: list[tuple[str, int, int]] = []
    for name in args.servers:
        for n in args.streams:
            plan.append((name, n, 0))
            if args.stalled and n == args.stall_streams:
                plan.append((name, n, args.stalled))
        if args.stalled and args.stall_streams not in args.streams:
            plan += [(name, args.stall_streams, 0), (name, args.stall_streams, args.stalled)]
    interrupted = False
    errors: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    try:
        with _sigterm_as_interrupt():
            for name, n, stalled in plan:
                what = f"{name}, N={n}" + (f" + {stalled} stalled" if stalled else "")
                print(f"measuring {what} ...", file=sys.stderr, flush=True)
                try:
                    run = run_one(SERVERS[name], n, stalled, opts)
                except Exception as e:
                    # The server is stopped already; the other measurements still run.
                    error = f"{type(e).__name__}: {e}"
                    errors.append(
                        {"server": name, "streams": n, "stalled": stalled, "error": error}
                    )
                    print(f"  failed: {e}", file=sys.stderr, flush=True)
                    continue
                print("  " + _summary(run), file=sys.stderr, flush=True)
                if stalled and args.stall_streams not in args.streams:
                    # Its pair without stalled clients, measured just before, is not a row
                    # of the main table.
                    if baseline is not None and baseline["server"] == name:
                        run["baseline"] = baseline
                    baseline = None
                elif not stalled and n == args.stall_streams and n not in args.streams:
                    baseline = run
                    continue
                results["runs"].append(run)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: every server has been stopped.", file=sys.stderr)
    finally:
        if args.keep_logs:
            print(f"server logs: {log_dir}", file=sys.stderr)
        else:
            for path in log_dir.iterdir():
                path.unlink()
            log_dir.rmdir()
    results["errors"] = errors
    results["interrupted"] = interrupted
    if results["runs"]:
        print(markdown(results))
    for error in errors:
        where = f"{error['server']}, N={error['streams']}, stalled={error['stalled']}"
        print(f"\nFAILED: {where}: {error['error']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 130 if interrupted else 1 if errors else 0


def _summary(run: dict[str, Any]) -> str:
    fan, post = run["fanout_ms"], run["post_ms"]
    text = (
        f"delivery {_delivery(run)}, fan-out p50/p99/max {_fmt(fan['p50'])}/{_fmt(fan['p99'])}"
        f"/{_fmt(fan['max'])} ms, POST p50/p99 {_fmt(post['p50'])}/{_fmt(post['p99'])} ms,"
        f" server CPU {_fmt(run['server_cpu_pct'], 0)} %, {_fmt(run['kb_per_stream'])} KB/stream,"
        f" client CPU {_fmt(run['client_cpu_pct'], 0)} %,"
        f" machine {_fmt(run['machine_cpu_pct'], 0)} %"
    )
    if run["client_errors"] or run["click_errors"]:
        text += f"; errors: {run['client_error_reasons']} {run['click_errors'][:3]}"
    return text


if __name__ == "__main__":
    sys.exit(main())
