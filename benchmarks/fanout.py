"""Fan-out benchmark: flask_datastar's engine against same-run references.

Serves the CQRS demo (``example_app.py``) from one server process at a time, one
fresh server per measurement:

- ``flask_datastar``: ``example_app:app`` under gunicorn gthread, one worker;
- ``reference``: ``reference_app:app``, the plain thread-per-stream design (each
  stream's thread blocks on its own ``queue.Queue``), same gunicorn settings;
- ``floor``: ``floor_server.py``, a bare asyncio Protocol on uvloop sending the
  same bytes, the least any server can spend on this work;
- ``starlette``: ``starlette_app.py``, datastar-py + Starlette on uvicorn (uvloop),
  as a datastar-py user writes the demo.

It opens N raw SSE clients, held by one or more processes (``--client-procs``),
sends ``POST /click`` at a fixed rate from a separate process, and reports for
each server and N: fan-out latency, delivery, POST latency, server CPU, memory
per open stream and the load generator's own CPU, then ratios against the floor
and Starlette, and a scenario with stalled clients.

::

    python benchmarks/fanout.py                              # the full run (N=100,500,1000)
    python benchmarks/fanout.py --streams 50 --duration 3 --stalled 0   # a quick check
    python benchmarks/fanout.py --json results.json

See ``benchmarks/README.md`` for what each column means. Linux only (it reads
``/proc``); needs the project's dependencies, gunicorn and, for the floor and
Starlette, the ``bench`` extra (``pip install -e ".[gunicorn,bench]"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import pickle
import platform
import re
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
    """A server to measure: the app, its gunicorn config file and its environment.

    A kind with a *script* is not run under gunicorn: the script (in ``benchmarks/``)
    is the server, one process, started with ``--host``, ``--port`` and ``--backlog``.
    """

    name: str
    label: str
    app: str
    config: str | None
    env: dict[str, str] = field(default_factory=dict)
    script: str | None = None

    @property
    def gunicorn(self) -> bool:
        return self.script is None


# flask_datastar's admission: every benchmark client comes from 127.0.0.1, so the
# per-address share of the slots (issue 9's fair share) must be all of them.
_FLASK_DATASTAR_ENV = {"FLASK_DATASTAR_CLIENT_SHARE": "1"}

SERVERS = {
    "flask_datastar": ServerKind(
        "flask_datastar",
        "flask_datastar",
        "example_app:app",
        "gunicorn.conf.py",
        _FLASK_DATASTAR_ENV,
    ),
    # The same app with the direct-write path switched off: the portable queue path.
    "flask_datastar-queue": ServerKind(
        "flask_datastar-queue",
        "flask_datastar (queue path)",
        "example_app:app",
        "gunicorn.conf.py",
        {**_FLASK_DATASTAR_ENV, "FLASK_DATASTAR_DIRECT_WRITES": "false"},
    ),
    "reference": ServerKind(
        "reference", "reference (thread per stream)", "reference_app:app", None
    ),
    "floor": ServerKind(
        "floor", "floor (bare uvloop)", "floor_server.py", None, script="floor_server.py"
    ),
    "starlette": ServerKind(
        "starlette",
        "datastar-py + Starlette (uvicorn)",
        "starlette_app.py",
        None,
        script="starlette_app.py",
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
    """One server process (a gunicorn master with one gthread worker, or a script).

    Stopped on exit whatever happens.

    :param kind: the app to serve.
    :param threads: the gunicorn worker's threads (ignored for a script).
    :param connections: gunicorn's ``--worker-connections`` (ignored for a script).
    :param env: more environment variables for the server.
    :param log_dir: where the server's log file goes.
    """

    def __init__(
        self,
        kind: ServerKind,
        threads: int,
        connections: int,
        env: dict[str, str],
        log_dir: Path,
    ) -> None:
        self.kind = kind
        self.threads = threads
        self.connections = connections
        self.env = {**kind.env, **env}
        self.port = free_port()
        self.log_path = log_dir / f"{kind.name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self, config: Path) -> list[str]:
        if self.kind.script is not None:
            return [
                sys.executable, str(BENCH_DIR / self.kind.script),
                "--host", HOST, "--port", str(self.port), "--backlog", "4096",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "gunicorn",
            "-k", "gthread", "--workers", "1", "--threads", str(self.threads),
            # gthread refuses connections past worker_connections (default 1000) and keeps
            # POST connections alive only below it: room for every stream and the POSTs.
            "--worker-connections", str(self.connections),
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
        elif self.kind.script is not None:
            config = Path(os.devnull)  # unused
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
                    f"The server {self.kind.app} exited with status {self.proc.returncode}."
                    f" Its log:\n{self.log_tail()}"
                )
            # A script serves from its own process; gunicorn from its one worker.
            workers = _children(self.proc.pid) if self.kind.gunicorn else [self.proc.pid]
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
                    f"The server {self.kind.app} was not ready after {timeout} s. Its log:\n"
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
        # What Datastar's client sends: flask_datastar's CSRF check wants it on a POST.
        request.add_header("Datastar-Request", "true")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def current_count(server: Server) -> int:
    """Read the click counter from the page."""
    status, page = http_request(server.url + "/")
    match = COUNT_RE.search(page)
    if status != 200 or match is None:
        raise RuntimeError(f"GET / on {server.kind.app} did not show the click counter.")
    return int(match.group(1))


# The time and the count in an event: what differs between two renders of the content.
_STATE_RE = re.compile(rb"<strong>[^<]*</strong>")


def _sse_events(body: bytes) -> list[bytes]:
    """The whole SSE events (comments included) of a chunked body read so far."""
    data, pos = b"", 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            break
        end = line_end + 2 + int(body[pos:line_end], 16)
        if end + 2 > len(body):
            break
        data += body[line_end + 2 : end]
        pos = end + 2
    return [event + b"\n\n" for event in data.split(b"\n\n")[:-1]]


def warm_up(server: Server) -> dict[str, Any]:
    """Load everything a measured run uses (templates, broadcaster, socket watcher).

    So the memory measured with no stream open already holds the fixed costs. On the
    way it records the bytes of the first tick and of a click's event on one stream,
    with the time and the count blanked out, so the report can show that every
    server sends the same events.

    :return: ``{"tick": ..., "click": ...}``: the length and a hash of each event.
    """
    for _ in range(3):
        http_request(server.url + "/")
        status, _ = http_request(server.url + "/click", "POST", b"{}")
        if status != 204:
            raise RuntimeError(f"POST /click on {server.kind.app} answered {status}, not 204.")
    found: dict[str, bytes] = {}
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(request_bytes(HOST, server.port, SSE_PATH))
        received = b""
        while len(found) < 2:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError(f"GET /sse on {server.kind.app} ended before its events.")
            received += data
            for event in _sse_events(received.partition(b"\r\n\r\n")[2]):
                if not event.startswith(b"event: "):
                    continue
                kind = "click" if b"\ndata: selector " in event else "tick"
                if kind == "tick" and not found:
                    found["tick"] = event
                    # The stream is open: now a click shows its event.
                    http_request(server.url + "/click", "POST", b"{}")
                elif kind == "click" and "tick" in found:
                    found["click"] = event
    time.sleep(0.5)
    blanked = {kind: _STATE_RE.sub(b"<strong></strong>", event) for kind, event in found.items()}
    return {
        kind: {"bytes": len(event), "sha256": hashlib.sha256(event).hexdigest()[:16]}
        for kind, event in blanked.items()
    }


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
    threads: int | None
    client_procs: int | None
    warmup: float
    stall_lead: float
    env: dict[str, str]
    log_dir: Path


#: Streams per holder process when --client-procs is automatic.
STREAMS_PER_HOLDER = 2500
#: CPU of one load-generator process (% of a core) from which it may be the bottleneck.
BUSY_CPU_PCT = 90.0


def holder_count(n: int, requested: int | None) -> int:
    """How many processes hold the *n* streams: *requested*, or one per 2,500 streams.

    Automatic: no more than the machine's cores, and at least one.
    """
    if requested is not None:
        return max(1, min(requested, n))
    return max(1, min(math.ceil(n / STREAMS_PER_HOLDER), os.cpu_count() or 1))


class Holder:
    """One stream-holder process (``_client.py hold``) and its share of the streams.

    :param port: the server's port.
    :param n: the streams this process opens.
    :param concurrency: how many it opens at the same time.
    :param out: the file its arrivals are written to at the end.
    """

    def __init__(self, port: int, n: int, concurrency: int, out: Path) -> None:
        self.port, self.n, self.concurrency, self.out = port, n, concurrency, out
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(BENCH_DIR / "_client.py"), "hold",
            "--host", HOST, "--port", str(self.port), "--path", SSE_PATH,
            "--streams", str(self.n), "--concurrency", str(self.concurrency),
            "--out", str(self.out),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def read(self) -> dict[str, Any]:
        """The holder's next answer; an error if it died."""
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            status = await self.proc.wait()
            raise RuntimeError(f"A stream holder exited with status {status}.")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read()

    def arrivals(self) -> list[tuple[Any, Any, Any, str | None, bool]]:
        """Every stream's (counts, kernel times, seen times, error, timestamped)."""
        with open(self.out, "rb") as f:
            data: list[tuple[Any, Any, Any, str | None, bool]] = pickle.load(f)
        return data

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        with contextlib.suppress(OSError):
            self.out.unlink()


async def ask_all(holders: list[Holder], command: str) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(h.ask(command) for h in holders)))


async def measure(server: Server, n: int, stalled: int, opts: Options) -> dict[str, Any]:
    """Open *n* streams (and *stalled* stalled ones), click for the duration, and measure."""
    pid = server.worker
    base = current_count(server)
    rss_empty = rss_bytes(pid)
    procs = holder_count(n, opts.client_procs)
    holders = [
        Holder(
            server.port,
            n // procs + (i < n % procs),
            max(1, opts.connect_concurrency // procs),
            opts.log_dir / f"arrivals-{server.port}-{i}.pickle",
        )
        for i in range(procs)
    ]
    stallers: list[StalledClient] = []
    clicker: asyncio.subprocess.Process | None = None
    try:
        # The stalled clients come first, so they have backed up by the time the window opens.
        for _ in range(stalled):
            stallers.append(StalledClient(HOST, server.port, SSE_PATH))
        connect_started = time.monotonic()
        for holder in holders:
            await holder.start()
        opened = await asyncio.gather(*(h.read() for h in holders))
        connect_time = time.monotonic() - connect_started
        not_open = sum(o["not_open"] for o in opened)
        if not_open:
            reasons = sorted({r for o in opened for r in o["reasons"]})
            raise RuntimeError(
                f"{not_open} of {n} streams did not open on {server.kind.app}: {reasons[:3]}."
                f" Server log:\n{server.log_tail()}"
            )
        await asyncio.sleep(1.0)

        # Clicks start `lead` seconds before the measurement window: a steady state, and
        # stalled clients whose buffers are full by the time it opens.
        lead = max(opts.warmup, opts.stall_lead if stalled else 0.0)
        lead_clicks = round(lead * opts.rate)
        clicks = lead_clicks + round(opts.duration * opts.rate)
        start_at = time.time() + 0.5
        clicker = await asyncio.create_subprocess_exec(
            sys.executable, str(BENCH_DIR / "_client.py"), "click",
            "--host", HOST, "--port", str(server.port), "--rate", str(opts.rate),
            "--count", str(clicks), "--start-at", repr(start_at), "--mark", str(lead_clicks),
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        clicked = asyncio.ensure_future(clicker.communicate())
        await asyncio.sleep(max(0.0, start_at + lead_clicks / opts.rate - time.time()))
        # The clicker's CPU over the window comes from itself: it may exit before the end.
        load_pids = [h.pid for h in holders]
        cpu0, machine0 = cpu_seconds(pid), machine_cpu()
        load0 = [cpu_seconds(p) for p in load_pids]
        events0, wall0 = sum(m["events"] for m in await ask_all(holders, "mark")), time.monotonic()
        await asyncio.sleep(opts.duration)
        cpu1, machine1 = cpu_seconds(pid), machine_cpu()
        load1 = [cpu_seconds(p) for p in load_pids]
        events1, wall1 = sum(m["events"] for m in await ask_all(holders, "mark")), time.monotonic()
        rss_full = rss_bytes(pid)
        threads = len(os.listdir(f"/proc/{pid}/task"))
        out, _ = await clicked
        if clicker.returncode != 0:
            raise RuntimeError(f"The clicker exited with status {clicker.returncode}.")
        click: dict[str, Any] = json.loads(out)

        all_sends: list[float] = click["sends"]
        final = base + len(all_sends)
        await ask_all(holders, f"wait {final} {opts.drain}")
        await ask_all(holders, "dump")
        streams = [stream for h in holders for stream in h.arrivals()]

        stalled_ended = count_ended(stallers, 2.0) if stallers else 0
    finally:
        for staller in stallers:
            staller.close()
        for holder in holders:
            await holder.stop()
        if clicker is not None and clicker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                clicker.kill()
            await clicker.wait()

    # The k-th click sent (in send order) is the one after which the counter can first
    # reach base + k; a client that shows base + k or more has the state of that click.
    sends = all_sends[lead_clicks:]
    base += min(lead_clicks, len(all_sends))
    latencies: list[float] = []
    seen_latencies: list[float] = []
    lags: list[float] = []
    per_click: list[list[float]] = [[] for _ in sends]
    delivered = missed = exact = 0
    for counts, kernel_times, seen_times, _error, _stamped in streams:
        j = 0
        for i, sent in enumerate(sends):
            target = base + i + 1
            while j < len(counts) and counts[j] < target:
                j += 1
            if j == len(counts):
                missed += len(sends) - i
                break
            delivered += 1
            exact += counts[j] == target
            latencies.append(kernel_times[j] - sent)
            seen_latencies.append(seen_times[j] - sent)
            per_click[i].append(kernel_times[j] - sent)
        # Only the window's arrivals: opening the streams keeps the client busy.
        lags.extend(
            seen - arrived
            for count, arrived, seen in zip(counts, kernel_times, seen_times, strict=True)
            if count > base
        )
    latencies.sort()
    seen_latencies.sort()
    lags.sort()
    post = sorted(click["latencies"][lead_clicks:])
    window = wall1 - wall0
    expected = n * len(sends)
    errors = sorted({error for _, _, _, error, _ in streams if error})
    holder_cpu = [round(100 * (b - a) / window, 1) for a, b in zip(load0, load1, strict=True)]
    clicker_cpu = round(100 * click["window_cpu"] / window, 1)
    warnings = [
        f"stream holder {i + 1} of {procs} used {pct:.0f} % of a core: the load generator"
        " may be the bottleneck (raise --client-procs or lower --rate)"
        for i, pct in enumerate(holder_cpu)
        if pct >= BUSY_CPU_PCT
    ]
    if clicker_cpu >= BUSY_CPU_PCT:
        warnings.append(f"the clicker used {clicker_cpu:.0f} % of a core: lower --rate")
    machine_pct = (
        100 * (os.cpu_count() or 1) * (machine1[0] - machine0[0]) / (machine1[1] - machine0[1])
    )
    server_pct = 100 * (cpu1 - cpu0) / window
    # What the rest of the machine ran meanwhile: on a shared machine, the noise.
    other_pct = max(0.0, machine_pct - server_pct - sum(holder_cpu) - clicker_cpu)
    return {
        "server": server.kind.name,
        "streams": n,
        "stalled": stalled,
        "threads": server.threads if server.kind.gunicorn else None,
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
        "server_cpu_pct": round(server_pct, 1),
        # The load generator: the processes holding the streams, then the clicker.
        "client_procs": procs,
        "client_cpu_pct": round(sum(holder_cpu), 1),
        "client_cpu_per_proc_pct": holder_cpu,
        "clicker_cpu_pct": clicker_cpu,
        "warnings": warnings,
        "machine_cpu_pct": round(machine_pct, 1),
        "other_cpu_pct": round(other_pct, 1),
        "rss_empty_kb": rss_empty // 1024,
        "rss_full_kb": rss_full // 1024,
        "kb_per_stream": round((rss_full - rss_empty) / 1024 / (n + stalled), 1),
        "worker_threads": threads,
        "events_per_s": round((events1 - events0) / window),
        "kernel_timestamps": all(stamped for *_, stamped in streams),
        "connect_s": round(connect_time, 2),
        "client_errors": len([1 for _, _, _, error, _ in streams if error]),
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
    # Today's rule: one gunicorn thread per stream plus spare ones for the POSTs.
    # --threads overrides it for flask_datastar, whose new engine holds no thread per
    # stream; the reference is thread-per-stream by design and keeps the rule.
    threads = n + stalled + opts.extra_threads
    if opts.threads is not None and kind.app == "example_app:app":
        threads = opts.threads
    connections = max(threads, n + stalled + opts.extra_threads) + 200
    env = dict(opts.env)
    # flask_datastar's gunicorn hook keeps a tenth of the threads for other requests and
    # refuses streams past the rest (503); here the spare threads are --extra-threads.
    env.setdefault("FLASK_DATASTAR_MAX_STREAMS", str(n + stalled + 5))
    with Server(kind, threads, connections, env, opts.log_dir) as server:
        events = warm_up(server)
        run = asyncio.run(measure(server, n, stalled, opts))
        run["events"] = events
        return run


# -- report ---------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if digits == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "-"
    ratio = numerator / denominator
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x" if ratio >= 3 else f"{ratio:.2f}x"


def _delivery(run: dict[str, Any]) -> str:
    pct = run["delivery_pct"]
    if pct is None:
        return "-"
    return "100 %" if run["undelivered"] == 0 else f"{pct:.2f} %"


def markdown(results: dict[str, Any]) -> str:
    """Render the results as markdown tables for the README."""
    runs = results["runs"]
    cfg = results["config"]
    machine = results["machine"]
    plain = [r for r in runs if not r["stalled"]]
    order = {name: i for i, name in enumerate(cfg["servers"])}
    plain.sort(key=lambda r: (r["streams"], order.get(r["server"], 99)))
    lines = [
        f"One server process per server (gunicorn gthread with one worker for flask_datastar"
        f" and the reference), {cfg['rate']:g} clicks/s for {cfg['duration']:g} s plus a 1 s"
        f" tick per stream; {machine['cpus']} CPUs, Python {machine['python']}, gunicorn"
        f" {machine['gunicorn']}"
        + "".join(
            f", {name} {machine[name]}"
            for name in ("uvicorn", "starlette", "datastar-py", "uvloop")
            if machine.get(name) and any(SERVERS[s].script for s in cfg["servers"])
        )
        + ".",
        "",
        "| N | server | delivery | fan-out p50 / p99 / max (ms) | POST p50 / p99 (ms)"
        " | server CPU (% of a core) | memory / stream (KB)"
        " | client CPU: streams (procs) / clicker |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in plain:
        fan, post = run["fanout_ms"], run["post_ms"]
        busy = " ⚠" if run.get("warnings") else ""
        lines.append(
            f"| {run['streams']} | {SERVERS[run['server']].label} | {_delivery(run)}"
            f" | {_fmt(fan['p50'])} / {_fmt(fan['p99'])} / {_fmt(fan['max'])}"
            f" | {_fmt(post['p50'])} / {_fmt(post['p99'])}"
            f" | {_fmt(run['server_cpu_pct'], 0)} % | {_fmt(run['kb_per_stream'])}"
            f" | {_fmt(run['client_cpu_pct'], 0)} % ({run['client_procs']})"
            f" / {_fmt(run['clicker_cpu_pct'], 0)} %{busy} |"
        )
    if not all(run["kernel_timestamps"] for run in runs):
        lines += [
            "",
            "Kernel receive timestamps were not available on some streams: their fan-out"
            " includes the client's own delay.",
        ]
    lines += _events_line(runs)
    warned = [r for r in runs if r.get("warnings")]
    if warned:
        lines += ["", "⚠ The load generator may have been the bottleneck:", ""]
        lines += [
            f"- {SERVERS[r['server']].label}, N={r['streams']}: {w}."
            for r in warned
            for w in r["warnings"]
        ]
    others = [r["other_cpu_pct"] for r in plain if "other_cpu_pct" in r]
    if others:
        lines += [
            "",
            f"Other processes used {min(others):.0f} to {max(others):.0f} % of a core during the"
            " windows (the machine's busy time less the server's and the load generator's);"
            " more than a few % makes the numbers noisy.",
        ]
    lines += _ratio_tables(plain, cfg["streams"])
    stall_runs = [r for r in runs if r["stalled"]]
    by = {(r["server"], r["streams"]): r for r in plain}
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


def _events_line(runs: list[dict[str, Any]]) -> list[str]:
    """Say whether every server sent the same event bytes (time and count blanked out)."""
    seen: dict[tuple[str, ...], list[str]] = {}
    sizes: dict[str, int] = {}
    for run in runs:
        events = run.get("events") or {}
        key = tuple(events.get(kind, {}).get("sha256", "?") for kind in ("tick", "click"))
        label = SERVERS[run["server"]].label
        if label not in seen.setdefault(key, []):
            seen[key].append(label)
        for kind, event in events.items():
            sizes[kind] = event["bytes"]
    if len(seen) == 1:
        return [
            "",
            f"Every server sent the same bytes for each event (a tick's and a click's patch"
            f" of `#content`, {sizes.get('tick', '?')} and {sizes.get('click', '?')} bytes with"
            " the time and the count blanked out).",
        ]
    groups = "; ".join(", ".join(labels) for labels in seen.values())
    return ["", f"⚠ The servers' events differ in bytes; groups with the same bytes: {groups}."]


def _ratio_tables(plain: list[dict[str, Any]], streams: list[int]) -> list[str]:
    """Each server's fan-out p99 and CPU divided by the floor's and by Starlette's."""
    by = {(r["server"], r["streams"]): r for r in plain}
    refs = [ref for ref in ("floor", "starlette") if any(r["server"] == ref for r in plain)]
    if not refs:
        return []
    lines = [
        "",
        "Ratios to the references (this server's value / the floor's or Starlette's, same N,"
        " same run; 1x is as good as that reference, lower is better):",
        "",
        "| N | server | "
        + " | ".join(f"fan-out p99 / {ref} | server CPU / {ref}" for ref in refs)
        + " |",
        "|---:|---|" + "---:|" * (2 * len(refs)),
    ]
    for n in streams:
        for run in plain:
            if run["streams"] != n or run["server"] in refs[:1]:
                continue
            cells = []
            for ref in refs:
                other = by.get((ref, n))
                if other is None or other is run:
                    cells += ["-", "-"]
                    continue
                cells += [
                    _ratio(run["fanout_ms"]["p99"], other["fanout_ms"]["p99"]),
                    _ratio(run["server_cpu_pct"], other["server_cpu_pct"]),
                ]
            lines.append(f"| {n} | {SERVERS[run['server']].label} | " + " | ".join(cells) + " |")
    return lines


def targets(results: dict[str, Any]) -> list[str]:
    """Issue 9's targets for flask_datastar against the floor, as measured (no judgement added)."""
    plain = [r for r in results["runs"] if not r["stalled"]]
    ours = {r["streams"]: r for r in plain if r["server"] == "flask_datastar"}
    floor = {r["streams"]: r for r in plain if r["server"] == "floor"}
    rows: list[tuple[str, str, bool]] = []

    def p99_ratio(n: int) -> float:
        a, b = ours[n]["fanout_ms"]["p99"], floor[n]["fanout_ms"]["p99"]
        return math.inf if a is None or not b else a / b

    def cpu_ratio(n: int) -> float:
        b = floor[n]["server_cpu_pct"]
        return math.inf if not b else ours[n]["server_cpu_pct"] / b

    if 1000 in ours and 1000 in floor:
        rows.append(
            ("1,000 tabs: fan-out p99 <= 1.3x the floor's", f"{p99_ratio(1000):.2f}x",
             p99_ratio(1000) <= 1.3)
        )  # fmt: skip
    for n in (4000, 10000):
        if n not in ours:
            continue
        run = ours[n]
        rows.append((f"{n:,} tabs: 100 % delivered", _delivery(run), run["undelivered"] == 0))
        if n in floor:
            limit = 2.0 if n == 4000 else math.inf
            for what, ratio in (("fan-out p99", p99_ratio(n)), ("server CPU", cpu_ratio(n))):
                name = f"{n:,} tabs: {what} " + ("<= 2x the floor's" if n == 4000 else "/ floor")
                rows.append((name, f"{ratio:.2f}x", ratio <= limit))
        if n == 10000:
            kb = run["kb_per_stream"]
            rows.append(("10,000 tabs: <= 40 KB per tab", f"{_fmt(kb)} KB", kb <= 40))
    if not rows:
        return []
    lines = [
        "",
        "Targets of issue 9 (flask_datastar against the floor of the same run):",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
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
        description="Fan-out benchmark: flask_datastar against the floor, Starlette and"
        " thread-per-stream queues.",
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
        default=["flask_datastar", "floor", "starlette", "reference"],
        help=f"servers to measure, in the tables' order; among {', '.join(SERVERS)}",
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
        "--threads",
        type=int,
        help="gunicorn threads of flask_datastar (default: one per stream plus"
        " --extra-threads; the reference always has that many)",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        help="processes holding the streams (default: one per 2,500 streams, at most one per core)",
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
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be 1 or more.")
    if args.client_procs is not None and args.client_procs < 1:
        parser.error("--client-procs must be 1 or more.")
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
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    for name in ("gunicorn", "flask", "uvicorn", "starlette", "datastar-py", "uvloop"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


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
    scripts = [SERVERS[name] for name in args.servers if SERVERS[name].script]
    missing = [
        module
        for module in ("uvloop", *(("uvicorn", "starlette", "datastar_py", "httptools")
                                   if any(k.name == "starlette" for k in scripts) else ()))
        if scripts and importlib.util.find_spec(module) is None
    ]  # fmt: skip
    if missing:
        raise SystemExit(
            f"The floor and Starlette servers need {', '.join(missing)}; install them with"
            " 'pip install -e \".[gunicorn,bench]\"', or leave those servers out of --servers."
        )
    biggest = max([*args.streams, args.stall_streams + args.stalled])
    # Each process has its own limit: the server holds every stream, and so do the
    # holders between them (the servers and the holders inherit the raised limit).
    limit = raise_file_limit(biggest + 300)
    log_dir = Path(tempfile.mkdtemp(prefix="fanout-"))
    opts = Options(
        duration=args.duration,
        rate=args.rate,
        drain=args.drain,
        connect_concurrency=args.connect_concurrency,
        extra_threads=args.extra_threads,
        threads=args.threads,
        client_procs=args.client_procs,
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
            "threads": args.threads,
            "client_procs": args.client_procs,
            "env": opts.env,
            "open_file_limit": limit,
        },
        "machine": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [],
    }
    # Every server at one N, then the next N: the runs a ratio compares are close in time,
    # so a change of the machine's load between them is less likely.
    plan: list[tuple[str, int, int]] = []
    for n in args.streams:
        for name in args.servers:
            plan.append((name, n, 0))
            if args.stalled and n == args.stall_streams:
                plan.append((name, n, args.stalled))
    if args.stalled and args.stall_streams not in args.streams:
        for name in args.servers:
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
    for failure in errors:
        where = f"{failure['server']}, N={failure['streams']}, stalled={failure['stalled']}"
        print(f"\nFAILED: {where}: {failure['error']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 130 if interrupted else 1 if errors else 0


def _summary(run: dict[str, Any]) -> str:
    fan, post = run["fanout_ms"], run["post_ms"]
    text = (
        f"delivery {_delivery(run)}, fan-out p50/p99/max {_fmt(fan['p50'])}/{_fmt(fan['p99'])}"
        f"/{_fmt(fan['max'])} ms, POST p50/p99 {_fmt(post['p50'])}/{_fmt(post['p99'])} ms,"
        f" server CPU {_fmt(run['server_cpu_pct'], 0)} %, {_fmt(run['kb_per_stream'])} KB/stream,"
        f" client CPU {_fmt(run['client_cpu_pct'], 0)} % ({run['client_procs']} procs)"
        f" / clicker {_fmt(run['clicker_cpu_pct'], 0)} %,"
        f" lag p99 {_fmt(run['client_lag_ms']['p99'])} ms,"
        f" machine {_fmt(run['machine_cpu_pct'], 0)} % (others {_fmt(run['other_cpu_pct'], 0)} %)"
    )
    for warning in run["warnings"]:
        text += f"\n  WARNING: {warning}"
    if run["client_errors"] or run["click_errors"]:
        text += f"; errors: {run['client_error_reasons']} {run['click_errors'][:3]}"
    return text


if __name__ == "__main__":
    sys.exit(main())
