"""Hostile guests and clients, end-to-end over real sockets, in both execution modes.

One WAT guest holds every hostile behaviour, chosen by the request path: bad
pointers and lengths, ``buf_limit=0``, WASI ``proc_exit``, endless loops and
recursion, memory exhaustion, plain traps, each in ``handle_request`` or (with
a buffered response) in ``handle_response``.  Every hostile request must fail
cleanly (a 500 with the generic body, the reason only in the log), the
instance must be discarded, and the next request on the same server must
succeed.  Hostile ``_initialize`` code refuses the guest at load, and makes
the server answer 503 when it happens to a later instance.  Last, clients
that reset the connection while a guest call runs.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread

from twisted_httpwasm import Execution, Guest, GuestLoadError
from twisted_httpwasm.web.request_changes import TwistedRequestState

from .support import ServerTestCase, execution_variants, guest_path_variants
from .test_limits import FakeClock, WasiGuestMixin, next_with_ctx, wasi_module
from .test_resource import Strings, log_text, port_of, released
from .test_resource_response import HELLO, hello

PAGE = 65536
TIME_LIMIT = 0.2
MEMORY_LIMIT = 32 * PAGE


class Case(NamedTuple):
    name: str
    wat: str
    reason: str  # what the log must say about the trap ("" for the harmless cases)
    response_phase: bool = False
    status: int = 500


def response(name: str, wat: str, reason: str) -> Case:
    return Case(name, wat, reason, response_phase=True)


def below_the_end(n: int) -> str:
    """WAT: the address ``n`` bytes below the end of the instance's memory, as large as it is now.

    Not a constant below the first page: an instance that a harmless case grew (and kept) may
    serve any later request when several run at once, and must find it as hostile.
    """
    return f"(i32.sub (i32.mul (memory.size) (i32.const {PAGE})) (i32.const {n}))"


OOB = "out of bounds memory access"
OUTSIDE = "is outside memory"
TIMED_OUT = f"guest exceeded its time limit of {TIME_LIMIT} s"

#: Misbehaviour in handle_request; each must fail its request with a 500.
REQUEST_CASES = [
    Case("negative_buf", "(drop (call $get_uri (i32.const -1) (i32.const 100)))", f"get_uri: {OOB}"),
    Case("buf_past_memory_end", f"(drop (call $get_uri {below_the_end(4)} (i32.const 100)))", f"get_uri: {OOB}"),
    Case(
        "ptr_plus_len_wraps",
        "(call $set_header_value (i32.const 0) (i32.const 0xfffffff0) (i32.const 0x20) (i32.const 0) (i32.const 1))",
        f"set_header_value: {OOB}: 32 bytes at 4294967280",
    ),
    Case("negative_len", "(call $write_body (i32.const 1) (i32.const 0) (i32.const -1))", f"write_body: {OOB}"),
    Case("huge_len", "(call $set_uri (i32.const 16) (i32.const 0x7fffffff))", f"set_uri: {OOB}"),
    Case(
        "huge_buf_limit_near_the_end",
        f"(drop (call $get_header_names (i32.const 0) {below_the_end(1)} (i32.const 0x7fffffff)))",
        f"get_header_names: {OOB}",
    ),
    Case(
        "value_past_memory_end",
        f"(call $set_header_value (i32.const 1) (i32.const 0) (i32.const 1) {below_the_end(1)} (i32.const 2))",
        f"set_header_value: {OOB}",
    ),
    Case(
        "read_body_buf_limit_zero",
        "(drop (call $read_body (i32.const 0) (i32.const 0) (i32.const 0)))",
        "read_body: buf_limit is 0",
    ),
    Case(
        "read_body_past_memory_end",
        f"(drop (call $read_body (i32.const 0) {below_the_end(100)} (i32.const 1000)))",
        f"read_body: buffer of 1000 bytes at {PAGE - 100} {OUTSIDE}",
    ),
    Case(
        "read_body_wrapping",
        "(drop (call $read_body (i32.const 0) (i32.const -16) (i32.const 32)))",
        f"read_body: buffer of 32 bytes at 4294967280 {OUTSIDE}",
    ),
    Case(
        "unknown_header_kind",
        "(drop (call $get_header_names (i32.const 7) (i32.const 0) (i32.const 0)))",
        "unknown header kind 7",
    ),
    Case(
        "unknown_body_kind",
        "(drop (call $read_body (i32.const -1) (i32.const 0) (i32.const 8)))",
        "unknown body kind -1",
    ),
    Case("status_out_of_range", "(call $set_status_code (i32.const -1))", "-1 is not an HTTP status code"),
    Case("proc_exit_zero", "(call $proc_exit (i32.const 0))", "proc_exit(0) during handle_request"),
    Case("proc_exit_nonzero", "(call $proc_exit (i32.const 3))", "proc_exit(3) during handle_request"),
    Case("infinite_loop", "(loop $forever (br $forever))", TIMED_OUT),
    Case("infinite_recursion", "(drop (call $recurse (i32.const 0)))", "call stack exhausted"),
    Case("memory_grow_loop", "(loop $forever (drop (memory.grow (i32.const 1))) (br $forever))", TIMED_OUT),
    Case("grow_until_refused_then_trap", "(call $grow_all) (unreachable)", "unreachable"),
    Case("unreachable", "(unreachable)", "unreachable"),
    Case("load_out_of_bounds", "(drop (i32.load (i32.const -4)))", f"wasm trap: {OOB} (memory fault"),
    Case("store_out_of_bounds", f"(i32.store {below_the_end(2)} (i32.const 1))", f"wasm trap: {OOB} (memory fault"),
    Case("divide_by_zero", "(drop (i32.div_u (i32.const 1) (i32.const 0)))", "integer divide by zero"),
    Case("null_indirect_call", "(call_indirect (type $nothing) (i32.const 0))", "uninitialized element"),
    Case("float_to_int_overflow", "(drop (i32.trunc_f32_s (f32.const 1e30)))", "integer overflow"),
]

#: Misbehaviour in handle_response, with buffer_response on: also a clean 500.
RESPONSE_CASES = [
    response("response_unreachable", "(unreachable)", "unreachable"),
    response("response_infinite_loop", "(loop $forever (br $forever))", TIMED_OUT),
    response("response_infinite_recursion", "(drop (call $recurse (i32.const 0)))", "call stack exhausted"),
    response("response_proc_exit", "(call $proc_exit (i32.const 0))", "proc_exit(0) during handle_response"),
    response(
        "response_read_body_wrapping",
        "(drop (call $read_body (i32.const 1) (i32.const -1) (i32.const 10)))",
        f"read_body: buffer of 10 bytes at 4294967295 {OUTSIDE}",
    ),
    response(
        "response_write_body_huge",
        "(call $write_body (i32.const 1) (i32.const 0) (i32.const 0x7fffffff))",
        f"write_body: {OOB}",
    ),
    response(
        "response_changes_the_request_too_late",
        "(call $set_header_value (i32.const 0) (i32.const 1024) (i32.const 1) (i32.const 0) (i32.const 1))",
        "too late to change the request headers",
    ),
]

#: Odd but legal calls: the request succeeds.
HARMLESS_CASES = [
    # A failure to log is ignored, never a trap.
    Case("log_out_of_bounds", "(call $log (i32.const 2) (i32.const -1) (i32.const 0x7fffffff))", "", status=200),
    # buf_limit=0 asks for the length only: a bogus buf is never written to.
    Case("length_probe_with_bogus_buf", "(drop (call $get_uri (i32.const -1) (i32.const 0)))", "", status=200),
    Case("memory_grow_refused_is_survivable", "(call $grow_all)", "", status=200),
]

CASES = REQUEST_CASES + RESPONSE_CASES + HARMLESS_CASES


def hostile_guest_source() -> bytes:
    s = Strings()
    request_branches = []
    response_branches = []
    for number, case in enumerate(CASES, start=1):
        path = s("/" + case.name)
        if case.response_phase:
            request_branches.append(f"(if (call $is {path}) (then (return {next_with_ctx(f'(i32.const {number})')})))")
            response_branches.append(f"(if (i32.eq (local.get $case) (i32.const {number})) (then {case.wat}))")
        else:
            request_branches.append(f"(if (call $is {path}) (then {case.wat}))")
    return wasi_module(
        s.wrap(f"""
  (type $nothing (func))
  (table 1 funcref)
  (func $recurse (param $depth i32) (result i32)
    (i32.add (call $recurse (i32.add (local.get $depth) (i32.const 1))) (i32.const 1)))
  (func (export "handle_request") (result i64)
    (drop (call $enable_features (i32.const 2)))
    (call $load_uri)
    {" ".join(request_branches)}
    (i64.const 1))
  (func (export "handle_response") (param $case i32) (param $is_error i32)
    {" ".join(response_branches)})
""")
    )


HOSTILE = hostile_guest_source()


def _case_test(case: Case) -> Any:
    def test(self: HostileGuestTestsMixin) -> Any:
        return self.check_case(case)

    test.__name__ = f"test_{case.name}"
    outcome = "is served (200)" if case.status == 200 else f"fails cleanly with a 500 ({case.reason})"
    test.__doc__ = f"/{case.name}: {case.wat} {outcome}; the next request is served."
    return test


class HostileGuestTestsMixin(WasiGuestMixin):
    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.hostile = Guest(HOSTILE, execution=self.execution, timeout=TIME_LIMIT, memory_limit=MEMORY_LIMIT)
        self.url = self.serve_guest(self.hostile, hello())

    @inlineCallbacks
    def check_case(self, case: Case) -> Any:
        events = self.capture_log()
        stats = self.hostile.pool.stats
        discarded = stats.discarded
        status, headers, body, length = yield self.get(f"{self.url}/{case.name}")
        if case.status == 200:
            self.assertEqual((status, body), (200, HELLO))
            self.assertEqual(stats.discarded, discarded)
        else:
            self.assertEqual((status, body, length), (500, b"Internal Server Error\n", len(body)))
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
            phase = "handle_response" if case.response_phase else "handle_request"
            text = log_text(events)
            self.assertIn(f"failed in {phase}", text)
            self.assertIn(case.reason, text)
            self.assertEqual(stats.discarded, discarded + 1, "a trapped instance is discarded")
        self.assertEqual(stats.in_use, 0)
        # The server stays up and the next request gets a healthy instance.
        status, _, body, _ = yield self.get(self.url + "/ok")
        self.assertEqual((status, body), (200, HELLO))
        self.assertEqual(stats.in_use, 0)

    for _case in CASES:
        vars()[f"test_{_case.name}"] = _case_test(_case)
    del _case

    @inlineCallbacks
    def test_every_case_in_a_row_then_a_normal_request(self):
        """All the hostile requests at once, alongside normal ones: each gets its own answer."""
        paths = [f"/{case.name}" for case in CASES] + ["/ok"] * 5
        results = yield gatherResults([self.get(self.url + path) for path in paths])
        expected = [case.status for case in CASES] + [200] * 5
        self.assertEqual([result.status for result in results], expected)
        stats = self.hostile.pool.stats
        self.assertEqual(stats.in_use, 0)
        self.assertEqual(stats.discarded, sum(case.status != 200 for case in CASES))
        self.assertEqual(stats.idle, stats.created - stats.discarded)


globals().update(execution_variants(HostileGuestTestsMixin, ServerTestCase))


# -- hostile initialisation ---------------------------------------------------------------------

#: config -> what _initialize does with it, and a word the refusal must contain.
INIT_CASES = {
    b"request-function": ("(drop (call $get_uri (i32.const 0) (i32.const 0)))", "no request in flight"),
    b"unreachable": ("(unreachable)", "unreachable"),
    b"proc-exit": ("(call $proc_exit (i32.const 1))", "code 1"),
    b"loop": ("(loop $forever (br $forever))", "interrupt"),
    b"recursion": ("(drop (call $recurse (i32.const 0)))", "stack"),
    b"oob": ("(drop (i32.load (i32.const -4)))", "out of bounds"),
}


def init_guest_source(init: str) -> bytes:
    """A guest whose ``init`` export (``_initialize`` or ``_start``) misbehaves as its configuration says."""
    s = Strings()
    branches = []
    for config, (wat, _) in INIT_CASES.items():
        branches.append(
            f"(if (call $config_is {s(config)}) (then {wat}))",
        )
    return wasi_module(
        s.wrap(f"""
  (func $recurse (param $depth i32) (result i32)
    (i32.add (call $recurse (i32.add (local.get $depth) (i32.const 1))) (i32.const 1)))
  ;; 1 if the configuration is exactly the n bytes at p (it is read to 4096)
  (func $config_is (param $p i32) (param $n i32) (result i32) (local $i i32)
    (if (i32.ne (call $get_config (i32.const 4096) (i32.const 256)) (local.get $n)) (then (return (i32.const 0))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.ne (i32.load8_u (i32.add (i32.const 4096) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $p) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1))
  (func (export "{init}") {" ".join(branches)})
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32))
""")
    )


INIT_HOSTILE = init_guest_source("_initialize")
START_HOSTILE = init_guest_source("_start")

#: A module whose wasm start function (run while instantiating, before any export) never returns.
START_SECTION_LOOP = wasi_module(
    """
  (func $forever (loop $again (br $again)))
  (start $forever)
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""
)


class HostileInitTestsMixin(WasiGuestMixin):
    def test_refused_at_load(self):
        """Hostile _initialize or _start code refuses the guest at load, with the reason."""
        for init, source in (("_initialize", INIT_HOSTILE), ("_start", START_HOSTILE)):
            for config, (_, word) in INIT_CASES.items():
                with self.assertRaises(GuestLoadError) as caught:
                    Guest(source, config=config, execution=self.execution, timeout=TIME_LIMIT)
                message = str(caught.exception)
                self.assertIn("failed to initialise", message, config)
                self.assertIn(f"{init} failed", message, config)
                self.assertIn(word, message, config)

    def test_endless_start_section_is_stopped_at_the_time_limit(self):
        with self.assertRaises(GuestLoadError) as caught:
            Guest(START_SECTION_LOOP, execution=self.execution, timeout=TIME_LIMIT)
        self.assertIn("failed to initialise: instantiation failed", str(caught.exception))
        self.assertIn("interrupt", str(caught.exception))

    @inlineCallbacks
    def test_later_instance_failing_init_gets_503_then_recovers(self):
        """The same code in _initialize of a later instance: that request gets a 503 (no instance),
        the server stays up, and it serves again once instances can be made."""
        guest = Guest(INIT_HOSTILE, execution=self.execution, timeout=TIME_LIMIT)
        clock = FakeClock()
        self.patch(guest.pool, "_clock", clock)
        url = self.serve_guest(guest, hello())
        for config in INIT_CASES:
            guest.pool.clear()
            guest.config = config
            status, headers, body, _ = yield self.get(url + "/")
            self.assertEqual((status, body), (503, b"Service Unavailable\n"), config)
            self.assertIsNotNone(headers.getRawHeaders(b"retry-after"))
            guest.config = b""
            clock.now += 60
            status, _, body, _ = yield self.get(url + "/")
            self.assertEqual((status, body), (200, HELLO), config)
        self.assertEqual(guest.pool.stats.creation_failures, len(INIT_CASES))
        self.assertEqual(guest.pool.stats.in_use, 0)


globals().update(execution_variants(HostileInitTestsMixin, ServerTestCase))


# -- clients that go away while a guest call runs --------------------------------------------------

S = Strings()
SLOW_CALLS = S.wrap(f"""
  ;; /slow-request: handle_request says so in the log, then is busy for 300 ms.
  ;; /slow-response: buffered; handle_response says so, then is busy for 300 ms.
  (func (export "handle_request") (result i64)
    (call $load_uri)
    (if (call $is {S("/slow-request")}) (then
      (call $log (i32.const 0) {S("in handle_request")})
      (drop (call $get_protocol_version (i32.const 0) (i32.const 0)))  ;; the test's probe: answered in Python
      (call $spin (i32.const 300))))
    (if (call $is {S("/slow-response")}) (then
      (drop (call $enable_features (i32.const 2)))
      (return {next_with_ctx("(i32.const 1)")})))
    (i64.const 1))
  (func (export "handle_response") (param $slow i32) (param $is_error i32)
    (if (local.get $slow) (then
      (call $log (i32.const 0) {S("in handle_response")})
      (drop (call $get_protocol_version (i32.const 0) (i32.const 0)))
      (call $spin (i32.const 300))
      (call $set_header_value (i32.const 1) {S("x-late")} {S("yes")})))
    (if (local.get $is_error)
      (then (call $log (i32.const 0) {S("handle_response is_error=1")}))
      (else (call $log (i32.const 0) {S("handle_response is_error=0")}))))
""")


def reset_when(url: str, request: bytes, ready: threading.Event) -> Deferred[None]:
    """From a thread (the reactor may be busy running the guest): connect, send ``request``,
    wait for ``ready``, then reset the connection."""

    def run() -> None:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
            sock.sendall(request)
            if not ready.wait(10):
                raise AssertionError("the guest call never started")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return deferToThread(run)


class DroppedClientTestsMixin(WasiGuestMixin):
    @inlineCallbacks
    def check_reset_during(self, path: str, marker: str) -> Any:
        """The client resets the connection while the guest logs ``marker`` and keeps running:
        the call finishes, handle_response runs exactly once, the instance goes back to the
        pool healthy, nothing is logged as an error, and the server answers the next request."""
        events = self.capture_log()
        guest = self.wasi_guest(SLOW_CALLS, timeout=5)
        url = self.serve_guest(guest, hello())
        entered = threading.Event()
        read_protocol = TwistedRequestState.read_protocol

        def watching_read_protocol(state: TwistedRequestState) -> bytes:
            # On the thread running the guest, which reads the protocol right before it spins (after
            # logging the marker). Not the log itself: the compiled accelerator hands a call's lines
            # to Python when the call ends, and the pure path as it goes (both log them then).
            entered.set()
            return read_protocol(state)

        self.patch(TwistedRequestState, "read_protocol", watching_read_protocol)
        back_in_pool = released(guest)
        yield reset_when(url, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), entered)
        yield back_in_pool
        text = log_text(events)
        self.assertEqual(text.count("handle_response is_error="), 1, text)
        self.assertIn(marker, text)
        self.assertNotIn("internal error", text)
        self.assertNotIn("Traceback", text)
        stats = guest.pool.stats
        self.assertEqual((stats.in_use, stats.discarded, stats.idle), (0, 0, stats.created))
        status, _, body, _ = yield self.get(url + "/ok")
        self.assertEqual((status, body), (200, HELLO))
        return text

    @inlineCallbacks
    def test_client_resets_before_handle_request_finished(self):
        text = yield self.check_reset_during("/slow-request", "in handle_request")
        if self.execution is Execution.THREAD:
            # The reactor saw the reset while the worker ran the guest: no downstream, is_error=1.
            self.assertIn("handle_response is_error=1", text)

    @inlineCallbacks
    def test_client_resets_while_buffered_response_is_held(self):
        """The whole downstream response is held while handle_response runs; the client leaves."""
        yield self.check_reset_during("/slow-response", "in handle_response")


globals().update(execution_variants(DroppedClientTestsMixin, ServerTestCase))


# Every test case class above, on the compiled accelerator and on the pure-Python path.
guest_path_variants(globals())
