"""Loading a guest: compile once, validate, and make initialised instances.

A :class:`Guest` is one guest binary with its options.  It knows wasmtime and
nothing of twisted.web; many resources may share it.  Each
:class:`GuestInstance` owns a store and runs one request at a time.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from twisted.logger import Logger
from twisted.logger import LogLevel as TwistedLogLevel
from twisted.python import threadable

from ..abi import HOST_FUNCTIONS, HOST_MODULE, WASI_MODULE, CtxNext, LogLevel, unpack_ctx_next
from . import accel as _accel
from . import engine as _engine
from . import native as _native
from .cache import CompileCache, default_cache_dir
from .calllog import DEFAULT_LOG_BYTES, DEFAULT_LOG_MESSAGES, CallLog, LogLimit, escape_log_text
from .calltrace import HostCallHook, traced
from .engine import ENGINE_SETTINGS, deadline_ticks, shared_engine
from .hostfuncs import IMPLEMENTATIONS, trap_reason
from .native import CallerMemory, GuestCallError, NativeFunc, NativeMemory
from .observe import NO_OBSERVER, GuestObserver
from .output import CapturedOutput
from .pool import GuestPool, GuestUnavailable
from .session import GuestSession
from .state import REQUEST_PHASE, RequestState

__all__ = [
    "DEFAULT_LOG_BYTES",
    "DEFAULT_LOG_MESSAGES",
    "DEFAULT_MAX_BUFFER_BYTES",
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_TIMEOUT",
    "Execution",
    "Guest",
    "GuestInstance",
    "GuestLoadError",
    "GuestTrap",
    "LogLimit",
    "Mount",
]

DEFAULT_TIMEOUT = 1.0
DEFAULT_MEMORY_LIMIT = 64 * 1024 * 1024
DEFAULT_MAX_BUFFER_BYTES = 16 * 1024 * 1024

_I32 = "i32"
_I64 = "i64"


class Execution(enum.Enum):
    """Where guest code runs: a worker thread (default) or the reactor thread."""

    THREAD = "thread"
    INLINE = "inline"


class GuestLoadError(Exception):
    """The guest cannot be used; the message says why.

    ``log_lines`` are what the guest logged (and wrote to WASI stdout/stderr)
    while its first instance was being initialised, as the log shows them: often
    the guest's own explanation of the failure.
    """

    def __init__(self, message: str, *, log_lines: Sequence[str] = ()):
        super().__init__(message)
        self.log_lines = tuple(log_lines)


class GuestTrap(Exception):
    """A guest call failed: trap, time limit, exit, or a refused host call.

    ``log_lines``: for a failed init, what the guest logged during it.
    """

    def __init__(self, reason: str, *, timed_out: bool = False, log_lines: Sequence[str] = ()):
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out
        self.log_lines = tuple(log_lines)


@dataclass(frozen=True)
class Mount:
    """A host directory the guest may see through WASI (opt-in)."""

    host_dir: str
    guest_dir: str
    read_only: bool = True


@dataclass(frozen=True)
class _ExportSpec:
    params: tuple[str, ...]
    results: tuple[str, ...]


_REQUIRED_FUNCTIONS = {
    "handle_request": _ExportSpec((), (_I64,)),
    "handle_response": _ExportSpec((_I32, _I32), ()),
}
#: Run in this order when an instance is made, each if exported, as Traefik (wazero) runs them: a WASI command's
#: ``_start`` (TinyGo), then a reactor's ``_initialize`` (Go ``wasmexport``); both when a module has both.
_INIT_FUNCTIONS = ("_start", "_initialize")


def _signature(ty: wasmtime.FuncType) -> str:
    params = " ".join(str(p) for p in ty.params)
    results = " ".join(str(r) for r in ty.results)
    return f"({params}) -> ({results})"


class Guest:
    """One compiled guest and its options; makes pooled instances.

    ``source`` is a path (``.wasm`` or ``.wat``) or the bytes of a binary or
    text module.  Loading compiles the guest, checks its imports and exports,
    and creates one instance eagerly, so that a broken guest is refused here,
    with :class:`GuestLoadError` naming the problem.

    Compiled code is cached on disk (``cache``: True for the default
    directory, a path, or False) so that a restart skips compilation.

    Guest log lines read ``[guest NAME] message`` in the namespace
    ``httpwasm.guest.NAME``.  Each guest call may log ``log_limit`` (messages,
    bytes; WASI output included); the rest is dropped and counted in one summary
    line.  Lines logged by a call running off the reactor thread reach
    ``reactor`` (the global one by default) in one ``callFromThread`` at the end
    of the call.

    ``sha256`` (hex), if given, must be the digest of the source's bytes (the
    file as it is on disk, or the bytes passed): a guest whose digest differs
    is refused, with both digests in the message.  ``self.sha256`` is the
    digest of what was loaded.  ``max_requests`` and ``max_age`` (seconds)
    recycle instances (see :class:`~twisted_httpwasm.runtime.pool.GuestPool`);
    off by default.  :meth:`retire` is for a guest that was replaced: its
    instances are freed once their last request ended.  ``on_host_call`` is
    told of every host function call (tests: ``twisted_httpwasm.testing``);
    without it host functions are linked with no trace at all.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | bytes,
        *,
        name: str | None = None,
        config: bytes = b"",
        log_level: LogLevel = LogLevel.INFO,
        execution: Execution = Execution.THREAD,
        timeout: float | None = DEFAULT_TIMEOUT,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        env: Sequence[tuple[str, str]] = (),
        mounts: Sequence[Mount] = (),
        cache: str | os.PathLike[str] | bool = True,
        log_limit: LogLimit = LogLimit(),
        reactor: Any = None,
        sha256: str | None = None,
        max_requests: int | None = None,
        max_age: float | None = None,
        on_host_call: HostCallHook | None = None,
    ):
        binary, default_name, digest = _read_source(source)
        self.name = name or default_name
        #: The sha256 (hex) of the guest's source bytes.
        self.sha256 = digest
        if sha256 is not None and sha256.strip().lower() != digest:
            raise GuestLoadError(
                f"guest {self.name!r} has sha256 {digest}, not the expected {sha256.strip().lower()}: refused"
            )
        self.config = bytes(config)
        self.log_level = LogLevel(log_level)
        self.execution = Execution(execution)
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.max_buffer_bytes = max_buffer_bytes
        self.env = tuple(env)
        self.mounts = tuple(mounts)
        #: Told of every host function call (``runtime.calltrace``); None (the default) costs nothing.
        self.on_host_call = on_host_call
        self.log = Logger(namespace=f"httpwasm.guest.{self.name}")
        #: Told how each request through this guest ended (metrics, traces); nothing by default.
        self.observer: GuestObserver = NO_OBSERVER
        self.log_limit = log_limit
        #: Guest log messages logged, and dropped over a call's log limit (read by metrics).
        self.log_messages = 0
        self.log_dropped = 0
        self._log_count_lock = threading.Lock()
        self._reactor = reactor
        self.engine = shared_engine()
        self.compile_cache: CompileCache | None = None
        if cache is not False:
            directory = default_cache_dir() if cache is True else Path(cache)
            self.compile_cache = CompileCache(directory, ENGINE_SETTINGS)
        try:
            if self.compile_cache is not None:
                self.module = self.compile_cache.load(self.engine, binary)
            else:
                self.module = wasmtime.Module(self.engine, binary)
        except wasmtime.WasmtimeError as error:
            raise GuestLoadError(f"guest {self.name!r} does not compile: {_first_line(error)}") from None
        self.uses_wasi = self._check_imports()
        self._check_exports()
        self._linker, self._callbacks = self._make_linker()
        try:
            self._pre = self._linker.instantiate_pre(self.module)
        except wasmtime.WasmtimeError as error:
            raise GuestLoadError(f"guest {self.name!r} cannot be linked: {_first_line(error)}") from None
        self._deadline = deadline_ticks(timeout) if timeout is not None else 2**62
        self.pool = GuestPool(self._new_instance, max_requests=max_requests, max_age=max_age, on_event=self._pool_event)
        try:
            first = self.pool.acquire(for_request=False)
        except GuestUnavailable as error:
            cause = error.__cause__
            reason = cause.reason if isinstance(cause, GuestTrap) else _first_line(cause or error)
            lines = cause.log_lines if isinstance(cause, GuestTrap) else ()
            raise GuestLoadError(f"guest {self.name!r} failed to initialise: {reason}", log_lines=lines) from None
        #: The features the guest enabled when it initialised (``enable_features`` in ``_initialize`` or
        #: ``_start``): every request of every instance starts with them.
        self.features: int = first.features
        self.pool.release(first)

    @classmethod
    def load(cls, source: str | os.PathLike[str] | bytes, **options: object) -> Guest:
        """Same as ``Guest(source, **options)``; reads well at call sites."""
        return cls(source, **options)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<Guest {self.name!r} execution={self.execution.value}>"

    # -- loading ----------------------------------------------------------------

    def _check_imports(self) -> bool:
        expected = {spec.name: spec for spec in HOST_FUNCTIONS}
        uses_wasi = False
        #: Whether the guest imports a WASI call that writes (else its stdout and stderr are not captured).
        self.writes_output = any(
            item.module == WASI_MODULE and item.name in ("fd_write", "fd_pwrite") for item in self.module.imports
        )
        #: The http_handler functions the guest imports (the accelerator snapshots only what they read).
        self.host_imports: frozenset[str] = frozenset(
            item.name or "" for item in self.module.imports if item.module == HOST_MODULE
        )
        #: Whether a guest call may read the request body: through read_body, or to check its size once
        #: enable_features asked for buffer_request (a guest without either never touches it).
        self.may_read_request_body = not self.host_imports.isdisjoint(("read_body", "enable_features"))
        for item in self.module.imports:
            where = f"{item.module}.{item.name}"
            if item.module == WASI_MODULE:
                uses_wasi = True
                continue
            if item.module != HOST_MODULE:
                raise GuestLoadError(f"guest {self.name!r} imports {where}, which this host does not provide")
            spec = expected.get(item.name or "")
            if spec is None:
                raise GuestLoadError(f"guest {self.name!r} imports {where}, which is not an http_handler function")
            ty = item.type
            want = spec.signature
            if not isinstance(ty, wasmtime.FuncType) or _signature(ty) != want:
                got = _signature(ty) if isinstance(ty, wasmtime.FuncType) else type(ty).__name__
                raise GuestLoadError(f"guest {self.name!r} imports {where} as {got}; the ABI says {want}")
        return uses_wasi

    def _check_exports(self) -> None:
        exports = {item.name: item.type for item in self.module.exports}
        if not isinstance(exports.get("memory"), wasmtime.MemoryType):
            raise GuestLoadError(f"guest {self.name!r} does not export a memory named 'memory'")
        for name, spec in _REQUIRED_FUNCTIONS.items():
            ty = exports.get(name)
            want = f"({' '.join(spec.params)}) -> ({' '.join(spec.results)})"
            if ty is None:
                raise GuestLoadError(f"guest {self.name!r} does not export {name} {want}")
            if not isinstance(ty, wasmtime.FuncType) or _signature(ty) != want:
                got = _signature(ty) if isinstance(ty, wasmtime.FuncType) else type(ty).__name__
                raise GuestLoadError(f"guest {self.name!r} exports {name} as {got}; the ABI says {want}")
        for name in _INIT_FUNCTIONS:
            ty = exports.get(name)
            if ty is not None and (not isinstance(ty, wasmtime.FuncType) or _signature(ty) != "() -> ()"):
                raise GuestLoadError(f"guest {self.name!r} exports {name} with the wrong type; it must be () -> ()")

    def _make_linker(self) -> tuple[wasmtime.Linker, list[object]]:
        linker = wasmtime.Linker(self.engine)
        #: The compiled accelerator this guest's calls go through, or None (decided once, at load).  A traced
        #: guest (``on_host_call``) is not accelerated: what C answers would not reach the trace.
        self.accelerated: Any = _accel.module if self.on_host_call is None else None
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        callbacks: list[object] = []
        for spec in HOST_FUNCTIONS:
            results = [] if spec.result is None else [i32 if spec.result == _I32 else i64]
            implementation = IMPLEMENTATIONS[spec.name]
            if self.on_host_call is not None:  # the one place a call trace is hooked in (see calltrace)
                implementation = traced(spec.name, implementation, self.on_host_call)
            callbacks.append(
                _native.define_host_function(
                    linker,
                    HOST_MODULE,
                    spec.name,
                    [i32] * spec.params,
                    results,
                    implementation,
                    trap_reason,
                    self._host_error,
                    None if self.accelerated is None else (self.accelerated, _accel.HOST_IDS[spec.name]),
                )
            )
        if self.uses_wasi:
            linker.define_wasi()
        return linker, callbacks

    def _host_error(self, error: BaseException) -> None:
        self.log.error("internal error in a host function: {error!r}", error=error)

    def _wasi_config(self) -> wasmtime.WasiConfig:
        wasi = wasmtime.WasiConfig()
        if self.env:
            wasi.env = [list(pair) for pair in self.env]
        for mount in self.mounts:
            wasi.preopen_dir(mount.host_dir, mount.guest_dir, fs_mutable=not mount.read_only)
        return wasi

    def session(self, state: RequestState, *, inline: bool = False) -> GuestSession:
        """The guest calls of one request, on one instance pinned from ``handle_request`` to ``handle_response``.

        ``inline``: the calls are made on the reactor thread, which has nothing
        else to run meanwhile, so they may keep the GIL (see ``NativeFunc.call``).
        """
        module = self.accelerated
        if module is not None:  # the same session in C, whose calls go through the fast call (_accel.c)
            if inline:
                state.inline = True
            session: GuestSession = module.Session(self.pool, state, inline, self)
            return session
        return GuestSession(self.pool, state, inline)

    def idle_memory_bytes(self) -> int:
        """The linear memory of the idle instances (the ones in use are busy in their call)."""
        return self.pool.sum_idle(_memory_size)

    def retire(self) -> None:
        """This guest was replaced: drop its idle instances now, the others when their requests end."""
        self.pool.retire()

    def _pool_event(self, level: str, message: str) -> None:
        """What the pool tells operators (failed creations, recovery), logged on the reactor thread."""
        twisted_level = TwistedLogLevel.error if level == "error" else TwistedLogLevel.info
        if threadable.ioThread is None or threadable.isInIOThread():
            self.log.emit(twisted_level, "guest {guest}: {what}", guest=self.name, what=message)
        else:
            self.reactor.callFromThread(
                self.log.emit, twisted_level, "guest {guest}: {what}", guest=self.name, what=message
            )

    # -- instances ---------------------------------------------------------------

    def _new_instance(self) -> GuestInstance:
        with _engine.clock_for_instance():  # start functions have a time limit, even before serving
            return GuestInstance(self)

    @property
    def reactor(self) -> Any:
        """The reactor that guest log lines are handed to (the global one unless given)."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @reactor.setter
    def reactor(self, reactor: Any) -> None:
        self._reactor = reactor

    def emit(self, level: LogLevel, message: str) -> None:
        """Log a guest message at ``level``.

        During a call of this guest on this thread the line joins the call's
        batch, logged when the call ends; otherwise it is logged at once (on the
        reactor thread, or handed to it).
        """
        running = _native.current.target
        if isinstance(running, GuestInstance) and running.guest is self:
            running.call_log.lines.append((level, message))
        else:
            self.hand_over([(level, message)], None)

    def hand_over(self, lines: list[tuple[LogLevel, str]], summary: str | None) -> None:
        """Log ``lines`` and ``summary`` on the reactor thread: at once there, else in one ``callFromThread``.

        Before any reactor ran there is no reactor thread to hand them to: they are logged at once.
        """
        if not lines and summary is None:
            return
        if threadable.ioThread is None or threadable.isInIOThread():
            self._write(lines, summary)
        else:
            self.reactor.callFromThread(self._write, lines, summary)

    def _write(self, lines: list[tuple[LogLevel, str]], summary: str | None) -> None:
        log = self.log
        self.log_messages += len(lines)
        for level, text in lines:
            # text: as the guest wrote it (a JSON log keeps it so); escaped_text: one line of a text log.
            log.emit(
                _TWISTED_LEVELS[level], _GUEST_LINE, guest=self.name, text=text, escaped_text=escape_log_text(text)
            )
        if summary is not None:
            log.warn("{summary}", summary=summary)


_GUEST_LINE = "[guest {guest}] {escaped_text}"
_TWISTED_LEVELS = {
    LogLevel.DEBUG: TwistedLogLevel.debug,
    LogLevel.INFO: TwistedLogLevel.info,
    LogLevel.WARN: TwistedLogLevel.warn,
    LogLevel.ERROR: TwistedLogLevel.error,
}


class GuestInstance:
    """One initialised instance of a guest, with its own store.

    Not thread-safe: the pool lends it to one request at a time.  ``state``
    is that request's :class:`RequestState`, or None between requests.
    """

    def __init__(self, guest: Guest):
        self.guest = guest
        self.config = guest.config
        self.log_level = guest.log_level
        self.features = 0  # set by enable_features during init: applies to every request
        self.state: RequestState | None = None
        self.trapped = False
        #: The compiled accelerator's context for this instance's calls (None: the pure path serves).
        self.accel: Any = None
        self.call_log = CallLog(guest.log_limit)
        # Until the instance exists, host calls from its wasm start function reach memory through their caller.
        self.memory: NativeMemory = CallerMemory()
        store = wasmtime.Store(guest.engine)
        store.set_limits(memory_size=guest.memory_limit)
        self._outputs: tuple[CapturedOutput, ...] = ()
        if guest.uses_wasi:
            wasi = guest._wasi_config()
            if guest.writes_output:  # a guest that cannot write costs no files, and no check after each call
                self._outputs = (CapturedOutput("stdout"), CapturedOutput("stderr"))
                for output in self._outputs:
                    output.attach(wasi)
            store.set_wasi(wasi)
        self._store = store
        _native.set_epoch_deadline(store, guest._deadline)
        previous = _native.current.target
        _native.current.target = self
        try:
            self._initialise(store)
        except GuestTrap as trap:
            # The guest's own explanation often is in what it logged: it goes with the error.
            self._log_output(final=True)
            lines, summary = self.call_log.take(guest.name, "during init")
            guest.hand_over(lines, summary)
            trap.log_lines = tuple(
                _GUEST_LINE.format(guest=guest.name, escaped_text=escape_log_text(text)) for _, text in lines
            )
            trap.log_lines += (summary,) if summary is not None else ()
            raise
        finally:
            _native.current.target = previous
        guest.hand_over(*self.call_log.take(guest.name, "during init"))

    def _initialise(self, store: wasmtime.Store) -> None:
        """Instantiate (running the wasm start function), then run ``_start`` and ``_initialize`` if exported.

        ``proc_exit(0)`` in either ends it cleanly (TinyGo 0.35+ commands end ``_start`` so): the instance
        stays usable, and ``_initialize`` still runs after ``_start``.
        """
        try:
            try:
                instance = self.guest._pre.instantiate(store)
            except (wasmtime.WasmtimeError, wasmtime.Trap) as error:
                raise GuestTrap(f"instantiation failed: {_first_line(error)}") from None
            exports = instance.exports(store)
            memory = exports["memory"]
            assert isinstance(memory, wasmtime.Memory)
            self.memory = NativeMemory(store, memory)
            self._handle_request = self._export(exports, "handle_request", 0, 1)
            self._handle_response = self._export(exports, "handle_response", 2, 0)
            for name in _INIT_FUNCTIONS:
                if name in exports:
                    self._run_init(self._export(exports, name, 0, 0), name)
            if self.guest.accelerated is not None:
                self._accelerate(store)  # after init, which runs on NativeFunc with the epoch deadline's own trap
        finally:
            self._log_output()

    def _export(self, exports: Any, name: str, n_params: int, n_results: int) -> NativeFunc:
        func = exports[name]
        assert isinstance(func, wasmtime.Func)
        return NativeFunc(self._store, func, n_params, n_results, self.guest._deadline)

    def _accelerate(self, store: wasmtime.Store) -> None:
        """Make the accelerator's context and exports (see ``accel.py``); the init functions stay on ``NativeFunc``."""
        module = self.guest.accelerated
        imports = self.guest.host_imports
        memory = self.memory
        log_limit = self.call_log.limit
        self.accel = module.Context(
            memory._context,
            memory._memory_address,
            memory,  # kept alive by the context: its wasmtime_memory_t is what the address points into
            self.config,
            self.call_log,
            log_limit.messages,
            log_limit.bytes,
            sum(1 << _accel.HOST_IDS[name] for name in imports),  # what the snapshot must hold
        )
        timeout = self.guest.timeout
        seconds = float("inf") if timeout is None else timeout
        for native in (self._handle_request, self._handle_response):
            context, func, n_params, n_results, owner = native.accel_args()
            native.accelerated = module.Export(context, func, n_params, n_results, seconds, owner)
        if not self._outputs:  # the session's calls may skip _call (see _finish_fast_call)
            self.accel.prepare_fast(self._handle_request.accelerated, self._handle_response.accelerated)
        # From now on the store's epoch deadlines go to the accelerator, which ends calls past their limit
        # and, in thread mode, releases the GIL at a call's first tick (see _accel.c, on_deadline).
        module.install_time_limit(ctypes.cast(store.ptr(), ctypes.c_void_p).value)

    def _run_init(self, init: NativeFunc, name: str) -> None:
        try:
            init()
        except GuestCallError as error:
            if error.exit_code == 0:
                return  # a WASI command that ends _start with proc_exit(0) initialised fine
            raise GuestTrap(f"{name} failed: {error}", timed_out=error.interrupted) from None

    def log(self, level: LogLevel, message: str) -> None:
        self.guest.emit(level, message)

    def log_room(self, length: int) -> int:
        """How many bytes of a ``length``-byte message the call's log budget lets through; -1 to drop it."""
        return self.call_log.room(length)

    def _call(self, function: NativeFunc, state: RequestState, inline: bool, *args: int) -> int:
        if not _engine.serving:  # the first call in this process (after a fork too) starts the clock
            _engine.serve_time_limits()
        # Guest calls never nest on one thread (no host function calls a guest, and an instance is
        # made before its request's call, not during it): the target is None before and after.
        current = _native.current
        current.target = self
        self.state = state
        failed: str | None = None
        observed = self.guest.observer is not NO_OBSERVER  # the call's times are for observers only
        started = time.monotonic() if observed else 0.0
        accel = self.accel
        try:
            if accel is not None:
                # The GIL: kept while wasm runs inline (1), kept until the call's first tick in thread mode
                # (2), released throughout (0) unless the epoch clock ticks without it.
                gil = (1 if inline else 2) if _engine.calls_may_hold_gil else 0
                result: int = accel.call(function.accelerated, gil, self, state, *args)
                return result
            return function.call(inline and _engine.calls_may_hold_gil, *args)
        except GuestCallError as error:
            failed = "timeout" if error.interrupted else "trap"
            self._failed(error, state)
            raise  # not reached: _failed raises the GuestTrap
        finally:
            if accel is not None and accel.pending:  # what the guest changed, recorded in C
                _accel.apply(self)
            if observed:
                state.calls.append((state.phase, started, time.monotonic(), failed))
            self.state = None
            current.target = None
            if self._outputs:
                self._log_output()
            call_log = self.call_log
            if call_log.lines or call_log.messages or call_log.dropped:  # the call logged, or had lines dropped
                self._hand_over_log(state)

    def _failed(self, error: GuestCallError, state: RequestState) -> None:
        """A call failed: the instance is never lent again, and the reason goes into a :class:`GuestTrap`."""
        self.trapped = True
        reason = state.trap_reason or str(error)
        if error.interrupted:
            reason = f"guest exceeded its time limit of {self.guest.timeout} s"
        elif error.exit_code is not None:
            reason = f"guest called proc_exit({error.exit_code}) during {state.phase.value}"
        state.trap_reason = reason
        raise GuestTrap(reason, timed_out=error.interrupted) from None

    def _finish_fast_call(self, state: RequestState, error: BaseException | None) -> None:
        """What :meth:`_call` does after an accelerated call, for the compiled fast call (``_accel.call_request``).

        The fast call made no Python call unless something needed it: it calls ``_end_fast_call``
        when the guest failed, when C recorded something to apply, or when Python answered a host
        function.  That is C (``_accel.end_fast_call``) for the common case, a call that succeeded
        and left only features or response headers to apply, and this method otherwise.  The fast
        call only serves while nothing observes calls and the guest captures no output, so neither
        has anything to do here.
        """
        current = _native.current
        current.target = self  # as during the call: the lines applied now join the call's batch
        try:
            if isinstance(error, GuestCallError):
                self._failed(error, state)
            if error is not None:
                raise error
        finally:
            if self.accel.pending:
                _accel.apply(self)
            self.state = None
            current.target = None
            call_log = self.call_log
            if call_log.lines or call_log.messages or call_log.dropped:
                self._hand_over_log(state)

    #: What the fast call calls after a call Python must see: :meth:`_finish_fast_call`, done in C for the
    #: common case where the accelerator is built (a method descriptor, so that it binds like a method).
    _end_fast_call = _accel.end_fast_call if _accel.end_fast_call is not None else _finish_fast_call

    def _hand_over_log(self, state: RequestState) -> None:
        """The call's log lines, and the count of those dropped, to the reactor in one go."""
        method = state.method.decode("latin-1")[:32]
        uri = state.uri.decode("latin-1")
        if len(uri) > 200:
            uri = uri[:200] + "..."
        dropped = self.call_log.dropped
        if dropped:
            guest = self.guest
            with guest._log_count_lock:  # instances of one guest may run in several threads
                guest.log_dropped += dropped
        lines, summary = self.call_log.take(self.guest.name, f"in {state.phase.value} for {method} {uri}")
        self.guest.hand_over(lines, summary)

    def _log_output(self, final: bool = False) -> None:
        """Log what the guest wrote to WASI stdout/stderr during the last call (``final``: and a last unended line)."""
        guest = self.guest
        call_log = self.call_log
        for output in self._outputs:
            level = LogLevel.INFO if output.stream == "stdout" else LogLevel.WARN
            lines = output.lines(final)
            if level >= guest.log_level:
                for line in lines:
                    # Counted against the call's log budget, like the guest's own log calls.
                    room = call_log.room(len(line))
                    if room >= 0:
                        guest.emit(level, f"[{output.stream}] {line[:room]}")
            if output.exhausted and not self.trapped:
                # Retired like a trapped instance: the pool makes a fresh one, with fresh files.
                self.trapped = True
                guest.emit(LogLevel.WARN, f"[{output.stream}] output limit reached; the instance is retired")

    def handle_request(self, state: RequestState, inline: bool = False) -> CtxNext:
        """Run ``handle_request`` for ``state``; raises :class:`GuestTrap`.

        ``inline``: called on the reactor thread (see :meth:`Guest.session`).
        """
        return unpack_ctx_next(self.request_call(state, inline))

    def request_call(self, state: RequestState, inline: bool = False) -> int:
        """Run ``handle_request`` for ``state``; its raw i64 result (see ``abi.unpack_ctx_next``)."""
        state.features |= self.features
        state.phase = REQUEST_PHASE
        return self._call(self._handle_request, state, inline)

    def handle_response(self, state: RequestState, req_ctx: int, is_error: bool, inline: bool = False) -> None:
        """Run ``handle_response``; ``state`` must be in the response phase."""
        req_ctx &= 0xFFFFFFFF
        if req_ctx & 0x80000000:
            req_ctx -= 1 << 32
        self._call(self._handle_response, state, inline, req_ctx, 1 if is_error else 0)


def _memory_size(instance: GuestInstance) -> int:
    return instance.memory.size()


def _read_source(source: str | os.PathLike[str] | bytes) -> tuple[bytes, str, str]:
    """The wasm binary of ``source``, its default name, and the sha256 (hex) of its bytes as given."""
    data: bytes
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        name = "guest"
    else:
        path = Path(source)
        name = path.stem
        try:
            data = path.read_bytes()
        except OSError as error:
            raise GuestLoadError(f"cannot read guest {str(path)!r}: {error.strerror or error}") from None
    digest = hashlib.sha256(data).hexdigest()
    if not data.startswith(b"\0asm"):
        try:
            data = bytes(wasmtime.wat2wasm(data.decode("utf-8")))
        except UnicodeDecodeError as error:
            raise GuestLoadError(f"guest {name!r} is neither a wasm binary nor valid WAT: {error}") from None
        except wasmtime.WasmtimeError as error:
            where = None if isinstance(source, bytes | bytearray | memoryview) else str(source)
            raise GuestLoadError(
                f"guest {name!r} is neither a wasm binary nor valid WAT: {_wat_error(error, where)}"
            ) from None
    return data, name, digest


_WAT_POSITION = re.compile(r"^\s*--> [^\n]*?:(\d+):(\d+)\s*$")


def _wat_error(error: BaseException, where: str | None) -> str:
    """wasmtime's WAT error with its position (``reason at FILE:LINE:COLUMN``), then the line and a caret."""
    lines = str(error).rstrip().splitlines()
    for index, line in enumerate(lines):
        match = _WAT_POSITION.match(line)
        if match:
            reason = " ".join(part.strip() for part in lines[:index] if part.strip())
            snippet = [part for part in lines[index + 1 :] if part.strip() != "|"]
            position = f"{where}:{match[1]}:{match[2]}" if where else f"line {match[1]}, column {match[2]}"
            return "\n".join([f"{reason} at {position}", *snippet])
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Caused by:" in lines:
        rest = lines[lines.index("Caused by:") + 1 :]
        if rest:
            return " / ".join([lines[0], *rest])
    return lines[0] if lines else type(error).__name__
