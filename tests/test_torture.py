"""The concurrency torture test: a real gunicorn, many clients and commands, invariants.

For a bounded time, seeded threads attack ``tests/live_apps/torture_app.py`` under a
real ``gunicorn -k gthread`` (one worker with 64 threads; and two workers joined by a
real Redis, restarted in the middle):

- *steady* readers hold a stream from start to end and read normally;
- *churn* clients come and go: they read normally, slowly (a small receive buffer and
  pauses), stop reading (*stalled*, so the backlog bound ends them) or vanish at once;
  they leave by closing, by a reset (``SO_LINGER`` 0) or by a half-close (FIN) after
  which they read on until the server ends the stream. Freed descriptor numbers are
  reused by the next connections, and the app opens 1,100 spare descriptors first so
  every client socket is numbered above 1024, as in a worker holding a thousand tabs;
- *senders* POST commands: broadcasts (some coalesced, some padded, some multi-line
  HTML), unicasts (some coalesced), writes from the request thread
  (``notify_subscriber``), room broadcasts, closing and recreating room registries,
  closing streams from the server (``gen.close()``, ``gen.close(reconnect=True)``) and
  empty events.

What is checked (invariants, never timings; every deadline is a bound on liveness):

- every chunk is well framed (the strict decoder of ``RawHTTPStream``) and holds whole
  events; from the third chunk on (once the stream writes directly), exactly one event
  or comment;
- per stream, the events of each sender on each channel arrive in the order they were
  sent (coalescing may drop superseded ones, never reorder); the stream's own ticks
  arrive one by one, none missing;
- a steady reader gets every non-coalesced event addressed to it whose command started
  after it saw its ``reg`` event, unless the bus reported a gap (a ``resync`` event
  received after the command started); and, after the final coalesced pair
  ``broadcast(X, coalesce=L)`` + ``send_to(k, Y, coalesce=L)``, its last ``L`` event
  is Y if its key is k, else X;
- a stream ends cleanly only when a command closed it cleanly; a client that was still
  there is never told (by the close reason) that it left; a FIN ends the stream; a
  steady reader's stream never ends before the test ends it;
- ``on_connect`` and ``on_disconnect`` run once each per stream; a worker never holds
  more streams than its cap;
- after every client is gone: no stream open or registered, the threads, descriptors
  and registry sizes back at their baseline, the worker's CPU back to idle, the worker
  never restarted, and no ``Traceback`` in the server log.

The short run is part of the normal suite. A long run, or a replay of a failure::

    pytest tests/test_torture.py --torture-seconds=600 -s
    pytest tests/test_torture.py --torture-seed=1234567 -s

The seed is printed (``-s`` shows it) and quoted by every failure; the same seed makes
the same decisions (which clients, commands and leaving methods, and when), while the
thread scheduling stays the machine's.

Diagnostics, for a failure that a seed does not replay: ``TORTURE_DEBUG=1`` makes the
app write flask_datastar's debug log into the server log, with two lines per stream
end: the library's (path, reason, whether it ended cleanly or abruptly) and the app's
(the client id and kind, path and reason), so that a traceback the failure quotes can
be matched with the client it came from (``GunicornServer.log_text()`` has the whole
log while the server runs); ``TORTURE_WITHOUT=empty,fdpad`` leaves parts of the attack
out (see ``WITHOUT``)::

    TORTURE_DEBUG=1 pytest tests/test_torture.py -k 1worker -s
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import socket
import struct
import threading
import time
import traceback
import urllib.error
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flask_datastar.testing import ServerSentEvent, SSEParser
from tests.helpers import (
    ConnectionClosed,
    GunicornServer,
    ProtocolError,
    RawHTTPStream,
    RedisServer,
    post,
)

pytestmark = [pytest.mark.live, pytest.mark.torture]

APP = "tests.live_apps.torture_app:app"
HEARTBEAT = 1.0
MAX_BACKLOG = 16 * 1024
SEND_TIMEOUT = 3.0
FD_PAD = 1100
ROOMS = 3
LABELS = ("L0", "L1", "L2")
STEADY_KEYS = ("sk0", "sk1", "sk2")
CHURN_KEYS = ("ck0", "ck1", "ck2", "ck3", "ck4")
# Close commands hit these only: the peer writers (on ck0, ck1, ck2) must stay.
CLOSE_KEYS = ("ck3", "ck4")
# A normal reader's stream that stays this long without a byte (heartbeats come every
# HEARTBEAT seconds) has gone silent.
SILENCE = 15.0
# Bounds on liveness: how long the server may take to notice and clean up.
SETTLE = 30.0
IDLE_CPU = 0.05

# The close reasons of flask_datastar.Stream (close_reason) that say the client left.
CLIENT_LEFT = ("the client closed the connection", "the connection was reset")
CLIENT_FAILED = ("the connection failed", "The client connection failed")
NOT_READING = ("The client is not reading", "the client took no data")


@dataclass(frozen=True)
class Scenario:
    """One server set-up the torture runs against."""

    workers: int
    threads: int
    redis: bool
    churn: int  # churn clients alive at once (bursts add more)
    senders: int
    steady: int = 6
    peer_writers: int = 3


SCENARIOS = [
    pytest.param(Scenario(workers=1, threads=48, redis=False, churn=36, senders=4), id="1worker"),
    pytest.param(
        Scenario(workers=2, threads=40, redis=True, churn=30, senders=4),
        id="2workers-redis",
        marks=pytest.mark.redis,
    ),
]

# Commands a sender picks from, with their weights.
ACTIONS = {
    "bcast": 30,
    "bcast_c": 10,
    "bcast_pad": 5,
    "bcast_html": 4,
    "unicast": 12,
    "unicast_c": 5,
    "notify": 8,
    "room": 10,
    "recycle": 2,
    "close": 4,
    "close_reconnect": 4,
    "empty": 1,
}
# Churn client kinds, with their weights.
KINDS = {"normal": 4, "slow": 2, "stalled": 1, "vanish": 2, "burst": 1}
LEAVES = ("close", "rst", "fin")
# A debugging aid: leave out some of the attack to see what else fails, such as
# TORTURE_WITHOUT=empty,fdpad (the "empty" command, the spare descriptors).
WITHOUT = set(filter(None, os.environ.get("TORTURE_WITHOUT", "").split(",")))


# --- records --------------------------------------------------------------------------


@dataclass
class Command:
    """One POST a sender made, and what came of it."""

    sender: str
    seq: int
    action: str
    channel: str  # "main", "notify", "room" or "" (no event)
    key: str | None
    label: str | None
    start: float
    end: float = 0.0
    status: int = 0
    pid: int | None = None
    reached: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Client:
    """One stream client: what it did and what it saw."""

    cid: str
    kind: str
    key: str | None
    room: str | None
    leave: str
    peer: bool = False  # its handler writes to the other streams of its key
    status: int = 0
    pid: int | None = None
    path: str | None = None
    t_reg: float | None = None
    chunks: int = 0
    # (sender, seq) of the tagged events received, per channel.
    got: dict[str, set[tuple[str, int]]] = field(
        default_factory=lambda: collections.defaultdict(set)
    )
    last_seq: dict[tuple[str, str], int] = field(default_factory=dict)
    last_label: dict[str, dict[str, Any]] = field(default_factory=dict)
    resyncs: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    own: int = 0
    fence: bool = False
    fin_at: float | None = None  # when it half-closed
    left_at: float | None = None  # when it closed or reset its socket
    end: str = ""  # clean, abrupt, broken, silent, left, refused, failed
    t_end: float = 0.0
    done: bool = False
    error: str = ""


class Violations:
    """Invariant violations, grouped by what was violated."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_kind: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, kind: str, detail: str) -> None:
        with self._lock:
            self.by_kind[kind].append(detail)

    def __bool__(self) -> bool:
        return bool(self.by_kind)

    def report(self, limit: int = 6) -> str:
        lines = []
        for kind, details in sorted(self.by_kind.items()):
            lines.append(f"- {kind}: {len(details)} time(s), e.g.")
            lines.extend(f"    {detail}" for detail in details[:limit])
        return "\n".join(lines)


# --- the worker, seen from outside -------------------------------------------------------


def worker_stats(server: GunicornServer) -> dict[int, dict[str, Any]]:
    """Ask ``/stats`` until every worker has answered (each request is a new connection)."""
    answers: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + SETTLE
    while len(answers) < server.workers:
        if time.monotonic() > deadline:
            raise AssertionError(f"Only workers {sorted(answers)} answered /stats.")
        status, _, body = post(server.url + "/stats", method="GET", timeout=30)
        assert status == 200, body
        answer = json.loads(body)
        answers[answer["pid"]] = answer
    return answers


def own_threads(names: list[str]) -> list[str]:
    """The thread names that are not gunicorn's request pool (which only grows)."""
    return sorted(name for name in names if not name.startswith("ThreadPoolExecutor"))


def _socket_ports(pid: int) -> dict[str, tuple[int, int, str]]:
    """Map socket inodes of *pid*'s network namespace to (local port, remote port, state)."""
    ports = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            ports[inode] = (
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
                state,
            )
    return ports


def fd_kinds(pid: int, server_port: int, redis_port: int | None) -> collections.Counter[str]:
    """Count *pid*'s descriptors by kind: client sockets, Redis sockets, files, pipes..."""
    kinds: collections.Counter[str] = collections.Counter()
    ports = _socket_ports(pid)
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed meanwhile
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match is None:
            kinds[re.sub(r"\[\d+\]", "", target)] += 1
            continue
        local, remote, state = ports.get(match.group(1), (0, 0, "?"))
        if local == server_port:
            kinds["listening socket" if state == "0A" else "client socket"] += 1
        elif redis_port is not None and remote == redis_port:
            kinds["redis socket"] += 1
        else:
            kinds["other socket"] += 1
    return kinds


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time *pid* has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The torture app's line that writes to a peer's stream, uncaught, in a handler.
PEER_WRITE = 'other.patch_signals({"t": "peer"})'


def tracebacks(log: str) -> list[tuple[str, str, str]]:
    """Return (innermost frame, exception line, text) for every traceback in *log*."""
    found = []
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        end = index + 1
        while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
            end += 1
        frames = [f for f in lines[index:end] if f.strip().startswith("File ")]
        where = frames[-1].strip() if frames else "?"
        error = lines[end] if end < len(lines) else "?"
        found.append((where, error, "\n".join(lines[max(0, index - 1) : end + 1])[-3000:]))
    return found


def tag_of(event: ServerSentEvent) -> dict[str, Any] | None:
    """Return the tag the torture app put in *event*, or None if it has none."""
    if event.event == "datastar-patch-signals":
        signals = event.signals
        return signals if isinstance(signals, dict) and "t" in signals else None
    if event.event == "datastar-patch-elements":
        match = re.search(r'<p id="tag">(.*?)</p>', event.elements or "")
        return json.loads(match.group(1)) if match else None
    return None


# --- the torture -------------------------------------------------------------------------


class Torture:
    """One run: start the attackers, stop them, check the invariants.

    :param server: the running gunicorn.
    :param redis: the running Redis, when the scenario has one.
    :param scenario: how many of each attacker.
    :param seed: the seed of every random decision.
    :param seconds: how long the attack lasts.
    """

    def __init__(
        self,
        server: GunicornServer,
        redis: RedisServer | None,
        scenario: Scenario,
        seed: int,
        seconds: float,
    ) -> None:
        self.server = server
        self.redis = redis
        self.scenario = scenario
        self.seed = seed
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.violations = Violations()
        self.lock = threading.Lock()
        self.commands: list[Command] = []
        self.clients: list[Client] = []
        self.stop = threading.Event()
        self.fence_sent = threading.Event()
        self.give_up = threading.Event()
        self.churn_alive = 0
        self.next_cid = 0
        self.threads: list[threading.Thread] = []
        self.notes: list[str] = []
        self.verified = 0  # events a steady reader had to get, and was checked for
        self.caps: dict[int, tuple[int, int | None]] = {}  # most streams held, and the cap

    # -- helpers ---------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def new_cid(self, kind: str) -> str:
        with self.lock:
            self.next_cid += 1
            return f"{kind}{self.next_cid}"

    def start_thread(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=self._guard, args=(target, *args), daemon=True)
        thread.start()
        with self.lock:
            self.threads.append(thread)
        return thread

    def _guard(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except Exception:  # a harness bug must not pass silently
            self.violations.add("harness error", f"{target.__name__}: {traceback.format_exc()}")

    # -- clients ---------------------------------------------------------------------

    def open_stream(self, client: Client, rcvbuf: int | None = None) -> RawHTTPStream | None:
        query = f"/sse?cid={client.cid}&kind={client.kind}"
        if client.peer:
            query += "&peer=1"
        if client.key:
            query += f"&key={client.key}"
        if client.room:
            query += f"&room={client.room}"
        with self.lock:
            self.clients.append(client)
        try:
            stream = RawHTTPStream(self.server.port, query, rcvbuf=rcvbuf, timeout=30)
        except (OSError, ProtocolError) as e:
            # Judged at the end: a close command may have hit it in on_connect.
            client.end, client.t_end, client.done = "failed", self.now(), True
            client.error = repr(e)
            return None
        client.status = stream.status
        if stream.status != 200:
            client.end, client.t_end, client.done = "refused", self.now(), True
            body = b""
            try:
                body = stream.read_body(timeout=10)
            except (OSError, ProtocolError):
                pass
            stream.close()
            if stream.status != 503:
                self.violations.add(
                    "GET /sse answered neither 200 nor 503",
                    f"{client.cid}: {stream.status} {body[:200]!r}",
                )
            return None
        if not stream.chunked:
            self.violations.add("a stream is not chunked", f"{client.cid}: {stream.headers}")
        return stream

    def consume(self, client: Client, chunk: bytes) -> None:
        """Check one chunk and the events in it."""
        index = client.chunks
        client.chunks += 1
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            self.violations.add("a chunk is not UTF-8", f"{client.cid} chunk {index}: {e}")
            return
        if not text.endswith("\n\n"):
            self.violations.add(
                "a chunk does not end an event", f"{client.cid} chunk {index}: {text[-80:]!r}"
            )
        elif index >= 2 and text.find("\n\n") != len(text) - 2:
            self.violations.add(
                "a direct chunk holds more than one event",
                f"{client.cid} chunk {index}: {text[:160]!r}",
            )
        parser = SSEParser()
        events = parser.feed(chunk)
        if parser.has_pending:
            self.violations.add("a chunk holds part of an event", f"{client.cid}: {text[-80:]!r}")
        if parser.comments and client.path is not None and client.kind in ("normal", "steady"):
            # The handler ticks more often than the heartbeat, and (for a client that
            # reads) never waits for a backlog: a heartbeat means that it is gone while
            # its stream lives on.
            self.violations.add(
                "a stream outlived its handler (heartbeats, no more ticks)",
                f"{client.cid} ({client.kind}, key {client.key}) after tick {client.own}",
            )
        for event in events:
            self.on_event(client, event)

    def on_event(self, client: Client, event: ServerSentEvent) -> None:
        tag = tag_of(event)
        if tag is None:
            self.violations.add("an event without a tag", f"{client.cid}: {event!r}"[:300])
            return
        kind = tag["t"]
        tag.pop("pad", None)  # filler, not worth quoting
        # Broadcasts may come before "reg" (on_connect registers first), the handler's
        # own events may not.
        if client.t_reg is None and kind in ("path", "own"):
            self.violations.add(
                "the handler ran before on_connect finished", f"{client.cid}: {tag}"
            )
        if kind == "reg":
            if client.t_reg is not None or tag.get("cid") != client.cid:
                self.violations.add("a second or foreign 'reg' event", f"{client.cid}: {tag}")
            client.t_reg, client.pid = self.now(), tag["pid"]
        elif kind == "path":
            client.path = tag["path"]
            if client.path != "direct":
                self.violations.add("a stream did not write directly", f"{client.cid}: {tag}")
        elif kind == "own":
            if tag["q"] != client.own + 1:
                self.violations.add(
                    "the stream's own ticks skipped or repeated",
                    f"{client.cid}: tick {tag['q']} after {client.own}",
                )
            client.own = tag["q"]
        elif kind == "resync":
            client.resyncs[tag["ch"]].append(self.now())
        elif kind == "peer":
            pass  # another stream's handler wrote it: no order to keep
        else:
            sender, seq, channel = tag["s"], tag["q"], tag["ch"]
            last = client.last_seq.get((sender, channel))
            if last is not None and seq <= last:
                self.violations.add(
                    "events of one sender arrived out of order (or twice)",
                    f"{client.cid} ({client.kind}, key {client.key}): {channel} event"
                    f" {sender}#{seq} after {sender}#{last}",
                )
            client.last_seq[(sender, channel)] = seq
            client.got[channel].add((sender, seq))
            if "c" in tag:
                client.last_label[tag["c"]] = tag
            if sender == "fence":
                client.fence = True

    def read(
        self,
        client: Client,
        stream: RawHTTPStream,
        until: float,
        stop_when: Callable[[], bool] = lambda: False,
        pace: Callable[[], float] | None = None,
        silence: float = SILENCE,
    ) -> str | None:
        """Read and check chunks until *until* or *stop_when*; return how it ended, if it did."""
        last_data = self.now()
        while not stop_when():
            now = self.now()
            if now >= until:
                return None
            try:
                chunk = stream.read_chunk(timeout=min(0.5, until - now))
            except TimeoutError:
                if self.now() - last_data > silence:
                    return "silent"
                continue
            except ConnectionClosed:
                return "abrupt"
            except ProtocolError as e:
                self.violations.add("broken HTTP framing", f"{client.cid} ({client.kind}): {e}")
                return "broken"
            except OSError as e:
                self.notes.append(f"{client.cid}: read failed with {e!r}")
                return "abrupt"
            if chunk is None:
                self.after_end(client, stream)
                return "clean"
            last_data = self.now()
            self.consume(client, chunk)
            if pace is not None:
                time.sleep(pace())
        return None

    def after_end(self, client: Client, stream: RawHTTPStream) -> None:
        """After a terminating chunk nothing may follow (an empty event looks like one)."""
        extra = bytes(stream._buffer)  # what arrived with the terminating chunk
        if not extra:
            try:
                stream.sock.settimeout(0.3)
                extra = stream.sock.recv(4096)
            except OSError:
                pass
        if extra:
            self.violations.add(
                "bytes followed the terminating chunk (a false end)",
                f"{client.cid} ({client.kind}): {extra[:120]!r}",
            )

    def finish(self, client: Client, stream: RawHTTPStream, ended: str | None, how: str) -> None:
        """Record the end of *client*'s stream, leaving by *how* if it is still open."""
        if ended is not None:
            client.end, client.t_end = ended, self.now()
            if ended == "silent":
                self.violations.add(
                    "a stream went silent (no heartbeat)",
                    f"{client.cid} ({client.kind}) for {SILENCE} s",
                )
            stream.close()
            client.done = True
            return
        if how == "fin":
            client.fin_at = self.now()
            try:
                stream.shutdown_write()
            except OSError:
                pass
            # The server must notice the FIN and end the stream; what comes until then
            # is still checked.
            ended = self.read(client, stream, self.now() + SETTLE, silence=SETTLE)
            if ended is None or ended == "silent":
                self.violations.add(
                    "the server kept a stream open after the client's FIN",
                    f"{client.cid} ({client.kind}) for {SETTLE} s",
                )
                ended = "silent"
            client.end, client.t_end = ended, self.now()
            stream.close()
        else:
            if how == "rst":
                stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.left_at = self.now()
            client.end, client.t_end = "left", client.left_at
            stream.close()
        client.done = True

    def steady(self, client: Client, ready: threading.Event) -> None:
        stream = self.open_stream(client)
        ready.set()
        if stream is None:
            self.violations.add("a steady reader was refused", client.cid)
            return
        ended = self.read(
            client, stream, float("inf"), stop_when=lambda: client.fence or self.give_up.is_set()
        )
        if ended is not None:
            self.violations.add(
                "a steady reader's stream ended before the test ended it",
                f"{client.cid} (key {client.key}, pid {client.pid}): {ended} after"
                f" {client.chunks} chunks",
            )
        self.finish(client, stream, ended, client.leave)

    def peer_writer(self, client: Client) -> None:
        """Hold a stream whose handler writes to the streams of churn clients as they leave.

        A peer's ``StreamClosed`` may end the handler; then the stream must end too,
        rather than live on without its handler.
        """
        stream = self.open_stream(client)
        if stream is None:
            return
        ended = self.read(
            client, stream, float("inf"), stop_when=lambda: client.fence or self.give_up.is_set()
        )
        if ended is None:
            # Its handler ticks every few hundred milliseconds while it lives.
            ticks = client.own
            ended = self.read(client, stream, self.now() + SETTLE / 3, lambda: client.own > ticks)
            if ended is None and client.own == ticks:
                self.violations.add(
                    "a stream outlived its handler (no tick, the stream still open)",
                    f"{client.cid} (key {client.key}): no tick after #{ticks} for {SETTLE / 3} s",
                )
        self.finish(client, stream, ended, client.leave)

    def churn(self, client: Client, rng: random.Random) -> None:
        try:
            if client.kind == "vanish":
                self.vanish(client, rng)
                return
            rcvbuf = rng.choice((2048, 4096, 8192)) if client.kind in ("slow", "stalled") else None
            stream = self.open_stream(client, rcvbuf)
            if stream is None:
                return
            until = self.now() + (
                rng.uniform(0.1, 3.0) if client.kind != "slow" else rng.uniform(1, 5)
            )
            stop_when = self.stop.is_set
            if client.kind == "stalled":
                # Take the first events, then read nothing for a while.
                ended = self.read(client, stream, until, lambda: client.path is not None)
                if ended is None:
                    self.stop.wait(max(0.0, until - self.now()))
                    if rng.random() < 0.5:
                        # Read what is left: it must still be well framed, up to a cut.
                        ended = self.read(client, stream, self.now() + 1.0, silence=SETTLE)
            elif client.kind == "slow":

                def pace() -> float:
                    return rng.uniform(0.3, 1.0) if rng.random() < 0.1 else rng.uniform(0, 0.03)

                ended = self.read(client, stream, until, stop_when, pace)
            else:
                ended = self.read(client, stream, until, stop_when)
            self.finish(client, stream, ended, client.leave)
        finally:
            with self.lock:
                self.churn_alive -= 1

    def vanish(self, client: Client, rng: random.Random) -> None:
        """Send a request and go away at once, without reading (or after one read)."""
        with self.lock:
            self.clients.append(client)
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        try:
            request = (
                f"GET /sse?cid={client.cid}&kind=vanish&key={client.key} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{self.server.port}\r\n\r\n"
            )
            sock.sendall(request.encode())
            if rng.random() < 0.5:
                try:
                    sock.recv(rng.choice((1, 100, 4096)))
                except OSError:
                    pass
            if client.leave == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            client.left_at = self.now()
            sock.close()
        client.end, client.t_end, client.done = "left", client.left_at, True

    def spawner(self) -> None:
        rng = random.Random(self.rng.randrange(2**32))
        kinds, weights = zip(*KINDS.items(), strict=True)
        while not self.stop.is_set():
            with self.lock:
                room_for = self.scenario.churn - self.churn_alive
            if room_for > 0:
                kind = rng.choices(kinds, weights)[0]
                count = 12 if kind == "burst" else 1
                for _ in range(count):
                    real = "normal" if kind == "burst" else kind
                    client = Client(
                        cid=self.new_cid(real),
                        kind=real,
                        key=rng.choice(CHURN_KEYS),
                        room=rng.choice((None, *self.room_names())),
                        leave=rng.choice(LEAVES),
                        peer=real == "normal" and rng.random() < 0.3,
                    )
                    with self.lock:
                        self.churn_alive += 1
                    self.start_thread(self.churn, client, random.Random(rng.randrange(2**32)))
            self.stop.wait(rng.uniform(0.005, 0.05))

    def room_names(self) -> list[str]:
        return [f"room{i}" for i in range(ROOMS)]

    # -- senders ---------------------------------------------------------------------

    def command(self, sender: str, seq: int, action: str, rng: random.Random) -> Command:
        """POST one command and record it."""
        query = f"s={sender}&q={seq}"
        key = label = None
        channel = "main"
        if action.startswith("bcast"):
            path = "/bcast"
            if action == "bcast_c":
                label = rng.choice(LABELS)
            elif action == "bcast_pad":
                query += f"&pad={rng.randrange(2048, 8192)}"
            elif action == "bcast_html":
                query += f"&html=1&pad={rng.randrange(0, 2048)}"
        elif action.startswith("unicast"):
            path = "/unicast"
            key = rng.choice(STEADY_KEYS + CHURN_KEYS)
            if action == "unicast_c":
                label = rng.choice(LABELS)
        elif action == "notify":
            path, channel = "/notify", "notify"
            key = rng.choice(STEADY_KEYS + CHURN_KEYS)
        elif action == "room":
            path, channel = "/room", "room"
            query += f"&r={rng.choice(self.room_names())}"
        elif action == "recycle":
            path, channel = "/recycle", ""
            query += f"&r={rng.choice(self.room_names())}"
        elif action.startswith("close"):
            path, channel = "/close", ""
            key = rng.choice(CLOSE_KEYS)  # never a steady reader's or a peer writer's
            query += "&reconnect=1" if action == "close_reconnect" else "&reconnect=0"
        else:
            path, channel = "/empty", ""
        if key is not None:
            query += f"&k={key}"
        if label is not None:
            query += f"&c={label}"
        record = Command(sender, seq, action, channel, key, label, start=self.now())
        with self.lock:
            self.commands.append(record)
        try:
            status, _, body = post(f"{self.server.url}{path}?{query}", timeout=30)
        except (OSError, urllib.error.URLError) as e:
            record.end = self.now()
            self.violations.add("a command failed", f"{path}?{query}: {e!r}")
            return record
        record.end, record.status = self.now(), status
        try:
            answer = json.loads(body)
            record.pid, record.reached = answer.get("pid"), answer.get("reached", 0)
        except ValueError:
            answer = None
        if status != 200 and not (action == "empty" and status == 400 and answer):
            self.violations.add(
                "a command did not answer 200", f"{path}?{query}: {status} {body[:300]!r}"
            )
        return record

    def sender(self, index: int) -> None:
        rng = random.Random(self.rng.randrange(2**32))
        name = f"s{index}"
        chosen = {name: weight for name, weight in ACTIONS.items() if name not in WITHOUT}
        actions, weights = zip(*chosen.items(), strict=True)
        seq = 0
        while not self.stop.is_set():
            seq += 1
            self.command(name, seq, rng.choices(actions, weights)[0], rng)
            self.stop.wait(rng.uniform(0, 0.02))

    # -- the run ---------------------------------------------------------------------

    def warm_up(self) -> tuple[dict[int, dict[str, Any]], dict[int, collections.Counter[str]]]:
        """Make every worker start its threads, then take the baseline."""
        pids: set[int] = set()
        for round_ in range(8):
            streams = []
            for i in range(6):
                client = Client(
                    f"warm{round_}x{i}", "warm", None, self.room_names()[i % ROOMS], "close"
                )
                stream = self.open_stream(client)
                if stream is not None:
                    streams.append((client, stream))
            self.command("warm", round_ * 10 + 1, "bcast", self.rng)
            self.command("warm", round_ * 10 + 2, "unicast", self.rng)
            for room_index, room in enumerate(self.room_names()):
                post(f"{self.server.url}/room?s=warm&q={round_ * 10 + 3 + room_index}&r={room}")
            for client, stream in streams:
                self.read(client, stream, self.now() + 5.0, lambda c=client: c.path is not None)
                pids.add(client.pid or 0)
                stream.close()
            if pids >= set(self.server.worker_pids()):
                break
        self.settle("after the warm-up")
        with self.lock:
            self.clients.clear()
            self.commands.clear()
        stats = worker_stats(self.server)
        fds = {pid: self.fds(pid) for pid in stats}
        return stats, fds

    def fds(self, pid: int) -> collections.Counter[str]:
        return fd_kinds(pid, self.server.port, self.redis.port if self.redis else None)

    def settle(self, when: str) -> dict[int, dict[str, Any]]:
        """Wait until no worker holds a stream; a violation after SETTLE seconds."""
        deadline = self.now() + SETTLE
        while True:
            stats = worker_stats(self.server)
            held = {
                pid: (s["open"], s["registered"], s["rooms"], s["closed_rooms"])
                for pid, s in stats.items()
                if s["open"] or s["registered"] or any(s["rooms"].values()) or s["closed_rooms"]
            }
            if not held:
                return stats
            if self.now() > deadline:
                self.violations.add(
                    "streams outlived their connections",
                    f"{when}, {SETTLE} s after the last client left, (open, registered in main,"
                    f" in rooms, in closed rooms) by worker: {held}",
                )
                return stats
            time.sleep(0.2)

    def run(self) -> None:
        scenario = self.scenario
        pids = self.server.worker_pids()
        base_stats, base_fds = self.warm_up()
        # The attack.
        steady = []
        for i in range(scenario.steady):
            client = Client(
                cid=f"steady{i}",
                kind="steady",
                key=STEADY_KEYS[i % len(STEADY_KEYS)],
                room=self.rng.choice((None, *self.room_names())),
                leave=self.rng.choice(LEAVES),
            )
            ready = threading.Event()
            self.start_thread(self.steady, client, ready)
            ready.wait(30)
            steady.append(client)
        for i in range(scenario.peer_writers):
            writer = Client(
                cid=f"writer{i}",
                kind="writer",
                key=CHURN_KEYS[i],
                room=None,
                leave="close",
                peer=True,
            )
            self.start_thread(self.peer_writer, writer)
        deadline = self.now() + 30
        while any(c.t_reg is None and not c.done for c in steady) and self.now() < deadline:
            time.sleep(0.05)
        start = self.now()
        redis_restart_at = start + self.seconds * self.rng.uniform(0.3, 0.6)
        self.start_thread(self.spawner)
        for index in range(scenario.senders):
            self.start_thread(self.sender, index)
        restarted = self.redis is None
        while self.now() < start + self.seconds:
            if not restarted and self.now() >= redis_restart_at:
                assert self.redis is not None
                self.redis.restart()
                restarted = True
                self.notes.append(f"Redis restarted at {self.now() - start:.1f} s")
            time.sleep(0.05)
        self.stop.set()
        deadline = self.now() + 2 * SETTLE
        while self.now() < deadline:
            with self.lock:
                if self.churn_alive == 0:
                    break
            time.sleep(0.05)
        else:
            self.violations.add("harness error", "churn clients did not finish")
        # The final coalesced pairs, then the fence, then the steady readers leave.
        final: dict[str, int] = {}
        seq = 0
        for label in LABELS:
            seq += 1
            fill = 30
            began = self.now()
            status, _, body = post(
                f"{self.server.url}/final?s=fin&q={seq}&c={label}&k={STEADY_KEYS[0]}&fill={fill}",
                timeout=30,
            )
            if status != 200:
                self.violations.add("a command did not answer 200", f"/final: {status} {body!r}")
            for i in range(fill):
                self.commands.append(
                    Command("fin", seq + i, "bcast", "main", None, None, began, self.now(), status)
                )
            seq += fill
            final[label] = seq  # X is #seq, Y is #seq+1
            seq += 1
        for room_index, room in enumerate(self.room_names()):
            post(f"{self.server.url}/room?s=fin&q={seq + 1 + room_index}&r={room}")
        fence = self.command("fence", 1, "bcast", self.rng)
        self.fence_sent.set()
        deadline = self.now() + SETTLE
        while any(not c.done and not c.fence for c in steady) and self.now() < deadline:
            time.sleep(0.05)
        missing_fence = [c.cid for c in steady if not c.done and not c.fence]
        if missing_fence:
            self.violations.add(
                "the fence never reached a steady reader",
                f"{missing_fence} within {SETTLE} s (fence answered {fence.status})",
            )
        self.give_up.set()
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(2 * SETTLE)
        self.check_steady(steady, final)
        # Everything is gone: the server must be back where it started.
        stats = self.settle("after the attack")
        self.caps = {pid: (st["max_open"], st["stream_limit"]) for pid, st in stats.items()}
        self.check_clients(stats)
        self.check_baseline(pids, base_stats, stats, base_fds)

    # -- the invariants --------------------------------------------------------------

    def check_steady(self, steady: list[Client], final: dict[str, int]) -> None:
        for client in steady:
            if client.t_reg is None or not client.fence:
                continue  # already a violation: it ended early
            t_reg = client.t_reg
            missing = []
            for command in self.commands:
                if not command.ok or command.label is not None or command.start <= t_reg:
                    continue
                if command.channel == "main":
                    if command.action.startswith("unicast") and command.key != client.key:
                        continue
                    if any(r > command.start for r in client.resyncs["main"]):
                        continue  # the bus lost messages and said so
                elif command.channel == "notify":
                    if command.key != client.key or command.pid != client.pid:
                        continue
                else:
                    continue
                self.verified += 1
                if (command.sender, command.seq) not in client.got[command.channel]:
                    missing.append(f"{command.action} {command.sender}#{command.seq}")
            if missing:
                self.violations.add(
                    "a steady reader missed events addressed to it",
                    f"{client.cid} (key {client.key}, pid {client.pid}): {len(missing)} missing,"
                    f" e.g. {missing[:8]}",
                )
            for label, seq in final.items():
                mine = client.key == STEADY_KEYS[0]
                want = ("fy", seq + 1) if mine else ("fx", seq)
                last = client.last_label.get(label)
                got = None if last is None else (last["t"], last["q"])
                if last is None or last["s"] != "fin" or got != want:
                    self.violations.add(
                        "coalescing lost the newest event for a recipient",
                        f"{client.cid} (key {client.key}): label {label} ends with"
                        f" {last and (last['t'], last['s'], last['q'])}, expected {want}"
                        f" ({'send_to its key' if mine else 'the broadcast'})",
                    )

    def check_clients(self, stats: dict[int, dict[str, Any]]) -> None:
        connects: collections.Counter[str] = collections.Counter()
        disconnects: collections.Counter[str] = collections.Counter()
        reasons: dict[str, str] = {}
        cap_broken = []
        for pid, s in stats.items():
            connects.update(s["connects"])
            disconnects.update(s["disconnects"])
            reasons.update(s["reasons"])
            for cid, what in s["anomalies"]:
                self.violations.add("on_connect/on_disconnect ran out of turn", f"{cid}: {what}")
            if s["stream_limit"] is not None and s["max_open"] > s["stream_limit"]:
                cap_broken.append(f"worker {pid}: {s['max_open']} > {s['stream_limit']}")
        if cap_broken:
            self.violations.add("a worker held more streams than its cap", "; ".join(cap_broken))
        closes: dict[str, list[Command]] = collections.defaultdict(list)
        for command in self.commands:
            if command.action.startswith("close") and command.key:
                closes[command.key].append(command)
        for client in self.clients:
            cid = client.cid
            if connects[cid] > 1 or disconnects[cid] != connects[cid]:
                self.violations.add(
                    "on_disconnect did not run exactly once per stream",
                    f"{cid} ({client.kind}, ended {client.end}): {connects[cid]} connect(s),"
                    f" {disconnects[cid]} disconnect(s)",
                )
            if client.t_reg is not None and connects[cid] != 1:
                self.violations.add("a stream was served without on_connect", cid)
            reason = reasons.get(cid, "")
            asked = [c for c in closes.get(client.key or "", []) if c.start < client.t_end]
            asked_clean = [c for c in asked if c.action == "close"]
            where = (
                f"{cid} ({client.kind}, key {client.key}): ended {client.end}, reason {reason!r}"
            )
            if client.end == "failed" and not asked:
                self.violations.add(
                    "a stream could not be opened", f"{where}; the client saw {client.error}"
                )
            if not connects[cid]:
                continue
            if client.end == "clean":
                if not reason.startswith("closed by the server") or not asked_clean:
                    self.violations.add(
                        "a stream ended cleanly though no command closed it cleanly", where
                    )
                continue
            if client.end != "abrupt":
                continue  # the client left first, or saw the fence, or is flagged already
            if client.fin_at is not None and client.fin_at < client.t_end:
                continue  # after its FIN, any reason will do
            if client.peer and reason == "the handler raised StreamClosed":
                # A handler that writes to its peers lets a leaving peer's StreamClosed
                # end it; its own stream then ends abruptly (issue 8, item 4).
                pass
            elif (
                reason.startswith(NOT_READING)
                or (
                    reason.startswith(CLIENT_FAILED)
                    and ("timed out" in reason or "ETIMEDOUT" in reason)
                )
                or (reason.startswith(CLIENT_LEFT) and client.kind in ("slow", "stalled"))
            ):
                # TCP_USER_TIMEOUT also ends a connection whose window stays shut, as an
                # error on the socket: the watcher then reports a reset.
                if client.kind not in ("slow", "stalled"):
                    self.violations.add("a reading client was cut as not reading", where)
            elif reason.startswith(CLIENT_LEFT + CLIENT_FAILED):
                self.violations.add(
                    "the server ended a stream as if its client had left, while it was there",
                    where,
                )
            elif reason.startswith("closed by the server"):
                if not asked:
                    self.violations.add("a stream was closed by the server unasked", where)
            else:
                self.violations.add("a stream ended abruptly for a wrong reason", where)

    def check_baseline(
        self,
        pids: list[int],
        base_stats: dict[int, dict[str, Any]],
        stats: dict[int, dict[str, Any]],
        base_fds: dict[int, collections.Counter[str]],
    ) -> None:
        if self.server.worker_pids() != pids or set(stats) != set(pids):
            self.violations.add(
                "a worker died",
                f"workers were {pids}, now {self.server.worker_pids()} (answered: {sorted(stats)})",
            )
            return
        for pid in pids:
            before, after = (
                own_threads(base_stats[pid]["threads"]),
                own_threads(stats[pid]["threads"]),
            )
            # One broadcaster per live registry name at most: more is a leaked thread.
            doubled = [n for n, c in collections.Counter(after).items() if c > 1]
            others_before = [n for n in before if "broadcaster" not in n]
            others_after = [n for n in after if "broadcaster" not in n]
            if doubled or others_before != others_after:
                self.violations.add(
                    "threads did not return to the baseline",
                    f"worker {pid}: before {before}, after {after}",
                )
        deadline = self.now() + SETTLE
        while True:
            now_fds = {pid: self.fds(pid) for pid in pids}
            diff = {
                pid: (dict(base_fds[pid]), dict(now_fds[pid]))
                for pid in pids
                if self._fd_diff(base_fds[pid], now_fds[pid])
            }
            if not diff:
                break
            if self.now() > deadline:
                self.violations.add(
                    "descriptors did not return to the baseline", f"(before, after): {diff}"
                )
                break
            time.sleep(0.2)
        for pid in pids:
            self.check_idle(pid)
        for where, error, text in tracebacks(self.server.log_text()):
            if error.startswith("flask_datastar.stream.StreamClosed") and PEER_WRITE in text:
                # The peer writers' own handler error, by design (issue 8, item 4): it
                # writes to the other tabs of its user uncaught, and one of them left.
                continue
            self.violations.add(f"a Traceback in the server log: {error} at {where}", text)

    def _fd_diff(self, before: collections.Counter[str], after: collections.Counter[str]) -> bool:
        if after["client socket"]:
            return True
        # redis-py keeps a pool of publishing connections, up to the requests in flight.
        if after["redis socket"] > self.scenario.threads + 2:
            return True
        skip = {"client socket", "redis socket"}
        return {k: v for k, v in before.items() if k not in skip and v} != {
            k: v for k, v in after.items() if k not in skip and v
        }

    def check_idle(self, pid: int) -> None:
        """The worker, with no stream and no request, must not burn CPU."""
        deadline = self.now() + SETTLE
        window = 2.0
        while True:
            used = cpu_seconds(pid)
            time.sleep(window)
            share = (cpu_seconds(pid) - used) / window
            if share < IDLE_CPU:
                return
            if self.now() > deadline:
                self.violations.add(
                    "an idle worker burns CPU",
                    f"worker {pid}: {share:.0%} of a core over {window} s, {SETTLE} s after"
                    " the last client left",
                )
                return

    def summary(self) -> str:
        ends = collections.Counter((c.kind, c.end) for c in self.clients)
        actions = collections.Counter(c.action for c in self.commands)
        failed = sum(not c.ok for c in self.commands)
        return (
            f"{len(self.clients)} stream clients {dict(sorted(ends.items()))};"
            f" {len(self.commands)} commands ({failed} not 200) {dict(sorted(actions.items()))};"
            f" {self.verified} deliveries to steady readers checked;"
            f" streams held at most / cap by worker {self.caps};"
            f" notes: {self.notes[:10]}"
        )


@pytest.fixture
def torture_settings(request: pytest.FixtureRequest) -> tuple[int, float]:
    """The seed (from ``--torture-seed``, else a new one) and the attack's duration."""
    seed = request.config.getoption("--torture-seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    return seed, request.config.getoption("--torture-seconds")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_torture(scenario: Scenario, torture_settings: tuple[int, float], tmp_path: Path) -> None:
    seed, seconds = torture_settings
    print(f"\ntorture: seed {seed}, {seconds} s, {scenario}")
    config = tmp_path / "gunicorn_torture.conf.py"
    config.write_text(
        "from flask_datastar.gunicorn import post_worker_init, worker_exit  # noqa: F401\n"
        "keepalive = 2\n"
    )
    env = {
        "FLASK_DATASTAR_HEARTBEAT": str(HEARTBEAT),
        "FLASK_DATASTAR_MAX_BACKLOG": str(MAX_BACKLOG),
        "FLASK_DATASTAR_SEND_TIMEOUT": str(SEND_TIMEOUT),
        "TORTURE_FD_PAD": "0" if "fdpad" in WITHOUT else str(FD_PAD),
        "TORTURE_ROOMS": str(ROOMS),
        "TORTURE_DEBUG": os.environ.get("TORTURE_DEBUG", ""),
    }
    began = time.monotonic()
    with ExitStack() as stack:
        redis = None
        if scenario.redis:
            redis = stack.enter_context(RedisServer())
            env["FLASK_DATASTAR_REDIS_URL"] = redis.url
        server = stack.enter_context(
            GunicornServer(
                APP,
                workers=scenario.workers,
                threads=scenario.threads,
                env=env,
                config=str(config),
            )
        )
        torture = Torture(server, redis, scenario, seed, seconds)
        torture.run()
    print(f"torture: {time.monotonic() - began:.1f} s; {torture.summary()}")
    assert not torture.violations, (
        f"The torture test (seed {seed}, replay with --torture-seed={seed}) found:\n"
        f"{torture.violations.report()}\n{torture.summary()}"
    )
