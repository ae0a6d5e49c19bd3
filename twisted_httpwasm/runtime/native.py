"""The fast path into wasmtime's C API, through wasmtime-py's ctypes library.

wasmtime-py's public ``Func.__call__`` and ``Linker.define_func`` convert every
value through ``Val`` objects (8-18 µs per call), and they pass a host
function's exception back through one process-global slot, which is not safe
when several threads run guests.  The C API's *unchecked* entry points take
raw value slots instead: this module is the only Python that uses them (the
optional compiled accelerator, ``_accel.c``, is the only C), so the rest of the
host stays on wasmtime-py's public types.

Tested with the wasmtime range pinned in ``setup.cfg``; ``tests/test_native.py``
compares this path with the public API on the same guests.
"""

from __future__ import annotations

import ctypes
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

__all__ = [
    "CallerMemory",
    "GuestCallError",
    "HostTrap",
    "NativeFunc",
    "NativeMemory",
    "current",
    "define_host_function",
    "increment_epoch",
    "rearm_window",
    "set_epoch_deadline",
]

_dll = ffi.dll
_c_void_p = ctypes.c_void_p
_c_size_t = ctypes.c_size_t

# One wasmtime_val_raw_t slot is 16 bytes (it can hold a v128); i32/i64 sit at offset 0.
_SLOT = 16


def _proto(name: str, restype: Any, *argtypes: Any) -> Any:
    """A C function that releases the GIL while it runs (it may run wasm)."""
    return ctypes.CFUNCTYPE(restype, *argtypes)((name, _dll))


def _quick(name: str, restype: Any, *argtypes: Any) -> Any:
    """A short, non-blocking C function, called without releasing the GIL.

    Releasing and retaking the GIL costs more than these calls themselves, and
    under load hands the GIL to another thread at the worst moment.
    """
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, _dll))


_memory_data = _quick("wasmtime_memory_data", _c_void_p, _c_void_p, _c_void_p)
_memory_data_size = _quick("wasmtime_memory_data_size", _c_size_t, _c_void_p, _c_void_p)


def _untyped(prototype: Any, name: str, restype: Any) -> Any:
    """``name`` without argument types, for arguments built once as ctypes objects.

    Converting Python ints through ``argtypes`` makes a ctypes object per
    argument per call (about a third of a short call's cost); a caller that
    passes the same ctypes objects every time skips that.
    """
    function = prototype(restype)((name, _dll))
    function.argtypes = None
    return function


# The guest-call path: its arguments are the same ctypes objects for every call of one export.
# wasmtime_func_call_unchecked releases the GIL while wasm runs; the second keeps it, only while
# the epoch clock ticks without it (engine.py).
_func_call_raw = _untyped(ctypes.CFUNCTYPE, "wasmtime_func_call_unchecked", _c_void_p)
_func_call_raw_holding_gil = _untyped(ctypes.PYFUNCTYPE, "wasmtime_func_call_unchecked", _c_void_p)
_set_epoch_deadline_raw = _untyped(ctypes.PYFUNCTYPE, "wasmtime_context_set_epoch_deadline", None)
_trap_new = _quick("wasmtime_trap_new", _c_void_p, ctypes.c_char_p, _c_size_t)
_set_epoch_deadline = _quick("wasmtime_context_set_epoch_deadline", None, _c_void_p, ctypes.c_uint64)
_increment_epoch = _proto("wasmtime_engine_increment_epoch", None, _c_void_p)
_caller_export_get = _quick(
    "wasmtime_caller_export_get", ctypes.c_bool, _c_void_p, ctypes.c_char_p, _c_size_t, _c_void_p
)
_caller_context = _quick("wasmtime_caller_context", _c_void_p, _c_void_p)
_EXTERN_MEMORY = int(ffi.WASMTIME_EXTERN_MEMORY.value)

#: Seconds for which the epoch deadline a call of an export armed also serves that export's next
#: calls (0: every call re-arms).  The engine sets one tick (``EPOCH_INTERVAL``) while its serving
#: clock is the kernel timer, which adds ticks one at a time (never in bursts to catch up, as the
#: Python clock does): arming costs a call into C (~2.5k instructions, a quarter of a short guest
#: call), and a busy instance is called hundreds of times per tick.
rearm_window = 0.0
#: Ticks a deadline is armed with beyond the call's own limit: the epoch may have moved on since
#: the deadline a call reuses was armed (one tick within the window, and one late from the timer's
#: thread), and a call must never get less than its limit.
REARM_MARGIN_TICKS = 2
_monotonic = time.monotonic

_UncheckedCallback = ctypes.CFUNCTYPE(_c_size_t, _c_void_p, _c_void_p, _c_void_p, _c_size_t)
_define_func_unchecked = _proto(
    "wasmtime_linker_define_func_unchecked",
    _c_void_p,
    _c_void_p,
    ctypes.c_char_p,
    _c_size_t,
    ctypes.c_char_p,
    _c_size_t,
    _c_void_p,
    _UncheckedCallback,
    _c_void_p,
    _c_void_p,
)

# ctypes.string_at is a Python function around this C one: a host call's arguments are read
# through it, so the wrapper's frame is skipped where the C function is there (CPython's ctypes).
_string_at = getattr(ctypes, "_string_at", None) or ctypes.string_at
_c_char = ctypes.c_char
_c_int32 = ctypes.c_int32
_c_int64 = ctypes.c_int64


class HostTrap(Exception):
    """Raised by a host function to trap the calling guest with a reason."""


class GuestCallError(Exception):
    """A guest call ended in a trap, a WASI exit, or an engine error.

    ``exit_code`` is set when the guest called WASI ``proc_exit``;
    ``interrupted`` when its epoch deadline (time limit) passed.
    """

    def __init__(self, message: str, *, exit_code: int | None = None, interrupted: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.interrupted = interrupted


class _Current(threading.local):
    """The object whose guest this thread is running, for host callbacks."""

    target: Any = None


current = _Current()

HostFunction = Callable[..., int | None]
OnHostTrap = Callable[[Any, str, HostTrap], str]
OnHostError = Callable[[BaseException], None]


def define_host_function(
    linker: wasmtime.Linker,
    module: str,
    name: str,
    params: Sequence[wasmtime.ValType],
    results: Sequence[wasmtime.ValType],
    function: HostFunction,
    on_trap: OnHostTrap,
    on_host_error: OnHostError,
    accelerated: tuple[Any, int] | None = None,
) -> Any:
    """Define ``module.name`` in ``linker`` as an unchecked host function.

    ``function`` receives ``current.target`` (the object whose guest this
    thread is running; its ``memory`` is a :class:`NativeMemory`, told the
    call's caller when it is a :class:`CallerMemory`) and the i32 parameters as Python ints (signed, as wasm
    passes them), and returns the single result, or ``None``.  When it raises
    :class:`HostTrap`, ``on_trap(target, name, trap)`` gives the message the
    guest traps with (so the function's name is added in one place, not by
    every helper); any other exception is handed to ``on_host_error`` and
    traps the guest with a generic message.  Returns the callback object,
    which the caller must keep alive as long as the linker.

    ``accelerated``: the compiled accelerator's module (``accel.module``) and
    the id it knows the function by (``accel.HOST_IDS``), or None.  With it,
    the function is defined with the accelerator's C callback,
    which answers it in C when it can and calls this function's ctypes callback
    (what the pure path defines) when it cannot: the returned object keeps both.
    """
    for param in params:
        if str(param) != "i32":
            raise ValueError(f"{name}: only i32 parameters are supported, got {param}")
    n_params = len(params)
    unpack = struct.Struct("<" + "i12x" * n_params).unpack
    span = _SLOT * n_params
    result = str(results[0]) if results else None
    result_type: Any = {"i32": _c_int32, "i64": _c_int64, None: None}[result]

    local = current

    def callback(_env: int, caller: int, slots: int, _n: int) -> int:
        try:
            try:
                target = local.target
                memory = target.memory
                if memory.per_call:  # a CallerMemory, found through this call's caller
                    memory.caller = caller
                value = function(target, *unpack(_string_at(slots, span))) if n_params else function(target)
                if result_type is not None:
                    result_type.from_address(slots).value = value or 0
                return 0
            except HostTrap as trap:
                return _new_trap(on_trap(local.target, name, trap))
        except BaseException as error:  # noqa: BLE001 - a host bug must trap, never unwind into wasm
            on_host_error(error)
            return _new_trap(f"host error in {name}")

    native_callback = _UncheckedCallback(callback)
    kept: Any = native_callback
    defined: Any = native_callback
    env: Any = None
    if accelerated is not None:
        accelerator, host_id = accelerated
        fallback = ctypes.cast(native_callback, _c_void_p).value
        kept = accelerator.HostEnv(host_id, fallback, native_callback)
        defined = ctypes.cast(accelerator.callback_address(), _UncheckedCallback)
        env = _c_void_p(kept.address())
    functype = wasmtime.FuncType(list(params), list(results))
    module_bytes = module.encode()
    name_bytes = name.encode()
    error = _define_func_unchecked(
        ctypes.cast(linker.ptr(), _c_void_p),
        module_bytes,
        len(module_bytes),
        name_bytes,
        len(name_bytes),
        ctypes.cast(functype.ptr(), _c_void_p),
        defined,
        env,
        None,
    )
    if error:
        raise _error_from(error)
    return kept


def _new_trap(message: str) -> int:
    data = message.encode("utf-8", "replace")
    return int(_trap_new(data, len(data)))


def _error_from(error: int) -> GuestCallError:
    wrapped = wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
    if isinstance(wrapped, wasmtime.ExitTrap):
        return GuestCallError(f"guest exited with code {wrapped.code}", exit_code=wrapped.code)
    return GuestCallError(_reason(str(wrapped)))


def _trap_from(trap: int) -> GuestCallError:
    wrapped = wasmtime.Trap._from_ptr(ctypes.cast(trap, ctypes.POINTER(ffi.wasm_trap_t)))
    interrupted = wrapped.trap_code == wasmtime.TrapCode.INTERRUPT
    message = _reason(wrapped.message)
    return GuestCallError(message, interrupted=interrupted)


_CAUSE_NUMBER = re.compile(r"\d+: ")


def _reason(message: str) -> str:
    """The cause of a wasmtime error message, without its backtrace.

    Several causes come numbered (``0: memory fault at ...``, ``1: wasm trap: out
    of bounds memory access``): the last, most general one leads, the first follows
    in parentheses.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Caused by:" in lines:
        causes = lines[lines.index("Caused by:") + 1 :]
        if len(causes) > 1:
            causes = [_CAUSE_NUMBER.sub("", cause, count=1) for cause in causes]
            return f"{causes[-1]} ({causes[0]})"
        if causes:
            return causes[0]
    return lines[0] if lines else "trap"


class NativeFunc:
    """A guest export called through ``wasmtime_func_call_unchecked``.

    Not thread-safe: one call at a time, like the store it belongs to.
    """

    __slots__ = (
        "_armed_until",
        "_call_args",
        "_context",
        "_deadline_args",
        "_func",
        "_n_params",
        "_n_results",
        "_slots",
        "_slots_view",
        "_trap",
        "accelerated",
        "deadline",
    )

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, n_params: int, n_results: int, deadline: int):
        context = _c_void_p(_address(store._context()))
        self._n_params = n_params
        self._n_results = n_results
        self._func = func._func  # keep the wasmtime_func_t alive
        self._context = context
        #: The compiled accelerator's twin of this export (``accel.py``), or None.
        self.accelerated: Any = None
        count = max(n_params, n_results, 1)
        self._slots = (ctypes.c_byte * (_SLOT * count))()
        # The slots as int64s: slot i's i32/i64 is item 2 * i (a slot is 16 bytes).
        self._slots_view = memoryview(self._slots).cast("B").cast("q")
        self._trap = _c_void_p()
        self.deadline = deadline
        self._armed_until = 0.0  # until when the deadline armed last is good for the next call
        # Every call passes the same arguments: built once, as ctypes objects (see _untyped).
        self._deadline_args = (context, ctypes.c_uint64(deadline + REARM_MARGIN_TICKS))
        self._call_args = (
            context,
            _c_void_p(ctypes.addressof(self._func)),
            _c_void_p(ctypes.addressof(self._slots)),
            _c_size_t(count),
            ctypes.byref(self._trap),
        )

    def accel_args(self) -> tuple[int, int, int, int, object]:
        """What the accelerator's ``Export`` is made from (less the deadline): context, func, params, results, owner."""
        n_params = self._n_params
        return (int(self._context.value or 0), ctypes.addressof(self._func), n_params, self._n_results, self._func)

    def __call__(self, *args: int) -> int:
        """Call with i32 arguments, releasing the GIL while wasm runs; see :meth:`call`."""
        return self.call(False, *args)

    def call(self, hold_gil: bool, *args: int) -> int:
        """Call with i32 arguments; return the first result slot as an i64.

        The epoch deadline (the time limit, in ticks) is armed for the call,
        unless a call of this export armed it less than ``rearm_window`` ago: a
        deadline is an epoch count, and while the clock has not moved on (by
        more than ``REARM_MARGIN_TICKS``) the one armed then is as good as a new one.
        ``hold_gil``: keep the GIL while wasm runs, which saves releasing and
        retaking it (several µs a call); only when nothing else needs to run
        meanwhile (an inline call on the reactor thread) and the epoch clock
        ticks without the GIL (``engine.calls_may_hold_gil``), or a looping
        guest would never be stopped.
        """
        now = _monotonic()
        if now >= self._armed_until:
            _set_epoch_deadline_raw(*self._deadline_args)
            self._armed_until = now + rearm_window
        slots = self._slots_view
        index = 0
        for arg in args:
            slots[index] = arg
            index += 2
        trap = self._trap
        trap.value = None
        call = _func_call_raw_holding_gil if hold_gil else _func_call_raw
        error = call(*self._call_args)
        if error:
            raise _error_from(error)
        if trap.value:
            raise _trap_from(trap.value)
        return slots[0]


class NativeMemory:
    """Bounds-checked access to a guest's exported linear memory.

    The engine is made with ``memory_may_move = False`` (see ``engine.py``), so
    the memory's base address never changes, and a wasm memory never shrinks:
    the base and the last known size are kept, and the size is asked for again
    only when an access reaches past it (the guest may have grown its memory).
    Reads and writes go through a ``memoryview`` of the memory as it was last
    seen: a slice, no call into C through ctypes.
    """

    __slots__ = ("_base", "_context", "_memory", "_memory_address", "_size", "_view")
    #: Whether host calls must tell the memory their caller (see :class:`CallerMemory`).
    per_call = False

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory):
        self._context = _address(store._context())
        self._memory = memory._memory
        self._memory_address = ctypes.addressof(self._memory)
        self._base = int(_memory_data(self._context, self._memory_address) or 0)
        self._size = int(_memory_data_size(self._context, self._memory_address))
        self._view = self._make_view()

    def _make_view(self) -> memoryview:
        """The memory's first ``_size`` bytes, in place (the memory never moves, see above)."""
        if not self._size or not self._base:
            return memoryview(b"")
        return memoryview((_c_char * self._size).from_address(self._base)).cast("B")

    def size(self) -> int:
        size = int(_memory_data_size(self._context, self._memory_address))
        if size != self._size:
            self._size = size
            self._view = self._make_view()
        return size

    def holds(self, ptr: int, length: int) -> bool:
        """Whether ``length`` bytes at ``ptr`` (the guest's unsigned i32s) are inside the memory."""
        end = (ptr & 0xFFFFFFFF) + (length & 0xFFFFFFFF)
        return end <= self._size or end <= self.size()

    def _check(self, ptr: int, length: int) -> None:
        """Trap unless ``length`` bytes at ``ptr`` are inside the memory (as it is now)."""
        if ptr + length > self.size():
            raise HostTrap(f"out of bounds memory access: {length} bytes at {ptr}")

    def read(self, ptr: int, length: int) -> bytes:
        """``length`` bytes at ``ptr`` (both as the guest's unsigned i32)."""
        ptr &= 0xFFFFFFFF
        end = ptr + (length & 0xFFFFFFFF)
        if end > self._size:
            self._check(ptr, end - ptr)
        return self._view[ptr:end].tobytes()

    def write(self, ptr: int, data: bytes | bytearray) -> None:
        """Write ``data`` at ``ptr``; traps if any byte falls outside memory."""
        ptr &= 0xFFFFFFFF
        end = ptr + len(data)
        if end > self._size:
            self._check(ptr, end - ptr)
        self._view[ptr:end] = data


class CallerMemory(NativeMemory):
    """The calling instance's exported ``memory``, found through the host call's caller.

    While an instance is being created, its wasm ``start`` function may call the
    host before the instance (and so its memory) is handed to us: the memory is
    then looked up on every access from the ``wasmtime_caller_t`` of the host
    call in progress.  Slower than :class:`NativeMemory`; used only until the
    instance exists.
    """

    __slots__ = ("_extern", "caller")
    per_call = True

    def __init__(self) -> None:  # bound at each access, from the caller of the host call in progress
        #: The ``wasmtime_caller_t`` of the latest host call into this instance: valid only while
        #: that call runs (it is not cleared after, to keep host calls cheap; only they read it).
        self.caller: int | None = None

    def _bind(self) -> None:
        caller = self.caller
        if not caller:
            raise HostTrap("the guest's memory is not reachable outside a host call")
        extern = ffi.wasmtime_extern_t()
        found = _caller_export_get(caller, b"memory", 6, ctypes.addressof(extern))
        if not found or int(extern.kind) != _EXTERN_MEMORY:
            raise HostTrap("the guest does not export a memory named 'memory'")
        self._extern = extern  # the wasmtime_memory_t lives inside it
        self._context = _address(_caller_context(caller))
        self._memory_address = ctypes.addressof(extern.of.memory)
        self._base = int(_memory_data(self._context, self._memory_address) or 0)
        self._size = int(_memory_data_size(self._context, self._memory_address))
        self._view = self._make_view()

    def size(self) -> int:
        self._bind()
        return super().size()

    def holds(self, ptr: int, length: int) -> bool:
        self._bind()
        return super().holds(ptr, length)

    def read(self, ptr: int, length: int) -> bytes:
        self._bind()
        return super().read(ptr, length)

    def write(self, ptr: int, data: bytes | bytearray) -> None:
        self._bind()
        super().write(ptr, data)


def _address(pointer: Any) -> int:
    value = ctypes.cast(pointer, _c_void_p).value
    if not value:
        raise ValueError("null wasmtime pointer")
    return value


def set_epoch_deadline(store: wasmtime.Store, ticks: int) -> None:
    _set_epoch_deadline(ctypes.cast(store._context(), _c_void_p), ticks)


def increment_epoch(engine: wasmtime.Engine) -> None:
    _increment_epoch(ctypes.cast(engine.ptr(), _c_void_p))


def increment_epoch_address() -> int:
    """The address of ``wasmtime_engine_increment_epoch``, for a clock that calls it from C."""
    address = ctypes.cast(_dll.wasmtime_engine_increment_epoch, _c_void_p).value
    assert address
    return address
