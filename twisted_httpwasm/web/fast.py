"""The compiled fast path of the twisted.web side, and the choice between it and the pure one.

A request's filter, its streamed sink and its interception are Python classes
(:class:`~.filter.RequestFilter`, :class:`~.sinks.StreamedSink`,
:class:`~.interception.Interception`) whose storage a subclass provides: slots
on the pure-Python path, or a base type of the optional extension ``_fast``
(``web/_fast.c``), which also does their hot methods in C for the common
request - a guest that passes it on unchanged, a streamed response, one guest
on the request - and hands every other case to the Python method, untouched.
The rules stay in one place, the Python classes; the C side only repeats the
steps of their common case.

It serves with the guest-call accelerator (``runtime/accel.py``): both or
neither, so ``TWISTED_HTTPWASM_PURE=1`` and the tests' pure variants turn both
off.  :func:`filter_type` is asked when a resource is made.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from twisted.web.http import NO_BODY_CODES
from twisted.web.server import NOT_DONE_YET

from ..abi import Feature
from ..runtime import accel
from ..runtime.observe import NO_OBSERVER, Outcome
from . import filter as _filter
from .interception import METHODS, STREAMED_METHODS, Interception
from .request_changes import TwistedRequestState
from .request_context import CONTEXT_ATTRIBUTE, context_of
from .runners import InlineRunner
from .sinks import StreamedSink
from .twisted_internals import RESPONSE_ENCODER_ATTRIBUTE, raw_header_map, stored_header_name

__all__ = ["FAST", "REASON", "describe", "filter_type"]


def _import() -> tuple[Any, str]:
    if accel.compiled is None:  # both or neither: why the accelerator does not serve is this path's reason too
        return None, accel.REASON
    try:
        from . import _fast  # type: ignore[attr-defined]
    except ImportError:
        return None, "the compiled fast path is not built (no C compiler at install)"
    return _fast, "compiled"


_fast, REASON = _import()
_FAST_FILTER: Any = None

if _fast is not None:

    class FastStreamedSink(_fast.StreamedSinkCore, StreamedSink):  # type: ignore[misc,name-defined]
        """A :class:`~.sinks.StreamedSink` whose storage, ``write`` and ``complete`` are in C."""

        __slots__ = ()

    class FastInterception(_fast.InterceptionCore, Interception):  # type: ignore[misc,name-defined]
        """An :class:`~.interception.Interception` whose storage and ``remove`` are in C."""

        __slots__ = ()

    class FastRequestFilter(_fast.FilterCore, _filter.RequestFilter):  # type: ignore[misc,name-defined]
        """A :class:`~.filter.RequestFilter` whose storage and hot methods are in C."""

        __slots__ = ()
        sink_type = FastStreamedSink
        interception_type = FastInterception

    _python = _filter.RequestFilter
    try:
        _fast.setup(
            {
                "state_type": TwistedRequestState,
                "inline_runner": InlineRunner,
                "no_observer": NO_OBSERVER,
                "not_read": _filter.NOT_READ,
                "monotonic": time.monotonic,
                "passed": Outcome.PASSED,
                "not_done_yet": NOT_DONE_YET,
                "stages": _filter.STAGES,
                "buffer_request": int(Feature.BUFFER_REQUEST),
                "buffer_response": int(Feature.BUFFER_RESPONSE),
                "filter_init": _python.__init__,
                "start": _python.start,
                "after_handle_request": _python._after_handle_request,
                "downstream_finish": _python._downstream_finish,
                "after_handle_response": _python._after_handle_response,
                "sink_type": FastStreamedSink,
                "interception_type": FastInterception,
                "sink_init": StreamedSink.__init__,
                "write": StreamedSink.write,
                "complete": StreamedSink.complete,
                "no_body_codes": NO_BODY_CODES,
                "encoder_attribute": RESPONSE_ENCODER_ATTRIBUTE,
                "raw_header_map": raw_header_map,
                "content_length_name": stored_header_name(b"content-length"),
                "context_attribute": CONTEXT_ATTRIBUTE,
                "context_of": context_of,
                "interception_init": Interception.__init__,
                "remove": Interception.remove,
                "all_methods": METHODS,
                "streamed_methods": STREAMED_METHODS,
            }
        )
    except Exception as error:  # noqa: BLE001 - any mismatch leaves the pure path, with one warning
        warnings.warn(f"twisted-httpwasm: compiled fast path disabled: {error}", RuntimeWarning, stacklevel=2)
        REASON = f"disabled: {error}"
    else:
        _FAST_FILTER = FastRequestFilter

#: Whether the compiled fast path is built, allowed and set up in this process.
FAST = _FAST_FILTER is not None


def filter_type() -> Any:
    """The filter class for a resource made now: the compiled one when the guest-call accelerator serves too."""
    if _FAST_FILTER is not None and accel.module is not None:
        return _FAST_FILTER
    return _filter.PureRequestFilter


def describe() -> str:
    """One line for the startup log: which paths serve (guest calls, and the twisted.web side if it differs)."""
    calls = accel.describe()
    if accel.module is not None and _FAST_FILTER is None:
        return f"{calls}; twisted.web side: pure Python ({REASON})"
    return calls
