"""Datastar (data-star.dev) for Flask.

The wire format is in :mod:`flask_datastar.sse`, the stream in
:mod:`flask_datastar.stream`, how bytes reach the client in
:mod:`flask_datastar.transport`, the connection registry in
:mod:`flask_datastar.registry`, broadcasts across processes in
:mod:`flask_datastar.bus`, the Datastar client's script tag and
``flask datastar`` commands in :mod:`flask_datastar.client`, the CSRF check in
:mod:`flask_datastar.guards`, and the Flask glue in
:mod:`flask_datastar.extension` and :mod:`flask_datastar.response`.
"""

from __future__ import annotations

from . import consts
from .actions import (
    FETCH_OPTIONS,
    JS,
    ActionGenerator,
    AttributeGenerator,
    action_generator,
    attribute_generator,
    js_literal,
    peek,
    set_all,
    sse_delete,
    sse_get,
    sse_patch,
    sse_post,
    sse_put,
    toggle_all,
)
from .bus import Bus, BusError, LocalBus, RedisBus
from .client import (
    DATASTAR_CDN_URL,
    DATASTAR_INTEGRITY,
    DATASTAR_VERSION,
    datastar_script,
    datastar_url,
)
from .extension import DatastarConfig, FlaskDatastar, Periodic, RegistryHandle
from .guards import CSRFError, csrf_exempt
from .registry import SSERegistry
from .replay import ReplayLog
from .response import DatastarResponse, datastar_response, sse_response, sse_stream
from .signals import dumps_signals, is_datastar_request, read_signals
from .sse import (
    SSE,
    SSE_HEADERS,
    DatastarEvent,
    ElementPatchMode,
    ElementPatchNamespace,
    EventType,
    ServerSentEventGenerator,
    js_string,
)
from .stream import Stream, StreamClosed, close_all_streams, open_streams, with_sse

__all__ = [
    "DATASTAR_CDN_URL",
    "DATASTAR_INTEGRITY",
    "DATASTAR_VERSION",
    "FETCH_OPTIONS",
    "JS",
    "SSE",
    "SSE_HEADERS",
    "ActionGenerator",
    "AttributeGenerator",
    "Bus",
    "BusError",
    "CSRFError",
    "DatastarConfig",
    "DatastarEvent",
    "DatastarResponse",
    "ElementPatchMode",
    "ElementPatchNamespace",
    "EventType",
    "FlaskDatastar",
    "LocalBus",
    "RedisBus",
    "Periodic",
    "RegistryHandle",
    "ReplayLog",
    "SSERegistry",
    "ServerSentEventGenerator",
    "Stream",
    "StreamClosed",
    "action_generator",
    "attribute_generator",
    "close_all_streams",
    "consts",
    "csrf_exempt",
    "datastar_response",
    "datastar_script",
    "datastar_url",
    "dumps_signals",
    "is_datastar_request",
    "js_literal",
    "js_string",
    "open_streams",
    "peek",
    "read_signals",
    "sse_delete",
    "sse_get",
    "sse_patch",
    "sse_post",
    "sse_put",
    "sse_response",
    "set_all",
    "sse_stream",
    "toggle_all",
    "with_sse",
]
