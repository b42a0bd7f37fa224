"""Compressed streams: which ``Content-Encoding`` a client gets, and one compressor per stream.

Nothing here knows Flask, streams or sockets: a stream holds one
:class:`Encoder` (or none) and passes every byte it sends through it, under
its own lock, right before the bytes reach its transport.

Each event is mostly the previous one (a fat morph re-renders the same
region), so a compressor that keeps its context from one event to the next
shrinks the stream to a few percent of its size, where compressing each
event on its own barely halves it. Every event is flushed at once (zlib's
``Z_SYNC_FLUSH``, brotli's flush, zstd's block flush): nothing waits in a
compressor's buffer, and the client can decode each event as soon as it
arrives. A stream that ends cleanly ends its compressed body properly
(:meth:`Encoder.finish`); one that ends abruptly does not, as its response
must not look complete anyway.

Memory is what limits the number of tabs: each stream has its own
compressor, so the window and the compressor's tables are kept small (a
4 KiB window by default; see ``DATASTAR_COMPRESSION_WINDOW``). Measured per
stream after a minute of the demo's stream (``benchmarks/compression.py``):
about 55 KiB with zstd, 36 KiB with gzip, and over 300 KiB with brotli, whose
hash tables have a fixed size whatever the window: brotli is therefore last
in the default order.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "DEFAULT_ORDER",
    "DEFAULT_WINDOW",
    "ENCODINGS",
    "BrotliEncoder",
    "Encoder",
    "GzipEncoder",
    "ZstdEncoder",
    "available",
    "make_encoder",
    "negotiate",
    "parse_accept_encoding",
    "parse_compression",
    "parse_window",
]

#: Every encoding flask_datastar can compress a stream with (``Content-Encoding`` tokens).
ENCODINGS = ("zstd", "br", "gzip")
#: The order of preference used when ``DATASTAR_COMPRESSION`` is ``True`` (its default):
#: those of these whose package is installed. zstd is the fastest at the same ratio;
#: gzip (the standard library) is what browsers offer over plain HTTP; brotli costs
#: several times the memory of the others per stream (see the module's docstring).
DEFAULT_ORDER = ("zstd", "gzip", "br")
#: The compressors' window in bytes: an event compresses against the last this many
#: bytes of its stream, so it should hold at least one event (the demo's are ~700 bytes).
DEFAULT_WINDOW = 4096

# Where each encoding's compressor comes from, for the message of a missing package.
_PACKAGES = {"zstd": ("zstandard", "zstd"), "br": ("brotli", "brotli")}
# RFC 9110 section 8.4.1.3: a recipient should treat x-gzip as gzip.
_ALIASES = {"x-gzip": "gzip"}

# zlib: memLevel 5 sizes the hash table and the pending buffer for small events
# (8 KiB each instead of 64 and 32 KiB at the default 8) at no cost in ratio here.
# Level 6 (zlib's default): on the demo's stream, level 1 saves a fifth of the CPU per
# event (4.5 against 5.7 us) but leaves 4.3 % of the bytes instead of 3.0 %.
_GZIP_LEVEL = 6
_GZIP_MEM_LEVEL = 5
# brotli: quality 2 has the smallest fixed tables that still use the window (qualities
# 0 and 1 compress each flushed block on its own: ~50 % instead of ~4 %).
_BROTLI_QUALITY = 2
# zstd: level 1 (the fast strategy) with hash and chain tables a quarter of the window:
# on the demo's stream the same ratio as level 3 (its default), for less CPU per event.
_ZSTD_LEVEL = 1
# zstd's output buffer, per stream: an event larger than this comes out in pieces.
_ZSTD_CHUNK = 1024


def _module(name: str) -> Any:
    """Import and return the compressor module of *name*, or raise ``ImportError``."""
    package, _extra = _PACKAGES[name]
    return importlib.import_module(package)


def available(name: str) -> bool:
    """Return whether the package that compresses with *name* is installed.

    :param name: a ``Content-Encoding`` token from :data:`ENCODINGS`.
    """
    if name == "gzip":
        return True
    try:
        _module(name)
    except ImportError:
        return False
    return True


def parse_compression(value: Any, key: str = "DATASTAR_COMPRESSION") -> tuple[str, ...]:
    """Turn a ``DATASTAR_COMPRESSION`` value into the encodings to offer, in order.

    ``True`` means :data:`DEFAULT_ORDER`, less the encodings whose package is not
    installed; ``False``, ``None`` or an empty list turn compression off; a
    list (or a comma-separated string, as from an environment variable) names
    the encodings in the order of preference. A named encoding whose package
    is missing is an error, so that a deployment does not silently lose it.

    :param value: the configured value.
    :param key: the configuration key, for error messages.
    :raises ValueError: an unknown encoding, or one whose package is missing.
    """
    if value is True:
        return tuple(name for name in DEFAULT_ORDER if available(name))
    if value is None or value is False:
        return ()
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return parse_compression(True, key)
        if lowered in {"0", "false", "no", "off", ""}:
            return ()
        names: Iterable[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, Iterable):
        names = value
    else:
        raise ValueError(
            f"{key} must be True, False or a list of encodings such as"
            f" {list(DEFAULT_ORDER)!r}, not {value!r}."
        )
    order: list[str] = []
    for raw in names:
        name = _ALIASES.get(str(raw).strip().lower(), str(raw).strip().lower())
        if name not in ENCODINGS:
            raise ValueError(
                f"{key} names {raw!r}, which flask_datastar cannot compress with; use"
                f" {', '.join(repr(e) for e in ENCODINGS)}."
            )
        if not available(name):
            package, extra = _PACKAGES[name]
            raise ValueError(
                f"{key} names {name!r}, but its package {package!r} is not installed:"
                f" 'pip install flask_datastar[{extra}]', or leave {name!r} out."
            )
        if name not in order:
            order.append(name)
    return tuple(order)


def parse_window(value: Any, key: str = "DATASTAR_COMPRESSION_WINDOW") -> int:
    """Turn a window size in bytes into its base-2 logarithm (what the compressors take).

    :param value: a power of two from 1024 to 32768 (zlib's largest window).
    :param key: the configuration key, for error messages.
    :raises ValueError: *value* is not such a number.
    """
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1024 or size > 32768 or size & (size - 1):
        raise ValueError(
            f"{key} must be a power of two from 1024 to 32768 bytes (such as 4096), not {value!r}."
        )
    return size.bit_length() - 1


def parse_accept_encoding(header: str | None) -> dict[str, float]:
    """Return the codings of an ``Accept-Encoding`` header with their quality values.

    Lenient, as a server must be with what clients send: codings are
    lower-cased, ``x-gzip`` counts as ``gzip``, an element whose ``q`` is not a
    number is left out, a ``q`` outside 0..1 is clamped, and the first mention
    of a coding wins.

    :param header: the header's value (several fields joined with commas), or ``None``.
    """
    codings: dict[str, float] = {}
    if not header:
        return codings
    for element in header.split(","):
        name, *params = (part.strip() for part in element.split(";"))
        name = _ALIASES.get(name.lower(), name.lower())
        if not name:
            continue
        quality = 1.0
        for param in params:
            key, _, text = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(text.strip())
                except ValueError:
                    quality = -1.0
                break
        if quality != quality or quality < 0:  # NaN or not a number: ignore the element
            continue
        codings.setdefault(name, min(quality, 1.0))
    return codings


def negotiate(header: str | None, preferred: Sequence[str]) -> str | None:
    """Choose the encoding of a response: the client's highest quality, then our order.

    A coding the client gives ``q=0`` is never chosen; ``*`` stands for every
    coding it does not name. Without a header, or with nothing in common,
    the answer is ``None``: the body goes out uncompressed (identity).

    :param header: the request's ``Accept-Encoding``.
    :param preferred: the encodings this server offers, most preferred first.
    """
    codings = parse_accept_encoding(header)
    if not codings:
        return None
    wildcard = codings.get("*", 0.0)
    best: str | None = None
    best_quality = 0.0
    for name in preferred:
        quality = codings.get(name, wildcard)
        if quality > best_quality:
            best, best_quality = name, quality
    return best


class Encoder:
    """One stream's compressor: each event in, its compressed bytes out, flushed.

    Not thread-safe: a stream calls it under its own lock, which also keeps
    the compressed bytes in the order of the events.

    :ivar name: the ``Content-Encoding`` token.
    :ivar raw_bytes: bytes given to :meth:`compress` so far.
    :ivar wire_bytes: compressed bytes returned so far (with :meth:`finish`'s).
    """

    __slots__ = ("raw_bytes", "wire_bytes")
    name = ""

    def __init__(self) -> None:
        self.raw_bytes = 0
        self.wire_bytes = 0

    # Each encoder's compress() is one call of its own, counting included: it runs
    # once per event for every tab of a broadcast, next to a socket send.
    def compress(self, data: bytes) -> bytes:
        """Compress *data* and flush, so the client can decode all of it at once.

        :param data: one or more whole events; never empty.
        :return: the compressed bytes, never empty.
        """
        raise NotImplementedError

    def finish(self) -> bytes:
        """End the compressed body (a trailer, an end-of-stream marker); call it once."""
        out = self._finish()
        self.wire_bytes += len(out)
        return out

    def _finish(self) -> bytes:
        raise NotImplementedError


class GzipEncoder(Encoder):
    """``gzip`` with the standard library's zlib, flushed with ``Z_SYNC_FLUSH``.

    :param window_bits: the base-2 logarithm of the window (10 to 15).
    """

    __slots__ = ("_zlib",)
    name = "gzip"

    def __init__(self, window_bits: int = 12) -> None:
        super().__init__()
        # 16 + bits: a gzip header and trailer around the deflate data.
        self._zlib = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 16 + window_bits, _GZIP_MEM_LEVEL)

    def compress(self, data: bytes) -> bytes:
        out = self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        self.raw_bytes += len(data)
        self.wire_bytes += len(out)
        return out

    def _finish(self) -> bytes:
        return self._zlib.flush(zlib.Z_FINISH)


class BrotliEncoder(Encoder):
    """``br`` with the ``brotli`` package (``pip install flask_datastar[brotli]``).

    :param window_bits: the base-2 logarithm of the window (10 to 24).
    """

    __slots__ = ("_brotli",)
    name = "br"

    def __init__(self, window_bits: int = 12) -> None:
        super().__init__()
        brotli = _module("br")
        self._brotli = brotli.Compressor(
            mode=brotli.MODE_TEXT, quality=_BROTLI_QUALITY, lgwin=window_bits
        )

    def compress(self, data: bytes) -> bytes:
        out: bytes = self._brotli.process(data) + self._brotli.flush()
        self.raw_bytes += len(data)
        self.wire_bytes += len(out)
        return out

    def _finish(self) -> bytes:
        out: bytes = self._brotli.finish()
        return out


class ZstdEncoder(Encoder):
    """``zstd`` with the ``zstandard`` package (``pip install flask_datastar[zstd]``).

    One frame per stream, a block flushed after every event.

    :param window_bits: the base-2 logarithm of the window (10 and up).
    """

    __slots__ = ("_chunker",)
    name = "zstd"

    def __init__(self, window_bits: int = 12) -> None:
        super().__init__()
        zstandard = _module("zstd")
        params = zstandard.ZstdCompressionParameters.from_level(
            _ZSTD_LEVEL,
            window_log=window_bits,
            hash_log=window_bits - 2,
            chain_log=window_bits - 2,
        )
        # A chunker rather than compressobj(): its output buffer has the size we give
        # (compressobj keeps zstd's 128 KiB one per stream).
        self._chunker = zstandard.ZstdCompressor(compression_params=params).chunker(
            chunk_size=_ZSTD_CHUNK
        )

    def compress(self, data: bytes) -> bytes:
        chunker = self._chunker
        pieces = [*chunker.compress(data)]  # only whole chunks: rarely any
        for piece in chunker.flush():
            pieces.append(piece)
            if len(piece) < _ZSTD_CHUNK:
                # A chunk that is not full ends the flush: asking the iterator for the
                # next would only make one more (empty) compression call.
                break
        out = b"".join(pieces)  # (one piece, the usual case, is returned as it is)
        self.raw_bytes += len(data)
        self.wire_bytes += len(out)
        return out

    def _finish(self) -> bytes:
        return b"".join(self._chunker.finish())


_ENCODERS: dict[str, Callable[[int], Encoder]] = {
    "gzip": GzipEncoder,
    "br": BrotliEncoder,
    "zstd": ZstdEncoder,
}


def make_encoder(name: str, window_bits: int = 12) -> Encoder:
    """Return a new compressor for one stream.

    :param name: a ``Content-Encoding`` token from :data:`ENCODINGS`.
    :param window_bits: the base-2 logarithm of the window.
    """
    return _ENCODERS[name](window_bits)
