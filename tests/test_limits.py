"""Limits on guests, end-to-end: time, memory, failure policy, instance creation, buffering.

Each behaviour runs in both execution modes over real loopback sockets, except
the creation back-off, which drives :class:`GuestPool` with a fake clock.  The
WAT helpers at the top (URI dispatch, a WASI-clock spin, numbers in headers)
are shared with ``test_hostile``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.static import Data

from twisted_httpwasm import Execution, FailurePolicy, Guest, GuestResource
from twisted_httpwasm.runtime.guest import DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT
from twisted_httpwasm.runtime.hostfuncs import MAX_LOG_MESSAGE
from twisted_httpwasm.runtime.pool import GuestPool, GuestUnavailable

from .support import SET_NUMBER, ServerTestCase, execution_variants, guest_path_variants, module, poll
from .test_resource import Echo, GuestTestMixin, Strings, event_text, log_text, raw_connect, split_response
from .test_resource_failures import log_is_error
from .test_resource_response import HELLO, hello

PAGE = 65536

# -- WAT helpers shared with test_hostile ----------------------------------------------------

WASI_IMPORTS = """
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"""

#: Scratch memory the helpers use: the URI at 1024 (up to 1 KiB), the clock at 2048, digits below 2200.
HELPERS = f"""
  (global $uri_len (mut i32) (i32.const 0))
  (func $load_uri (global.set $uri_len (call $get_uri (i32.const 1024) (i32.const 1024))))
  ;; 1 if the URI starts with the n bytes at p
  (func $starts (param $p i32) (param $n i32) (result i32) (local $i i32)
    (if (i32.lt_u (global.get $uri_len) (local.get $n)) (then (return (i32.const 0))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.ne (i32.load8_u (i32.add (i32.const 1024) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $p) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1))
  ;; 1 if the URI is exactly the n bytes at p
  (func $is (param $p i32) (param $n i32) (result i32)
    (i32.and (i32.eq (global.get $uri_len) (local.get $n)) (call $starts (local.get $p) (local.get $n))))
  ;; the decimal number in the URI from offset $at to its end
  (func $number (param $at i32) (result i32) (local $value i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $at) (global.get $uri_len)))
        (local.set $value (i32.add (i32.mul (local.get $value) (i32.const 10))
                                   (i32.sub (i32.load8_u (i32.add (i32.const 1024) (local.get $at))) (i32.const 48))))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (br $next)))
    (local.get $value))
  (func $now_ms (result i64)
    (drop (call $clock_time_get (i32.const 1) (i64.const 1000) (i32.const 2048)))
    (i64.div_u (i64.load (i32.const 2048)) (i64.const 1000000)))
  ;; busy for $ms milliseconds of wall-clock time
  (func $spin (param $ms i32) (local $end i64)
    (local.set $end (i64.add (call $now_ms) (i64.extend_i32_u (local.get $ms))))
    (loop $wait (br_if $wait (i64.lt_u (call $now_ms) (local.get $end)))))
{SET_NUMBER}
  ;; grow memory one page at a time until memory.grow fails
  (func $grow_all (loop $more (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))))
"""


def wasi_module(*body: str, memory_pages: int = 1) -> bytes:
    """A guest with every http_handler import, WASI's clock and proc_exit, the helpers and ``body``."""
    return module(HELPERS, *body, memory_pages=memory_pages, imports=WASI_IMPORTS)


def next_with_ctx(value: str) -> str:
    """WAT for ``ctx_next``: next=1 and ``value`` (an i32 expression) as req_ctx."""
    return f"(i64.or (i64.shl (i64.extend_i32_u {value}) (i64.const 32)) (i64.const 1))"


class WasiGuestMixin(GuestTestMixin):
    def wasi_guest(self, *body: str, memory_pages: int = 1, **options: Any) -> Guest:
        return Guest(wasi_module(*body, memory_pages=memory_pages), execution=self.execution, **options)


@inlineCallbacks
def eventually(predicate: Any, timeout: float = 5.0) -> Any:
    """Fires once ``predicate()`` holds; fails with AssertionError after ``timeout`` seconds."""
    if not (yield poll(predicate, timeout, interval=0.005)):
        raise AssertionError(f"not true within {timeout} s: {predicate}")


class TickRecorder:
    """Records the reactor's turns every few milliseconds: the longest gap is how long it was blocked."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.loop = task.LoopingCall(lambda: self.ticks.append(time.monotonic()))
        self.loop.start(0.005)

    def stop(self) -> float:
        """Stop; the longest gap between two turns, in seconds."""
        self.loop.stop()
        return max((later - earlier for earlier, later in zip(self.ticks, self.ticks[1:], strict=False)), default=0.0)


# -- 1. time limit ------------------------------------------------------------------------

S = Strings()
TIMED = S.wrap(f"""
  ;; /loop: never returns.  /spin/N: busy for N ms in handle_request, and N ms again in handle_response.
  (func (export "handle_request") (result i64) (local $ms i32)
    (call $load_uri)
    (if (call $is {S("/loop")}) (then (loop $forever (br $forever))))
    (if (call $starts {S("/spin/")}) (then
      (local.set $ms (call $number (i32.const 6)))
      (call $spin (local.get $ms))
      (return {next_with_ctx("(local.get $ms)")})))
    (i64.const 1))
  (func (export "handle_response") (param $ms i32) (param $is_error i32)
    (call $spin (local.get $ms)))
""")


def fast_and_slow() -> Resource:
    root = Resource()
    root.putChild(b"ok", Data(b"ok", "text/plain"))
    root.putChild(b"loop", Data(b"never reached", "text/plain"))
    root.putChild(b"spin", hello())
    return root


class TimeLimitTestsMixin(WasiGuestMixin):
    @inlineCallbacks
    def test_looping_guest_is_trapped_at_its_limit(self):
        """A guest call over its time limit traps: the request gets a plain 500 after about the
        limit, the log says why, the instance is discarded, and the next request is served."""
        events = self.capture_log()
        guest = self.wasi_guest(TIMED, timeout=0.3)
        url = self.serve_guest(guest, fast_and_slow())
        started = time.monotonic()
        status, _, body, _ = yield self.get(url + "/loop")
        elapsed = time.monotonic() - started
        self.assertEqual((status, body), (500, b"Internal Server Error\n"))
        self.assertGreaterEqual(elapsed, 0.29)
        self.assertLess(elapsed, 3.0)
        self.assertIn("exceeded its time limit of 0.3 s", log_text(events))
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (1, 0))
        status, _, body, _ = yield self.get(url + "/ok")
        self.assertEqual((status, body), (200, b"ok"))

    @inlineCallbacks
    def test_deadline_is_rearmed_for_every_call(self):
        """The limit is per call: handle_request and handle_response each take 60% of it, and
        three requests in a row on the same instance all succeed.  (A limit of 2 s: each call's 800 ms to
        spare cover what a loaded machine adds to its 1.2 s spin; 100 ms, then 400 ms, did not.)"""
        guest = self.wasi_guest(TIMED, timeout=2.0)
        url = self.serve_guest(guest, fast_and_slow())
        for _ in range(3):
            status, _, body, _ = yield self.get(url + "/spin/1200")
            self.assertEqual((status, body), (200, HELLO))
        stats = guest.pool.stats
        self.assertEqual((stats.created, stats.discarded, stats.in_use), (1, 0, 0))

    def test_default_limit_is_one_second(self):
        self.assertEqual(DEFAULT_TIMEOUT, 1.0)
        self.assertEqual(self.wasi_guest(TIMED).timeout, 1.0)


class TimeLimitThreadOnlyMixin:
    """Time-limit tests for the thread execution mode alone."""

    @inlineCallbacks
    def test_other_requests_are_served_while_a_guest_loops(self):
        """With the default limit (1 s): while one guest call loops in a worker, the reactor keeps
        turning and a fast request completes; then the looping request gets its 500."""
        guest = self.wasi_guest(TIMED)
        url = self.serve_guest(guest, fast_and_slow())
        ticks = TickRecorder()
        started = time.monotonic()
        looping = self.get(url + "/loop")
        yield eventually(lambda: guest.pool.stats.in_use == 1)
        status, _, body, _ = yield self.get(url + "/ok")
        self.assertEqual((status, body), (200, b"ok"))
        self.assertFalse(looping.called, "the fast request should finish while the guest still loops")
        status, _, body, _ = yield looping
        elapsed = time.monotonic() - started
        longest_gap = ticks.stop()
        self.assertEqual((status, body), (500, b"Internal Server Error\n"))
        self.assertGreaterEqual(elapsed, 0.99)
        self.assertLess(elapsed, 4.0)
        # A reactor blocked by the call would not turn for the whole 1 s limit; a loaded machine alone can
        # hold it back half a second (seen in CI-like runs), so the line is drawn well between the two.
        self.assertLess(longest_gap, 0.8, "the reactor was blocked")


class TimeLimitInlineOnlyMixin:
    """Time-limit tests for the inline execution mode alone."""

    @inlineCallbacks
    def test_reactor_is_free_again_right_after_the_limit(self):
        """Inline, a looping guest blocks the reactor, but only for its limit: a request sent
        alongside is answered right after the looping one gets its 500."""
        guest = self.wasi_guest(TIMED, timeout=0.3)
        url = self.serve_guest(guest, fast_and_slow())
        ticks = TickRecorder()
        started = time.monotonic()
        finished: dict[str, float] = {}

        def record(result: Any, name: str) -> Any:
            finished[name] = time.monotonic() - started
            return result

        looping = self.get(url + "/loop").addCallback(record, "loop")
        yield eventually(lambda: len(ticks.ticks) > 0)
        fast = self.get(url + "/ok").addCallback(record, "ok")
        (loop_status, _, _, _), (ok_status, _, ok_body, _) = yield gatherResults([looping, fast])
        longest_gap = ticks.stop()
        self.assertEqual((loop_status, ok_status, ok_body), (500, 200, b"ok"))
        self.assertGreaterEqual(longest_gap, 0.25, "inline: the guest runs on the reactor thread")
        # Free right after the 0.3 s limit, not at some later check: bounds far above the limit, so that a
        # loaded machine's own stalls do not count, and far below what a missed interrupt would take.
        self.assertLess(longest_gap, 1.5, "the reactor must be free right after the limit")
        self.assertLess(finished["ok"], 2.5)


globals().update(
    execution_variants(
        TimeLimitTestsMixin,
        ServerTestCase,
        only={Execution.THREAD: TimeLimitThreadOnlyMixin, Execution.INLINE: TimeLimitInlineOnlyMixin},
    )
)


# -- 2. memory limit ----------------------------------------------------------------------

S = Strings()
MEMORY = S.wrap(f"""
  ;; /grow: grow until memory.grow fails, answer with x-pages.  /grow-then-trap: then trap.
  ;; /hoard: copy the whole request body into memory (from 64 KiB on), growing it, trapping if it cannot.
  (func (export "handle_request") (result i64)
    (call $load_uri)
    (if (call $is {S("/grow")}) (then
      (call $grow_all)
      (call $set_number {S("x-pages")} (memory.size))))
    (if (call $is {S("/grow-then-trap")}) (then
      (call $grow_all)
      (unreachable)))
    (if (call $is {S("/hoard")}) (then
      (call $set_number {S("x-hoarded")} (call $hoard))))
    (i64.const 1))
  (func $hoard (result i32) (local $at i32) (local $r i64)
    (local.set $at (i32.const {PAGE}))
    (block $done
      (loop $more
        (if (i32.gt_u (i32.add (local.get $at) (i32.const {PAGE})) (i32.mul (memory.size) (i32.const {PAGE})))
          (then (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then (unreachable)))))
        (local.set $r (call $read_body (i32.const 0) (local.get $at) (i32.const {PAGE})))
        (local.set $at (i32.add (local.get $at) (i32.wrap_i64 (local.get $r))))
        (br_if $done (i64.ne (i64.shr_u (local.get $r) (i64.const 32)) (i64.const 0)))
        (br $more)))
    (i32.sub (local.get $at) (i32.const {PAGE})))
  (func (export "handle_response") (param i32 i32))
""")


class MemoryLimitTestsMixin(WasiGuestMixin):
    @inlineCallbacks
    def test_memory_grow_fails_at_the_limit(self):
        """memory.grow succeeds up to the limit and fails past it (the guest carries on)."""
        small = self.wasi_guest(MEMORY, memory_limit=16 * PAGE)
        url = self.serve_guest(small, hello())
        status, headers, body, _ = yield self.get(url + "/grow")
        self.assertEqual((status, body), (200, HELLO))
        self.assertEqual(headers.getRawHeaders(b"x-pages"), [b"16"])

    @inlineCallbacks
    def test_default_limit_is_64_mib(self):
        self.assertEqual(DEFAULT_MEMORY_LIMIT, 64 * 1024 * 1024)
        url = self.serve_guest(self.wasi_guest(MEMORY), hello())
        status, headers, _, _ = yield self.get(url + "/grow")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"x-pages"), [b"1024"])

    @inlineCallbacks
    def test_trap_after_failed_grow_fails_only_its_request(self):
        """A guest that traps once memory.grow fails gets a 500 for that request only; requests
        alongside and after it are served, and the bloated instance is discarded."""
        guest = self.wasi_guest(MEMORY, memory_limit=32 * PAGE)
        url = self.serve_guest(guest, hello())
        results = yield gatherResults([self.get(url + "/grow-then-trap"), self.get(url + "/ok"), self.get(url + "/")])
        self.assertEqual([result.status for result in results], [500, 200, 200])
        self.assertEqual(results[0].body, b"Internal Server Error\n")
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (1, 0))
        status, _, body, _ = yield self.get(url + "/ok")
        self.assertEqual((status, body), (200, HELLO))

    @inlineCallbacks
    def test_data_heavy_guest_is_stopped_by_the_limit(self):
        """A guest copying the request body into its memory: a body that fits is copied whole; one
        past the memory limit makes memory.grow fail, the guest traps, and only that request fails."""
        guest = self.wasi_guest(MEMORY, memory_limit=16 * PAGE)
        url = self.serve_guest(guest, Echo())
        fits = b"f" * (8 * PAGE + 123)
        status, headers, body, _ = yield self.get(url + "/hoard", method="POST", data=fits)
        self.assertEqual(status, 200, body)
        self.assertEqual(headers.getRawHeaders(b"x-hoarded"), [str(len(fits)).encode()])
        status, _, body, _ = yield self.get(url + "/hoard", method="POST", data=b"x" * (32 * PAGE))
        self.assertEqual((status, body), (500, b"Internal Server Error\n"))
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (1, 0))
        status, _, body, _ = yield self.get(url + "/hoard", method="POST", data=fits)
        self.assertEqual(status, 200)


globals().update(execution_variants(MemoryLimitTestsMixin, ServerTestCase))


# -- 3. failure policy ---------------------------------------------------------------------

S = Strings()
CHANGES_THEN_FAILS = S.wrap(f"""
  ;; Reads part of the body, changes the request and the response, then: /trap-request traps, /loop loops,
  ;; /trap-response (buffered) rewrites the response in handle_response and traps.
  (func (export "handle_request") (result i64) (local $late i32)
    (drop (call $enable_features (i32.const 2)))
    (drop (call $read_body (i32.const 0) (i32.const 4096) (i32.const 4)))  ;; consumes part of the body
    (call $load_uri)
    (local.set $late (call $is {S("/trap-response")}))
    (call $set_header_value (i32.const 0) {S("x-guest")} {S("changed")})
    (call $set_uri {S("/changed")})
    (call $write_body (i32.const 0) {S("changed body")})
    (call $set_header_value (i32.const 1) {S("x-guest-response")} {S("before next")})
    (if (call $is {S("/trap-request")}) (then (unreachable)))
    (if (call $is {S("/loop")}) (then (loop $forever (br $forever))))
    {next_with_ctx("(local.get $late)")})
  (func (export "handle_response") (param $late i32) (param $is_error i32)
    (if (local.get $late) (then
      (call $set_status_code (i32.const 203))
      (call $set_header_value (i32.const 1) {S("x-guest-response")} {S("late")})
      (call $write_body (i32.const 1) {S("rewritten by the guest")})
      (unreachable))))
""")


class FailurePolicyTestsMixin(WasiGuestMixin):
    def serve_policy(self, policy: str) -> tuple[Guest, str]:
        guest = self.wasi_guest(CHANGES_THEN_FAILS, timeout=0.2)
        return guest, self.serve(GuestResource(guest, Echo(), on_guest_error=policy))

    @inlineCallbacks
    def test_fail_closed_answers_500_without_detail(self):
        events = self.capture_log()
        guest, url = self.serve_policy(FailurePolicy.FAIL_CLOSED)
        for path in ("/trap-request", "/loop", "/trap-response"):
            status, headers, body, _ = yield self.get(url + path, method="POST", data=b"original body")
            self.assertEqual((status, body), (500, b"Internal Server Error\n"), path)
            self.assertIsNone(headers.getRawHeaders(b"x-guest-response"), path)
        text = log_text(events)
        self.assertIn("failed in handle_request", text)
        self.assertIn("failed in handle_response", text)
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (3, 0))

    @inlineCallbacks
    def test_fail_open_passes_the_untouched_request_on(self):
        """A trap or a timeout in handle_request: the downstream gets the request as the client
        sent it (none of the guest's changes), the client its answer, the log the reason."""
        events = self.capture_log()
        guest, url = self.serve_policy(FailurePolicy.FAIL_OPEN)
        for path in ("/trap-request", "/loop"):
            status, headers, body, _ = yield self.get(
                url + path, method="POST", data=b"original body", headers={"X-Client": "kept"}
            )
            self.assertEqual(status, 200, body)
            seen = json.loads(body)
            self.assertEqual((seen["uri"], seen["body"]), (path, "original body"))
            self.assertEqual(seen["headers"]["x-client"], ["kept"])
            self.assertNotIn("x-guest", seen["headers"])
            self.assertIsNone(headers.getRawHeaders(b"x-guest-response"))
        text = log_text(events)
        self.assertIn("unreachable", text)
        self.assertIn("exceeded its time limit", text)
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (2, 0))

    @inlineCallbacks
    def test_fail_open_trap_in_buffered_handle_response_sends_the_original(self):
        """The guest rewrote the held response and then trapped: the client gets the downstream's
        original response (status, headers, body), not the guest's half-done rewrite."""
        events = self.capture_log()
        guest, url = self.serve_policy(FailurePolicy.FAIL_OPEN)
        status, headers, body, length = yield self.get(url + "/trap-response", method="POST", data=b"original body")
        self.assertEqual(status, 200, body)
        seen = json.loads(body)
        self.assertEqual((seen["uri"], seen["body"]), ("/changed", "changed body"))  # handle_request succeeded
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(headers.getRawHeaders(b"x-guest-response"), [b"before next"])
        self.assertEqual(length, len(body))
        self.assertIn("failed in handle_response", log_text(events))
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (1, 0))


globals().update(execution_variants(FailurePolicyTestsMixin, ServerTestCase))


# -- 3b. instances that cannot be created ----------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Made:
    def __init__(self) -> None:
        self.trapped = False


class Factory:
    """Makes instances, or fails while ``failing``; counts its calls."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    def __call__(self) -> Made:
        self.calls += 1
        if self.failing:
            raise RuntimeError("init trapped")
        return Made()


class CreationBackoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = FakeClock()
        self.factory = Factory()
        self.pool: GuestPool[Made] = GuestPool(self.factory, clock=self.clock)

    def assertUnavailable(self, calls: int) -> GuestUnavailable:
        """acquire() is refused, and the factory has been called ``calls`` times in all."""
        with self.assertRaises(GuestUnavailable) as caught:
            self.pool.acquire()
        self.assertEqual(self.factory.calls, calls)
        return caught.exception

    def test_a_failed_creation_is_unavailable_with_its_cause(self) -> None:
        refused = self.assertUnavailable(calls=1)
        self.assertIsInstance(refused.__cause__, RuntimeError)
        self.assertIn("init trapped", str(refused))
        self.assertEqual(refused.retry_after, 0.1)
        self.assertEqual(self.pool.stats.creation_failures, 1)
        self.assertEqual(self.pool.stats.in_use, 0)

    def test_no_new_attempt_before_the_backoff_is_over(self) -> None:
        self.assertUnavailable(calls=1)
        self.clock.now += 0.099
        refused = self.assertUnavailable(calls=1)
        self.assertAlmostEqual(refused.retry_after, 0.001)
        self.clock.now += 0.001
        self.assertUnavailable(calls=2)

    def test_backoff_doubles_up_to_30_seconds(self) -> None:
        delays = []
        for attempt in range(12):
            delays.append(self.assertUnavailable(calls=attempt + 1).retry_after)
            self.clock.now += delays[-1]
        self.assertEqual(delays[:4], [0.1, 0.2, 0.4, 0.8])
        self.assertEqual(delays[-2:], [30.0, 30.0])
        self.assertEqual(self.pool.stats.creation_failures, 12)

    def test_success_ends_the_backoff(self) -> None:
        for attempt in range(3):
            self.assertUnavailable(calls=attempt + 1)
            self.clock.now += 10
        self.factory.failing = False
        made = self.pool.acquire()
        self.assertEqual(self.factory.calls, 4)
        self.pool.release(made)
        self.pool.clear()
        self.factory.failing = True
        self.assertEqual(self.assertUnavailable(calls=5).retry_after, 0.1)  # from the start again

    def test_idle_instances_are_still_lent_during_the_backoff(self) -> None:
        self.factory.failing = False
        made = self.pool.acquire()
        self.factory.failing = True
        self.assertUnavailable(calls=2)
        self.pool.release(made)
        self.assertIs(self.pool.acquire(), made)
        self.assertEqual(self.factory.calls, 2)

    def test_one_caller_at_a_time_retries_after_the_backoff(self) -> None:
        """Once the back-off is over, the first caller tries again; callers arriving while it
        tries are refused rather than piling up creations."""
        self.assertUnavailable(calls=1)
        self.clock.now += 1
        refused_meanwhile: list[GuestUnavailable] = []

        def slow_factory() -> Made:
            self.factory.calls += 1
            try:
                self.pool.acquire()  # another request arrives while this creation runs
            except GuestUnavailable as error:
                refused_meanwhile.append(error)
            return Made()

        self.pool._factory = slow_factory
        self.pool.acquire()
        self.assertEqual(self.factory.calls, 2)
        self.assertEqual(len(refused_meanwhile), 1)
        self.assertEqual(self.pool.stats.created, 1)


S = Strings()
INIT_FAILS_WITH_CONFIG = S.wrap("""
  ;; _initialize traps when the guest has any configuration
  (func (export "_initialize")
    (if (call $get_config (i32.const 0) (i32.const 0)) (then (unreachable))))
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32))
""")


class CreationFailureTestsMixin(WasiGuestMixin):
    busy: Any = None  # an instance the test holds, so that requests need a new one

    @inlineCallbacks
    def check_unavailable(self, guest: Guest, url: str, attempts: int) -> Any:
        """One request: a 503 with Retry-After and a plain body; ``attempts`` creations failed so far."""
        status, headers, body, _ = yield self.get(url + "/")
        self.assertEqual((status, body), (503, b"Service Unavailable\n"))
        self.assertIsNotNone(headers.getRawHeaders(b"retry-after"))
        self.assertEqual(guest.pool.stats.creation_failures, attempts)
        self.assertEqual(guest.pool.stats.in_use, 1 if self.busy else 0)

    @inlineCallbacks
    def test_503_and_retry_only_after_backoff(self):
        """New instances cannot be made (their init traps) while the only one is busy: 503 with
        Retry-After, and no new attempt until the back-off is over; the idle instance is lent
        as soon as it is back; and once init works again the pool recovers."""
        events = self.capture_log()
        guest = self.wasi_guest(INIT_FAILS_WITH_CONFIG)
        clock = FakeClock()
        self.patch(guest.pool, "_clock", clock)
        url = self.serve_guest(guest, hello())
        self.busy = guest.pool.acquire()
        self.patch(guest, "config", b"from now on, init traps")
        yield self.check_unavailable(guest, url, attempts=1)
        self.assertIn("unreachable", log_text(events))
        yield self.check_unavailable(guest, url, attempts=1)  # within the back-off: not tried again
        clock.now += 0.1
        yield self.check_unavailable(guest, url, attempts=2)  # tried once more, failed again
        guest.pool.release(self.busy)
        self.busy = None
        status, _, body, _ = yield self.get(url + "/")  # the idle instance is lent despite the back-off
        self.assertEqual((status, body), (200, HELLO))
        guest.pool.clear()
        guest.config = b""  # init works again, but the back-off (0.2 s) is not over yet
        yield self.check_unavailable(guest, url, attempts=2)
        clock.now += 0.2
        status, _, body, _ = yield self.get(url + "/")
        self.assertEqual((status, body), (200, HELLO))
        self.assertEqual((guest.pool.stats.creation_failures, guest.pool.stats.created), (2, 2))

    @inlineCallbacks
    def test_503_under_fail_open_too(self):
        """No instance means no guest to run: fail-open does not let the request bypass it."""
        guest = self.wasi_guest(INIT_FAILS_WITH_CONFIG)
        url = self.serve(GuestResource(guest, hello(), on_guest_error=FailurePolicy.FAIL_OPEN))
        guest.pool.clear()
        self.patch(guest, "config", b"x")
        yield self.check_unavailable(guest, url, attempts=1)


globals().update(execution_variants(CreationFailureTestsMixin, ServerTestCase))


# -- 4. bounded buffering --------------------------------------------------------------------

LIMIT = 1000


def buffering(init_features: int, request_features: int) -> str:
    """:func:`log_is_error` with ``request_features``, and ``init_features`` enabled at init."""
    initialize = f'(func (export "_initialize") (drop (call $enable_features (i32.const {init_features}))))'
    return initialize + log_is_error(request_features)


class Counting(Echo):
    """Echo that counts the requests it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def render(self, request: Any) -> bytes:
        self.seen += 1
        return super().render(request)


class Trickle(Resource):
    """Writes ``count`` chunks one reactor turn apart, without Content-Length, then finishes;
    it never watches notifyFinish, so it keeps writing whatever happens.  ``done`` fires at the end."""

    isLeaf = True

    def __init__(self, chunk: bytes, count: int):
        super().__init__()
        self.chunk = chunk
        self.count = count
        self.done: Deferred[None] = Deferred()

    def render_GET(self, request: Any) -> object:
        def next_chunk(left: int) -> None:
            if left:
                request.write(self.chunk)
                reactor.callLater(0, next_chunk, left - 1)  # type: ignore[attr-defined]
            else:
                request.finish()
                self.done.callback(None)

        next_chunk(self.count)
        return NOT_DONE_YET


def sized(size: int) -> Resource:
    data = Data(b"d" * size, "text/plain")
    data.isLeaf = True
    return data


class BufferLimitTestsMixin(WasiGuestMixin):
    def buffering_guest(self, init_features: int = 0, request_features: int = 0) -> Guest:
        return self.wasi_guest(buffering(init_features, request_features), max_buffer_bytes=LIMIT)

    @inlineCallbacks
    def check_request_limit(self, guest: Guest) -> Any:
        downstream = Counting()
        url = self.serve_guest(guest, downstream)
        status, _, body, _ = yield self.get(url + "/", method="POST", data=b"b" * LIMIT)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["body"], "b" * LIMIT)
        status, _, body, _ = yield self.get(url + "/", method="POST", data=b"b" * (LIMIT + 1))
        self.assertEqual((status, body), (413, b"Request Entity Too Large\n"))
        self.assertEqual(downstream.seen, 1)
        self.assertEqual((guest.pool.stats.in_use, guest.pool.stats.discarded), (0, 0))
        return url

    @inlineCallbacks
    def test_request_body_over_the_limit_with_buffer_request_from_init(self):
        """buffer_request enabled at init: a body over the limit gets 413 before the guest runs."""
        yield self.check_request_limit(self.buffering_guest(init_features=1))

    @inlineCallbacks
    def test_request_body_over_the_limit_with_buffer_request_from_handle_request(self):
        """buffer_request enabled in handle_request: 413, and handle_response sees is_error=1."""
        events = self.capture_log()
        yield self.check_request_limit(self.buffering_guest(request_features=1))
        self.assertIn("handle_response is_error=1", log_text(events))

    @inlineCallbacks
    def test_chunked_request_body_over_the_limit(self):
        """A body sent chunked (no Content-Length) is held to the same limit."""
        downstream = Counting()
        url = self.serve_guest(self.buffering_guest(request_features=1), downstream)
        chunk = b"c" * 600
        request = (
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2
            + b"0\r\n\r\n"
        )
        client = yield raw_connect(url, request)
        raw = yield client.closed
        status_line, _, _ = split_response(raw)
        self.assertEqual(status_line, b"HTTP/1.1 413 Request Entity Too Large", raw[:200])
        self.assertEqual(downstream.seen, 0)

    @inlineCallbacks
    def test_without_buffer_request_large_bodies_pass(self):
        url = self.serve_guest(self.buffering_guest(), Echo())
        status, _, body, _ = yield self.get(url + "/", method="POST", data=b"b" * (LIMIT * 3))
        self.assertEqual(status, 200)
        self.assertEqual(len(json.loads(body)["body"]), LIMIT * 3)

    @inlineCallbacks
    def test_buffered_response_over_the_limit_is_502(self):
        """buffer_response: a response up to the limit is held and sent; one past it is a 502
        (whether written at once or in chunks), and handle_response sees is_error=1."""
        guest = self.buffering_guest(request_features=2)
        root = Resource()
        root.putChild(b"fits", sized(LIMIT))
        root.putChild(b"big", sized(LIMIT + 1))
        trickle = Trickle(b"k" * 100, 30)
        root.putChild(b"trickle", trickle)
        url = self.serve_guest(guest, root)
        status, _, body, _ = yield self.get(url + "/fits")
        self.assertEqual((status, len(body)), (200, LIMIT))
        for path in ("/big", "/trickle"):
            error_seen = self.wait_for_log("handle_response is_error=1")
            status, _, body, _ = yield self.get(url + path)
            self.assertEqual((status, body), (502, b"Bad Gateway\n"), path)
            yield error_seen
        # The trickling downstream, cut off after 11 chunks, writes and finishes on: quietly ignored.
        yield trickle.done
        self.assertEqual((guest.pool.stats.in_use, guest.pool.stats.discarded), (0, 0))

    @inlineCallbacks
    def test_streamed_response_is_not_limited(self):
        url = self.serve_guest(self.buffering_guest(), sized(LIMIT * 3))
        status, _, body, _ = yield self.get(url + "/")
        self.assertEqual((status, len(body)), (200, LIMIT * 3))

    @inlineCallbacks
    def test_headers_the_guest_adds_count_against_the_limit(self):
        """A guest adding header values in a loop is stopped at the buffer limit (it traps: a
        plain 500), instead of making the host hold whatever it adds until its time runs out."""
        events = self.capture_log()
        guest = self.wasi_guest(HEADER_HOG, memory_pages=10, max_buffer_bytes=LIMIT)
        url = self.serve_guest(guest, hello())
        status, headers, body, _ = yield self.get(url + "/add/3")  # 3 x 300 bytes: within the limit
        self.assertEqual((status, body), (200, HELLO))
        self.assertEqual(len(headers.getRawHeaders(b"x-hog")), 3)
        for path in ("/add/4", "/add/100000", "/add-request/100000"):
            status, _, body, _ = yield self.get(url + path)
            self.assertEqual((status, body), (500, b"Internal Server Error\n"), path)
        self.assertIn(f"add_header_value: headers of 1220 bytes exceeds the limit of {LIMIT}", log_text(events))
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (3, 0))

    @inlineCallbacks
    def test_long_log_message_is_cut(self):
        """A guest logging a huge message: the log gets the first 16 KiB and the count of the rest."""
        events = self.capture_log()
        url = self.serve_guest(self.wasi_guest(HEADER_HOG, memory_pages=10), hello())
        status, _, _, _ = yield self.get(url + "/log")
        self.assertEqual(status, 200)
        [logged] = [event_text(event) for event in events if "more bytes not logged" in event_text(event)]
        self.assertIn("a" * MAX_LOG_MESSAGE + f"... [{8 * PAGE - MAX_LOG_MESSAGE} more bytes not logged]", logged)
        self.assertNotIn("a" * (MAX_LOG_MESSAGE + 1), logged)


S = Strings()
HEADER_HOG = S.wrap(f"""
  ;; /add/N, /add-request/N: add N values of 300 bytes to the response (request) header x-hog.
  ;; /log: log a message of 512 KiB.
  (func (export "handle_request") (result i64) (local $left i32) (local $kind i32)
    (memory.fill (i32.const {PAGE}) (i32.const 97) (i32.const {8 * PAGE}))
    (call $load_uri)
    (if (call $starts {S("/add/")}) (then
      (local.set $kind (i32.const 1))
      (local.set $left (call $number (i32.const 5)))))
    (if (call $starts {S("/add-request/")}) (then
      (local.set $left (call $number (i32.const 13)))))
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $left)))
        (call $add_header_value (local.get $kind) {S("x-hog")} (i32.const {PAGE}) (i32.const 300))
        (local.set $left (i32.sub (local.get $left) (i32.const 1)))
        (br $more)))
    (if (call $is {S("/log")}) (then (call $log (i32.const 0) (i32.const {PAGE}) (i32.const {8 * PAGE}))))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
""")


globals().update(execution_variants(BufferLimitTestsMixin, ServerTestCase))


# Every test case class above, on the compiled accelerator and on the pure-Python path.
guest_path_variants(globals())
