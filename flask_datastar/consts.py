"""The Datastar protocol's constants, under the names of ``datastar_py.consts``.

A datastar-py user's ``from datastar_py import consts`` becomes
``from flask_datastar import consts``: the same names with the same values.
The enums are those of :mod:`flask_datastar.sse` (one class each, so a value
from either module is the same object). No Flask import.
"""

from __future__ import annotations

from .sse import DEFAULT_RETRY_DURATION, ElementPatchMode, ElementPatchNamespace, EventType

__all__ = [
    "DATASTAR_KEY",
    "DEFAULT_ELEMENTS_USE_VIEW_TRANSITIONS",
    "DEFAULT_PATCH_SIGNALS_ONLY_IF_MISSING",
    "DEFAULT_SSE_RETRY_DURATION",
    "ELEMENTS_DATALINE_LITERAL",
    "MODE_DATALINE_LITERAL",
    "NAMESPACE_DATALINE_LITERAL",
    "ONLY_IF_MISSING_DATALINE_LITERAL",
    "SELECTOR_DATALINE_LITERAL",
    "SIGNALS_DATALINE_LITERAL",
    "USE_VIEW_TRANSITION_DATALINE_LITERAL",
    "VIEW_TRANSITION_SELECTOR_DATALINE_LITERAL",
    "ElementPatchMode",
    "ElementPatchNamespace",
    "EventType",
]

#: The query parameter that carries the signals of ``GET`` and ``DELETE`` requests.
DATASTAR_KEY = "datastar"

#: The client's reconnection delay in milliseconds when the server sends no ``retry:``.
DEFAULT_SSE_RETRY_DURATION = DEFAULT_RETRY_DURATION

#: The data-line keys of ``datastar-patch-elements``.
SELECTOR_DATALINE_LITERAL = "selector"
MODE_DATALINE_LITERAL = "mode"
NAMESPACE_DATALINE_LITERAL = "namespace"
ELEMENTS_DATALINE_LITERAL = "elements"
USE_VIEW_TRANSITION_DATALINE_LITERAL = "useViewTransition"
VIEW_TRANSITION_SELECTOR_DATALINE_LITERAL = "viewTransitionSelector"
#: The data-line keys of ``datastar-patch-signals``.
SIGNALS_DATALINE_LITERAL = "signals"
ONLY_IF_MISSING_DATALINE_LITERAL = "onlyIfMissing"

#: Whether elements are patched in a view transition unless told otherwise.
DEFAULT_ELEMENTS_USE_VIEW_TRANSITIONS = False
#: Whether signals are patched only when missing unless told otherwise.
DEFAULT_PATCH_SIGNALS_ONLY_IF_MISSING = False
