"""Which guest-call path serves: the compiled accelerator, or pure Python.

The accelerator (``_accel``, a C extension built at install when a C compiler
and Python's headers are there) calls guest exports through wasmtime's C API
and answers the common ``http_handler`` host functions in C, over a snapshot
of the request taken before each call (in an inline call, request headers are
read by name when the guest asks, through ``RequestState.request_header_values``,
as the pure path reads them); it records what the guest changes, and
:data:`apply` makes those changes on the Python objects after the call (or
before a host function only Python answers).  Whatever it does not answer
itself, and every failure, is answered by the pure-Python implementation, so
both paths behave the same, byte for byte (the suite runs against both).

It is used when it is built, ``TWISTED_HTTPWASM_PURE`` is not set, and the
wasmtime library loaded is a major it was written for; otherwise the pure path
serves, with one warning when the reason is a mismatch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

from wasmtime import _ffi as ffi

from ..abi import HOST_FUNCTIONS, LogLevel
from . import engine as _engine
from . import native as _native
from .observe import NO_OBSERVER
from .state import REQUEST_PHASE, HeaderList

__all__ = ["ACCELERATED", "HOST_IDS", "REASON", "apply", "compiled", "describe", "module"]

#: The ids the C side knows the http_handler functions by (their order in ``_accel.c``).
HOST_IDS = {
    name: index
    for index, name in enumerate(
        (
            "enable_features",
            "get_config",
            "log",
            "log_enabled",
            "get_method",
            "set_method",
            "get_uri",
            "set_uri",
            "get_protocol_version",
            "get_source_addr",
            "get_header_names",
            "get_header_values",
            "set_header_value",
            "add_header_value",
            "remove_header",
            "read_body",
            "write_body",
            "get_status_code",
            "set_status_code",
        )
    )
}

#: The levels a line recorded in C is logged at, by its level + 1 (debug, info, warn, error).
_LEVELS = (LogLevel.DEBUG, LogLevel.INFO, LogLevel.WARN, LogLevel.ERROR)


def _nothing_recorded(instance: Any) -> None:
    """:data:`apply` without the accelerator: nothing is recorded in C, so there is nothing to apply."""


def _raise_error(address: int) -> BaseException:
    return _native._error_from(address)


def _raise_trap(address: int) -> BaseException:
    return _native._trap_from(address)


def _timed_out() -> BaseException:
    # As the pure path's interrupt trap (the caller words the reason from the guest's limit).
    return _native.GuestCallError("guest exceeded its time limit", interrupted=True)


def _load() -> tuple[Any, str]:
    if os.environ.get("TWISTED_HTTPWASM_PURE"):
        return None, "TWISTED_HTTPWASM_PURE is set"
    try:
        from . import _accel  # type: ignore[attr-defined]
    except ImportError:
        return None, "the compiled accelerator is not built (no C compiler at install)"
    if len(HOST_IDS) != _accel.HOST_FUNCTIONS or sorted(HOST_IDS) != sorted(spec.name for spec in HOST_FUNCTIONS):
        return None, "the compiled accelerator is out of step with the ABI table"
    try:
        major = int(metadata.version("wasmtime").split(".")[0])
        handle = ffi.dll._handle
        _accel.setup(handle, major, _accel.apply, _raise_error, _raise_trap, _timed_out, REQUEST_PHASE)
        _accel.setup_apply(HeaderList, _LEVELS)
        _accel.setup_calls(_native.current, vars(_engine), NO_OBSERVER)
    except Exception as error:  # noqa: BLE001 - any mismatch leaves the pure path, with one warning
        warnings.warn(f"twisted-httpwasm: compiled accelerator disabled: {error}", RuntimeWarning, stacklevel=2)
        return None, f"disabled: {error}"
    return _accel, "compiled"


#: The compiled accelerator, when it is built, allowed and matches wasmtime; else None.
compiled, REASON = _load()
#: What guests loaded from now on use: ``compiled``, or None for the pure path (tests set it per test).
module = compiled
#: Whether the compiled accelerator serves guest calls in this process.
ACCELERATED = compiled is not None
#: apply(instance): make what the call in progress (or just ended) recorded in C on its request
#: (``instance.state``: features, response headers) and call log (counts; lines through
#: ``instance.log``, in order), and forget it.  In C: the recorded response headers become the
#: state's ``HeaderList`` without Python building one entry by entry.
apply: Callable[[Any], None] = compiled.apply if compiled is not None else _nothing_recorded
#: GuestInstance._end_fast_call where the accelerator is built (C for the common case); else None.
end_fast_call: Any = compiled.end_fast_call if compiled is not None else None


def describe() -> str:
    """One line for the startup log: which path serves guest calls."""
    if module is not None:
        return "guest calls: compiled accelerator"
    return f"guest calls: pure Python ({REASON})"
