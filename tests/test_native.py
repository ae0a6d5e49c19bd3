"""The C-API fast path (``_native``) against wasmtime-py's public API, on the same guests.

The host calls guests and serves host functions through wasmtime's unchecked
C entry points.  Here the very same host functions are also served through
wasmtime-py's public ``Linker.define_func``/``Func.__call__``, and both hosts
must leave guest memory, results and request state identical.
"""

from __future__ import annotations

from typing import Any

import wasmtime
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm.abi import HOST_FUNCTIONS, HOST_MODULE, LogLevel
from twisted_httpwasm.runtime import accel, engine, native
from twisted_httpwasm.runtime.guest import Guest, GuestTrap
from twisted_httpwasm.runtime.hostfuncs import IMPLEMENTATIONS, HostImplementation, trap_reason
from twisted_httpwasm.runtime.native import HostTrap
from twisted_httpwasm.runtime.state import RequestState

from .support import NOOP_RESPONSE, make_guest, module, request_state

#: Calls most host functions and keeps every result in memory at 2048.. (8 bytes each).
BUSY_GUEST = """
  (data (i32.const 0) "x-native")
  (data (i32.const 16) "fast path")
  (data (i32.const 32) "/rewritten?a=1")
  (data (i32.const 48) "host")
  (data (i32.const 64) "PUT")
  (func $keep (param $slot i32) (param $value i64)
    (i64.store (i32.add (i32.const 2048) (i32.shl (local.get $slot) (i32.const 3))) (local.get $value)))
  (func (export "handle_request") (result i64)
    (call $keep (i32.const 0) (i64.extend_i32_u (call $get_method (i32.const 256) (i32.const 16))))
    (call $keep (i32.const 1) (i64.extend_i32_u (call $get_uri (i32.const 272) (i32.const 64))))
    (call $keep (i32.const 2) (i64.extend_i32_u (call $get_protocol_version (i32.const 336) (i32.const 16))))
    (call $keep (i32.const 3) (i64.extend_i32_u (call $get_source_addr (i32.const 352) (i32.const 32))))
    (call $keep (i32.const 4) (call $get_header_names (i32.const 0) (i32.const 384) (i32.const 128)))
    (call $keep (i32.const 5)
      (call $get_header_values (i32.const 0) (i32.const 48) (i32.const 4) (i32.const 512) (i32.const 64)))
    (call $keep (i32.const 6) (call $read_body (i32.const 0) (i32.const 576) (i32.const 5)))
    (call $keep (i32.const 7) (call $read_body (i32.const 0) (i32.const 581) (i32.const 64)))
    (call $keep (i32.const 8) (i64.extend_i32_u (call $get_config (i32.const 660) (i32.const 32))))
    (call $keep (i32.const 9) (i64.extend_i32_u (call $enable_features (i32.const 2))))
    (call $keep (i32.const 10) (i64.extend_i32_u (call $log_enabled (i32.const -1))))
    (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 8) (i32.const 16) (i32.const 9))
    (call $add_header_value (i32.const 1) (i32.const 0) (i32.const 8) (i32.const 48) (i32.const 4))
    (call $remove_header (i32.const 0) (i32.const 48) (i32.const 4))
    (call $set_uri (i32.const 32) (i32.const 14))
    (call $set_method (i32.const 64) (i32.const 3))
    (call $write_body (i32.const 1) (i32.const 16) (i32.const 9))
    (call $write_body (i32.const 1) (i32.const 0) (i32.const 8))
    (call $set_status_code (i32.const 202))
    (call $keep (i32.const 11) (i64.extend_i32_u (call $get_status_code)))
    (i64.const 0x0000002a00000001))
  (func (export "handle_response") (param $ctx i32) (param $error i32)
    (call $keep (i32.const 12) (i64.extend_i32_u (local.get $ctx)))
    (call $keep (i32.const 13) (call $read_body (i32.const 1) (i32.const 700) (i32.const 64)))
    (call $write_body (i32.const 1) (i32.const 48) (i32.const 4))
    (call $set_status_code (i32.const 203)))
"""

#: A guest whose host call is out of bounds: both hosts must trap it.
TRAPPING_GUEST = """
  (func (export "handle_request") (result i64)
    (drop (call $get_uri (i32.const 65530) (i32.const 100)))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""


class _PublicMemory:
    """The HostContext memory interface over wasmtime-py's public Memory API."""

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory):
        self._store = store
        self._memory = memory

    def size(self) -> int:
        return self._memory.data_len(self._store)

    def holds(self, ptr: int, length: int) -> bool:
        return (ptr & 0xFFFFFFFF) + (length & 0xFFFFFFFF) <= self.size()

    def read(self, ptr: int, length: int) -> bytes:
        ptr &= 0xFFFFFFFF
        length &= 0xFFFFFFFF
        if ptr + length > self.size():
            raise HostTrap(f"out of bounds memory access: {length} bytes at {ptr}")
        return bytes(self._memory.read(self._store, ptr, ptr + length))

    def write(self, ptr: int, data: bytes) -> None:
        ptr &= 0xFFFFFFFF
        if ptr + len(data) > self.size():
            raise HostTrap(f"out of bounds memory access: {len(data)} bytes at {ptr}")
        self._memory.write(self._store, data, ptr)


class PublicApiHost:
    """The same host functions, served through wasmtime-py's public API only."""

    def __init__(self, wat: bytes, config: bytes = b""):
        engine = wasmtime.Engine()
        self.store = wasmtime.Store(engine)
        linker = wasmtime.Linker(engine)
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        for spec in HOST_FUNCTIONS:
            results = [] if spec.result is None else [i32 if spec.result == "i32" else i64]
            linker.define_func(
                HOST_MODULE,
                spec.name,
                wasmtime.FuncType([i32] * spec.params, results),
                lambda *args, _name=spec.name: self._serve(_name, IMPLEMENTATIONS[_name], args),
            )
        self.instance = linker.instantiate(self.store, wasmtime.Module(engine, wat))
        exports = self.instance.exports(self.store)
        self._memory = exports["memory"]
        self.memory = _PublicMemory(self.store, self._memory)
        self.state: RequestState | None = None
        self.features = 0
        self.config = config
        self.log_level = LogLevel.DEBUG
        self.logged: list[tuple[LogLevel, str]] = []

    def _serve(self, name: str, function: HostImplementation, args: tuple[int, ...]) -> int | None:
        """One host call, its trap named as the fast path names it."""
        try:
            return function(self, *args)
        except HostTrap as trap:
            raise HostTrap(trap_reason(self, name, trap)) from None

    def log(self, level: LogLevel, message: str) -> None:
        self.logged.append((level, message))

    def log_room(self, length: int) -> int:
        return length  # no log budget here

    def call(self, name: str, state: RequestState, *args: int) -> Any:
        self.state = state
        try:
            return self.instance.exports(self.store)[name](self.store, *args)
        finally:
            self.state = None

    def dump(self) -> bytes:
        return bytes(self._memory.read(self.store, 0, 4096))


def _state() -> RequestState:
    return request_state(
        method=b"POST",
        uri=b"/a%20b?x=1&y=%26",
        headers=[(b"Host", b"example"), (b"X-Multi", b"1"), (b"x-multi", b"2")],
        body=b"0123456789abcdef",
    )


def _summary(state: RequestState) -> tuple[Any, ...]:
    return (
        state.method,
        state.uri,
        state.status,
        state.features,
        state.request_headers.items(),
        state.response_headers.items(),
        bytes(state.response_body or b""),
        state.request_reader.consumed,
    )


class FastPathMatchesPublicApiTests(SynchronousTestCase):
    def test_both_hosts_leave_identical_memory_results_and_state(self):
        """One full request/response through both hosts: same results, memory and state."""
        wat = module(BUSY_GUEST)
        config = b"\x00config\xff"

        public = PublicApiHost(wat, config)
        public_state = _state()
        public_ctx = public.call("handle_request", public_state)
        public_state.enter_response_phase(200, [(b"content-type", b"text/plain")], b"downstream body")
        public.call("handle_response", public_state, 42, 0)

        guest = Guest(wat, config=config, log_level=LogLevel.DEBUG, cache=False)
        instance = guest.pool.acquire()
        fast_state = _state()
        fast_ctx = instance.handle_request(fast_state)
        fast_state.enter_response_phase(200, [(b"content-type", b"text/plain")], b"downstream body")
        instance.handle_response(fast_state, fast_ctx.req_ctx, False)

        self.assertEqual((fast_ctx.next, fast_ctx.req_ctx), (public_ctx & 1 == 1, public_ctx >> 32))
        self.assertEqual(instance.memory.read(0, 4096), public.dump())
        self.assertEqual(_summary(fast_state), _summary(public_state))
        # The comparison is not vacuous: the guest really changed things.
        self.assertEqual(fast_state.status, 203)
        self.assertEqual(fast_state.uri, b"/rewritten?a=1")
        self.assertEqual(bytes(fast_state.response_body or b""), b"host")

    def test_both_hosts_trap_the_same_out_of_bounds_call(self):
        """An out-of-bounds host call traps in both hosts, with the same reason."""
        wat = module(TRAPPING_GUEST)
        public = PublicApiHost(wat)
        public_state = _state()
        with self.assertRaises(HostTrap):
            public.call("handle_request", public_state)

        instance = Guest(wat, cache=False).pool.acquire()
        fast_state = _state()
        with self.assertRaises(GuestTrap) as caught:
            instance.handle_request(fast_state)
        self.assertEqual(caught.exception.reason, public_state.trap_reason)
        self.assertIn("get_uri", caught.exception.reason)


#: Grows its memory by one page, has the host write the URI into the new page, then copies it into
#: a response header; reads 8 bytes past the grown memory's end when the URI is "/past-the-end".
GROWING_GUEST = """
  (data (i32.const 0) "x-uri")
  (func (export "handle_request") (result i64)
    (local $len i32)
    (drop (memory.grow (i32.const 1)))
    (local.set $len (call $get_uri (i32.const 65540) (i32.const 1024)))
    (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 5) (i32.const 65540) (local.get $len))
    (if (i32.eq (i32.load8_u (i32.const 65541)) (i32.const 112))  ;; "/p..."
      (then (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 5) (i32.const 131068) (i32.const 8))))
    (i64.const 0))
  (func (export "handle_response") (param i32 i32))
"""


class GrownMemoryTests(SynchronousTestCase):
    """The host keeps a memory's base and last known size; a guest that grows its memory is seen."""

    def test_host_reaches_a_page_the_guest_grew_during_the_call(self) -> None:
        """Written by the host into the new page and read back from it, both within one call."""
        guest = Guest(module(GROWING_GUEST), cache=False)
        self.addCleanup(guest.pool.clear)
        state = request_state(uri=b"/grown")
        guest.pool.acquire().handle_request(state)
        self.assertEqual(state.response_headers.values(b"x-uri"), [b"/grown"])

    def test_past_the_grown_end_still_traps(self) -> None:
        """Bounds follow the memory as it is now: 8 bytes from 4 before the end of two pages trap."""
        guest = Guest(module(GROWING_GUEST), cache=False)
        self.addCleanup(guest.pool.clear)
        with self.assertRaises(GuestTrap) as caught:
            guest.pool.acquire().handle_request(request_state(uri=b"/past-the-end"))
        self.assertIn("out of bounds memory access: 8 bytes at 131068", caught.exception.reason)


class DeadlineArmingTests(SynchronousTestCase):
    """A guest call arms its epoch deadline, unless a call of the same export armed it within ``rearm_window``."""

    def setUp(self) -> None:
        # The pure path's NativeFunc is what these patch; the accelerator's twin arms in C (the serving-clock
        # script of test_engine shows its calls still get their whole limit).
        self.patch(accel, "module", None)
        if not engine.serving:
            engine.serve_time_limits()  # as the first guest call would: it sets the window, which the tests patch
        self.now = [100.0]
        self.armed: list[tuple[Any, ...]] = []
        real = native._set_epoch_deadline_raw

        def arm(*args: Any) -> None:
            self.armed.append(args)
            real(*args)

        self.patch(native, "_monotonic", lambda: self.now[0])
        self.patch(native, "_set_epoch_deadline_raw", arm)
        guest = make_guest('(func (export "handle_request") (result i64) (i64.const 1))', NOOP_RESPONSE, timeout=0.5)
        self.instance = guest.pool.acquire()
        self.state = request_state(uri=b"/")

    def call(self, times: int = 1) -> None:
        for _ in range(times):
            self.instance.handle_request(self.state)

    def test_every_call_arms_without_a_window(self) -> None:
        """The Python clock (window 0) catches up in bursts: each call arms a deadline of its own."""
        self.patch(native, "rearm_window", 0.0)
        self.call(3)
        self.assertEqual(len(self.armed), 3)

    def test_calls_within_the_window_reuse_the_deadline(self) -> None:
        """With the timer clock's window of a tick, the calls of one tick arm once; the next tick arms again."""
        self.patch(native, "rearm_window", engine.EPOCH_INTERVAL)
        self.call(50)
        self.assertEqual(len(self.armed), 1)
        self.now[0] += engine.EPOCH_INTERVAL * 0.99
        self.call()
        self.assertEqual(len(self.armed), 1)
        self.now[0] += engine.EPOCH_INTERVAL * 0.02
        self.call()
        self.assertEqual(len(self.armed), 2)

    def test_a_reused_deadline_covers_the_ticks_that_may_pass_meanwhile(self) -> None:
        """The deadline is the call's limit in ticks plus the margin, so a reused one still gives the whole limit."""
        self.call()
        ticks = self.armed[0][1].value
        self.assertEqual(ticks, engine.deadline_ticks(0.5) + native.REARM_MARGIN_TICKS)
